"""Writing files and folders atomically: into a temporary name beside the target, renamed into place when
complete, so a crash mid-write leaves the previous version whole (or nothing), never a torn file."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from prefalign.errors import OutputError

# A staging name is the target's name behind this prefix and followed by "-" and a random part, so an
# interrupted write (kill -9: no clean-up ran) leaves something `staging_prefix` finds again.
STAGING_PREFIX = "."


def staging_prefix(name: str) -> str:
    """How the staging names of a target called `name` (a file's stem, a folder's name) begin."""
    return f"{STAGING_PREFIX}{name}-"


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
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(target.name), dir=target.parent))
    staging.chmod(0o777 & ~_umask())  # as an ordinary new folder (mkdtemp makes it private)
    return _staged(staging, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_file(target: str | Path) -> contextlib.AbstractContextManager[Path]:
    """A staging path beside `target` (its suffix kept, for writers that go by it); on success the written
    file replaces `target`, on an error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = staging_prefix(target.stem)
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=target.suffix, dir=target.parent)
    os.close(handle)
    os.chmod(name, 0o666 & ~_umask())  # as an ordinary new file (mkstemp makes it private)
    return _staged(Path(name), target)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


@contextlib.contextmanager
def writing(path: str | Path, elsewhere: str) -> Iterator[None]:
    """Turn a failed write in the block (a read-only folder, a full disk, a file where a folder should be)
    into an OutputError naming the path and what to do; `elsewhere` says how to write somewhere else (e.g.
    "set train.output_dir to another folder"). Any other error passes through untouched."""
    try:
        yield
    except OutputError:
        raise
    except Exception as error:
        code = _os_error_code(error)
        if code is None:
            raise
        raise OutputError(_message(error, code, Path(path), elsewhere)) from error


def _os_error_code(error: Exception) -> int | None:
    """The errno of an OSError, or of the I/O error safetensors (and so transformers' save_pretrained)
    reports as "... (os error 28)"; None for anything else."""
    if isinstance(error, OSError):
        return error.errno if error.errno is not None else -1
    if type(error).__name__ == "SafetensorError":
        found = re.search(r"\(os error (\d+)\)", str(error))
        return int(found.group(1)) if found else None
    return None


def _message(error: Exception, code: int, path: Path, elsewhere: str) -> str:
    filename = getattr(error, "filename", None)
    where = Path(filename) if isinstance(filename, (str, os.PathLike)) and str(filename) else path
    try:
        inside = where.relative_to(path).parts
    except ValueError:
        inside = (where.name,)
    if any(part.startswith(STAGING_PREFIX) for part in inside):  # a staging name means nothing to users
        where = path
    if code in _FULL:
        reason, fix = "the disk is full (or over quota)", "free some space"
    elif code in _NOT_WRITABLE:
        reason, fix = "it is not writable (permission denied or a read-only file system)", "make it writable"
    else:
        reason, fix = getattr(error, "strerror", None) or str(error), "check the path"
    return f"cannot write {str(where)!r}: {reason}; {fix}, or {elsewhere}."
