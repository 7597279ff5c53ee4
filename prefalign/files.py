"""Writing files and folders atomically: into a temporary name beside the target, renamed into place when
complete, so a crash mid-write leaves the previous version whole (or nothing), never a torn file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def _staged(staging: Path, target: Path) -> Iterator[Path]:
    """Yield `staging`; when the block completes it replaces `target`, and it never outlives the block."""
    try:
        yield staging
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()


def atomic_folder(target: str | Path) -> contextlib.AbstractContextManager[Path]:
    """An empty staging folder beside `target`; on success it replaces `target` (a folder), on an error it is
    removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    return _staged(Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent)), target)


def atomic_file(target: str | Path) -> contextlib.AbstractContextManager[Path]:
    """A staging path beside `target` (its suffix kept, for writers that go by it); on success the written
    file replaces `target`, on an error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=target.suffix, dir=target.parent)
    os.close(handle)
    return _staged(Path(name), target)
