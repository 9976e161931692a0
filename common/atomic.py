"""Atomic writes: a file appears whole under its name, or not at all.

    with atomic_path(out / "case.mha") as temp:   # a unique temporary name beside the target
        sitk.WriteImage(image, str(temp))         # keeps the target's suffixes: SimpleITK picks the writer by them
    write_json_atomically(out / "results.json", results)

The temporary file is `.partial-<random>-<name>` in the target's folder (same file system, so the rename
is atomic) and is removed when the block raises, whatever it raises (an alarm, an interrupt). The file
ends with mode 0644 (readers of outputs are often another user). The file system's error (an OSError with
an errno) while creating, renaming or writing is an OutputError naming the file. Several files that must appear together: postprocess/outputs.py.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from common.errors import OutputError

PARTIAL_PREFIX = ".partial-"


def temporary_path_for(path: Path) -> Path:
    """A fresh temporary name beside `path` that keeps its suffixes (`.partial-<random>-<name>`), its folder created."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{path.parent}: cannot create the output folder ({error.strerror})") from None
    return path.with_name(f"{PARTIAL_PREFIX}{secrets.token_hex(4)}-{path.name}")


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path to write `path` to; renamed to `path` when the block ends without an error, removed otherwise."""
    path = Path(path)
    temp = temporary_path_for(path)
    try:
        yield temp
        os.chmod(temp, 0o644)
        os.replace(temp, path)
        temp.unlink(missing_ok=True)  # rename() of a hard link onto the same file does nothing and keeps both names
    except OSError as error:
        temp.unlink(missing_ok=True)
        if error.errno is None:  # not the file system's answer (a TimeoutError of the time budget): as it is
            raise
        raise OutputError(f"{path}: cannot write ({error.strerror})") from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """`data` under `path`, on the disk before the rename makes it count (a node that loses power keeps no empty file)."""
    with atomic_path(path) as temp:
        with open(temp, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())


def write_text_atomically(path: Path, text: str) -> None:
    write_bytes_atomically(path, text.encode("utf-8"))


def write_json_atomically(path: Path, data: Any, *, indent: int = 2) -> None:
    """JSON with no NaN or infinity (a non-finite number is a bug, never a file: ValueError)."""
    write_text_atomically(path, json.dumps(data, indent=indent, allow_nan=False) + "\n")
