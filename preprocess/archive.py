"""A .zip given as --input (a PACS export, a folder of CTs), unpacked for the run into a private temporary folder.

Every member is checked from the archive's directory before a byte is written, and refused by name:
- a path that would leave the folder (absolute, a drive letter, `..`, a NUL byte): zip-slip;
- a symlink, device or FIFO member, an encrypted member, more than MAX_MEMBERS members;
- a member that declares more than MAX_RATIO times its compressed size (and over 1 MiB), or members whose
  declared sizes add up past the budget or past the free space of the temporary folder: zip bomb.
While unpacking, each member is counted as it inflates (a hostile archive's declared sizes lie): one that
inflates past what it declares, or a total past the budget, is refused. On any refusal, and at the end of
the run, the temporary folder is removed: nothing is left behind. Members under __MACOSX/ (macOS resource
forks) are not unpacked; a .zip inside the archive is not opened (it is no DICOM file and is skipped).
"""

from __future__ import annotations

import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from common.errors import InputError

#: at most this many bytes unpacked from one archive (the budget)
DEFAULT_BUDGET_BYTES = 16 * 2**30
MAX_MEMBERS = 200_000
#: DICOM and CT images deflate 1.5-20 to 1 (air outside the body); a zip bomb of zeros about 1000 to 1
MAX_RATIO = 200
_RATIO_FLOOR_BYTES = 2**20
_CHUNK = 1 << 20


def is_archive(path: Path) -> bool:
    return Path(path).suffix.lower() == ".zip" and Path(path).is_file()


def _member_path(info: zipfile.ZipInfo, archive: Path) -> PurePosixPath | None:
    """The member's relative path, None for what is not unpacked; InputError for what must be refused."""
    name = info.filename
    mode = (info.external_attr >> 16) & 0o170000
    if mode == stat.S_IFLNK:
        raise InputError(f"{archive}: member {name!r} is a symbolic link: refused")
    if mode not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InputError(f"{archive}: member {name!r} is not a regular file or folder: refused")
    if info.flag_bits & 0x1:
        raise InputError(f"{archive}: member {name!r} is encrypted: not supported")
    text = name.replace("\\", "/")
    parts = PurePosixPath(text).parts
    if "\0" in name or text.startswith("/") or re.match(r"^[A-Za-z]:", text) or ".." in parts:
        raise InputError(f"{archive}: member {name!r} would be written outside the folder it is unpacked into (zip-slip): refused")
    parts = tuple(p for p in parts if p not in ("", "."))
    if not parts or parts[0] == "__MACOSX":
        return None
    return PurePosixPath(*parts)


def check_archive(archive: zipfile.ZipFile, path: Path, *, budget_bytes: int, free_bytes: int) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """The file members to unpack, each checked (module docstring); InputError at the first refused one."""
    members = archive.infolist()
    if len(members) > MAX_MEMBERS:
        raise InputError(f"{path}: holds {len(members)} members, more than {MAX_MEMBERS}: refused")
    files, declared = [], 0
    for info in members:
        relative = _member_path(info, path)
        if relative is None or info.is_dir():
            continue
        if info.file_size > _RATIO_FLOOR_BYTES and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise InputError(f"{path}: member {info.filename!r} declares {info.file_size / 2**20:.0f} MiB from {info.compress_size} bytes "
                             f"(more than {MAX_RATIO} to 1): refused as a zip bomb")
        declared += info.file_size
        files.append((info, relative))
    if declared > budget_bytes:
        raise InputError(f"{path}: declares {declared / 2**30:.1f} GiB unpacked, more than the budget of {budget_bytes / 2**30:.1f} GiB: refused")
    if declared > free_bytes:
        raise InputError(f"{path}: declares {declared / 2**30:.1f} GiB unpacked, more than the {free_bytes / 2**30:.1f} GiB free in the "
                         f"temporary folder (set TMPDIR to a larger one)")
    return files


def _unpack(archive: zipfile.ZipFile, files, root: Path, path: Path, *, budget_bytes: int) -> None:
    total = 0
    for info, relative in files:
        target = root.joinpath(*relative.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        with archive.open(info) as source, open(target, "xb") as sink:
            while block := source.read(_CHUNK):
                written += len(block)
                total += len(block)
                if written > info.file_size:
                    raise InputError(f"{path}: member {info.filename!r} inflates past the {info.file_size} bytes it declares: refused as a zip bomb")
                if total > budget_bytes:
                    raise InputError(f"{path}: unpacks to more than the budget of {budget_bytes / 2**30:.1f} GiB: refused as a zip bomb")
                sink.write(block)


@contextmanager
def unpacked_archive(path: Path, *, budget_bytes: int | None = None, temp_dir: Path | None = None) -> Iterator[Path]:
    """The archive unpacked into <temp>/trunkseg-zip-*/<archive name without .zip>/ for the block; removed after it.

    `budget_bytes`: at most this much unpacked (default DEFAULT_BUDGET_BYTES); `temp_dir`: default the system's (TMPDIR).
    """
    path = Path(path)
    budget_bytes = DEFAULT_BUDGET_BYTES if budget_bytes is None else budget_bytes
    folder = Path(tempfile.mkdtemp(prefix="trunkseg-zip-", dir=temp_dir))
    try:
        root = folder / (path.name[: -len(".zip")] or "archive")
        root.mkdir()
        try:
            with zipfile.ZipFile(path) as archive:
                files = check_archive(archive, path, budget_bytes=budget_bytes, free_bytes=shutil.disk_usage(folder).free)
                _unpack(archive, files, root, path, budget_bytes=budget_bytes)
        except FileExistsError as error:
            raise InputError(f"{path}: member {Path(error.filename).relative_to(root)} appears twice: refused") from None
        except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError, ValueError) as error:
            raise InputError(f"{path}: not a readable .zip archive ({' '.join(str(error).split())[:160]})") from None
        except OSError as error:
            raise InputError(f"{path}: cannot unpack ({error.strerror or error})") from None
        yield root
    finally:
        shutil.rmtree(folder)
