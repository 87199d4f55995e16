"""Files the project reads and writes: one atomic-write helper and one set of path checks.

Every file sparseforge writes goes through :func:`atomic_write`: the content is written to a
temporary file beside the target and moved into place with ``os.replace``, so a crash or Ctrl-C
never leaves half a file. Temporary files are named ``.NAME.sftmp-PID-RANDOM``: recognisable, and
tied to the process that made them. A process killed with SIGKILL cannot remove its own, so every
write of ``NAME`` first deletes the ``.NAME.sftmp-*`` files of processes that no longer exist.

The checks (:func:`check_output_file`, :func:`check_output_dir`, :func:`check_input_file`) run
*before* any work, and file-system errors become one-line :class:`SparseforgeError` messages that
name the path and what is wrong ("is a directory", "permission denied", "no such directory").
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import SparseforgeError

__all__ = [
    "TEMP_MARK",
    "atomic_write",
    "check_input_file",
    "check_output_dir",
    "check_output_file",
    "clean_stale_temps",
    "describe_os_error",
]

#: Marks sparseforge's temporary files: ``.NAME`` + TEMP_MARK + ``PID-RANDOM``.
TEMP_MARK = ".sftmp-"

_REASONS = {
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "a part of the path is not a directory",
    errno.ENOENT: "no such file or directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "file name too long",
}


def describe_os_error(exc: OSError, path: str | os.PathLike[str], what: str = "file") -> SparseforgeError:
    """A one-line :class:`SparseforgeError` for an ``OSError`` met while using ``path``."""
    reason = _REASONS.get(exc.errno or -1) or (exc.strerror or type(exc).__name__).lower()
    return SparseforgeError(f"{what} {str(path)!r}: {reason}")


def check_input_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` as a ``Path`` if it is a readable regular file, else raise a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise SparseforgeError(f"{what} {str(path)!r} is a directory; allowed: a file")
    if not path.exists():
        parent = path.parent
        if not parent.exists():
            raise SparseforgeError(f"{what} {str(path)!r} does not exist (no such directory {str(parent)!r})")
        raise SparseforgeError(f"{what} {str(path)!r} does not exist")
    if not path.is_file():
        raise SparseforgeError(f"{what} {str(path)!r} is not a regular file")
    if not os.access(path, os.R_OK):
        raise SparseforgeError(f"{what} {str(path)!r}: permission denied (not readable)")
    return path


def _check_writable_dir(folder: Path, what: str, target: Path) -> None:
    if not folder.exists():
        raise SparseforgeError(f"{what} {str(target)!r}: no such directory {str(folder)!r}")
    if not folder.is_dir():
        raise SparseforgeError(f"{what} {str(target)!r}: {str(folder)!r} is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SparseforgeError(f"{what} {str(target)!r}: permission denied (cannot write in {str(folder)!r})")


def check_output_file(
    path: str | os.PathLike[str], what: str = "output", *, suffixes: Iterable[str] | None = None
) -> Path:
    """Check, before any work, that a file can be written at ``path``; return it as a ``Path``.

    Refused with a one-line error: an existing directory, a missing or non-directory parent, a
    parent or an existing file that is not writable, and (when ``suffixes`` is given) another suffix.
    """
    path = Path(path)
    allowed = tuple(suffixes) if suffixes is not None else None
    if path.is_dir():
        raise SparseforgeError(f"{what} {str(path)!r} is a directory; allowed: a file path")
    if allowed is not None and path.suffix not in allowed:
        raise SparseforgeError(f"{what} {str(path)!r} has suffix {path.suffix!r}; allowed: {', '.join(allowed)}")
    _check_writable_dir(path.parent, what, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise SparseforgeError(f"{what} {str(path)!r}: permission denied (the existing file is not writable)")
    return path


def check_output_dir(path: str | os.PathLike[str], what: str = "output folder", *, create: bool = True) -> Path:
    """Check that ``path`` is (or, with ``create``, can become) a writable folder; return it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SparseforgeError(f"{what} {str(path)!r} is a file; allowed: a folder")
    if not path.exists():
        if not create:
            raise SparseforgeError(f"{what} {str(path)!r} does not exist")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise describe_os_error(exc, path, what) from None
    _check_writable_dir(path, what, path)
    return path


def _temp_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}{TEMP_MARK}") + r"(\d+)-[^/]*$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary files left beside ``path`` by processes that no longer run; return them."""
    path = Path(path)
    pattern = _temp_pattern(path)
    removed: list[Path] = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def atomic_write(
    path: str | os.PathLike[str], write: Callable[[str], object], *, what: str = "output"
) -> Path:
    """Call ``write(tmp_path)``, then move the temporary file onto ``path`` in one ``os.replace``.

    The parent folder must exist. Stale temporary files of ``path`` (from killed processes) are
    deleted first; on any error or interrupt the temporary file is deleted and ``path`` is left as
    it was. File-system errors are raised as one-line :class:`SparseforgeError` messages.
    """
    path = check_output_file(path, what)
    clean_stale_temps(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}-", dir=path.parent)
    except OSError as exc:
        raise describe_os_error(exc, path, what) from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)  # mkstemp creates 0600; give the file the usual umask-derived mode
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as exc:
        raise describe_os_error(exc, path, what) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
