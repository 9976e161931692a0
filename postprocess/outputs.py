"""All or nothing: a case's output files are staged under temporary names and renamed together at the end.

    with StagedOutputs() as staged:
        write_label_map(labels, geometry, staged.path_for(mask_path))
        staged.write_bytes(png_path, png)
    # here every file is in place (mode 0644); after an exception none of them is

A temporary name is `.partial-<random>-<name>` beside its target (same file system, so the rename is
atomic) and keeps the target's suffixes, which is how SimpleITK picks a writer.
"""

from __future__ import annotations

import os
from pathlib import Path

from common.atomic import temporary_path_for
from common.errors import OutputError


class StagedOutputs:
    def __init__(self) -> None:
        self._pending: list[tuple[Path, Path]] = []

    def path_for(self, final: Path) -> Path:
        """A temporary path to write `final` to; it becomes `final` when the block ends without an error."""
        final = Path(final)
        temp = temporary_path_for(final)
        self._pending.append((temp, final))
        return temp

    def write_bytes(self, final: Path, data: bytes) -> None:
        temp = self.path_for(final)
        try:
            temp.write_bytes(data)
        except OSError as error:
            raise OutputError(f"{final}: cannot write ({error.strerror})") from None

    def write_text(self, final: Path, text: str) -> None:
        self.write_bytes(final, text.encode("utf-8"))

    def discard(self) -> None:
        for temp, _ in self._pending:
            temp.unlink(missing_ok=True)
        self._pending.clear()

    def commit(self) -> None:
        done: list[Path] = []
        try:
            for temp, final in self._pending:
                if not temp.is_file():
                    raise OutputError(f"{final}: was staged but never written")
                os.chmod(temp, 0o644)  # readers of the output are often another user
                os.replace(temp, final)
                done.append(final)
        except OSError as error:
            for final in done:
                final.unlink(missing_ok=True)
            self.discard()
            raise OutputError(f"cannot move the outputs into place ({error})") from None
        except OutputError:
            for final in done:
                final.unlink(missing_ok=True)
            self.discard()
            raise
        self._pending.clear()

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
        return False


def check_output_writable(output_dir: Path) -> None:
    """Fail before any work when the output folder cannot be created or written."""
    probe = output_dir / f".probe-{os.getpid()}"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise OutputError(f"{output_dir}: output folder is not writable ({error.strerror})") from None


def list_files(root: Path) -> set[Path]:
    return {Path(folder) / name for folder, dirs, files in os.walk(root) for name in files + dirs}


def remove_new_files(root: Path, before: set[Path]) -> None:
    """Remove what a failed case left under `root` (files first, then its emptied folders)."""
    for path in sorted(list_files(root) - before, key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink(missing_ok=True)
