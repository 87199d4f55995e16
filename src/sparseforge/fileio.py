"""Files the project reads and writes: one atomic-write helper and one set of path checks.

Every file sparseforge writes goes through :func:`atomic_write`: the content is written to a
temporary file beside the target and moved into place with ``os.replace``, so a crash or Ctrl-C
never leaves half a file. Temporary files are named ``.NAME.sftmp-PID-RANDOM``: recognisable, and
tied to the process that made them. A process killed with SIGKILL cannot remove its own, so every
write of ``NAME`` first deletes the ``.NAME.sftmp-*`` files of processes that no longer exist.

The checks (:func:`check_output_file`, :func:`check_output_dir`, :func:`check_input_file`) run
*before* any work, and file-system errors become one-line :class:`SparseforgeError` messages that
name the path and what is wrong ("is a directory", "permission denied", "no such directory").

Integrity: every tensor sparseforge writes (checkpoints and converted models) is stored with a
CRC-32 of its dtype, shape and raw bytes (:func:`tensor_checksum`, :func:`checksum_table`), and
loading refuses a tensor that no longer matches (:func:`verify_checksums`), so damage to a file's
header (a dtype or shape) is caught as well as damage to the data. CRC-32 detects every error
burst of up to 32 bits (so every flipped byte) and costs about as much as reading the data; it
guards against damage, not against deliberate tampering. ``layout=False`` gives the CRC-32 of the
bytes alone, the form converted-model files stored under ``sparseforge.crc32`` before.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SparseforgeError

if TYPE_CHECKING:  # torch is imported where needed, so this module loads without it
    import torch

__all__ = [
    "TEMP_MARK",
    "atomic_write",
    "check_input_file",
    "check_output_dir",
    "check_output_file",
    "checksum_table",
    "clean_stale_temps",
    "describe_os_error",
    "describe_read_error",
    "pid_alive",
    "write_text",
    "tensor_checksum",
    "verify_checksums",
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
    reason = _REASONS.get(exc.errno or -1) or exc.strerror
    if not reason:  # an OSError raised with a bare message (no errno)
        text = str(exc).strip()
        reason = text.splitlines()[0][:200] if text else type(exc).__name__
    return SparseforgeError(f"{what} {str(path)!r}: {reason.lower() if exc.errno else reason}")


def check_input_file(path: str | os.PathLike[str], what: str = "file") -> Path:
    """Return ``path`` as a ``Path`` if it is a readable regular file, else raise a one-line error."""
    path = Path(path)
    if path.is_dir():
        raise SparseforgeError(f"{what} {str(path)!r} is a directory; allowed: a file")
    if not path.exists():
        parent = path.parent
        if not parent.exists():
            raise SparseforgeError(f"{what} {str(path)!r} does not exist (no such directory {str(parent)!r})")
        if not parent.is_dir():
            raise SparseforgeError(f"{what} {str(path)!r} does not exist ({str(parent)!r} is a file, not a directory)")
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


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (the owner of a temporary file or folder) still runs."""
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
        if match and not pid_alive(int(match.group(1))):
            try:
                entry.unlink()
                removed.append(entry)
            except OSError:
                pass
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], object], *, what: str = "output") -> Path:
    """Call ``write(tmp_path)``, then move the temporary file onto ``path`` in one ``os.replace``.

    The parent folder must exist (it is not created; use :func:`check_output_dir` for that). Stale
    temporary files of ``path`` (from killed processes) are deleted first. The temporary file is
    flushed to disk before the move, so ``path`` holds either its old or its complete new content.
    On any error or interrupt the temporary file is deleted and ``path`` is left as it was.
    File-system errors (an ``OSError`` from ``write`` included) are raised as one-line
    :class:`SparseforgeError` messages naming ``what`` and ``path``.
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
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise describe_os_error(exc, path, what) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def _fsync(file: str) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable; some file systems cannot fsync a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ checksums
def tensor_checksum(tensor: torch.Tensor, *, layout: bool = True) -> int:
    """CRC-32 (an unsigned int) of ``tensor``'s raw bytes, continued over its dtype and shape.

    The bytes are those a safetensors or torch file stores, in row-major order: the native
    little-endian encoding of every element, bool as one byte. With ``layout`` (the default) the
    CRC then continues over the ASCII text ``DTYPE[SHAPE]``, e.g. ``float32[6, 4]`` or
    ``int64[]``; with ``layout=False`` it covers the bytes alone (an empty tensor gives 0).
    """
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    crc = zlib.crc32(flat.view(torch.uint8).numpy().data) if flat.numel() else 0  # .data: the array's memoryview
    if layout:
        dtype = str(tensor.dtype).removeprefix("torch.")
        crc = zlib.crc32(f"{dtype}{list(tensor.shape)}".encode("ascii"), crc)
    return crc & 0xFFFFFFFF


def checksum_table(tensors: Mapping[str, torch.Tensor], *, layout: bool = True) -> dict[str, int]:
    """``{name: tensor_checksum(tensor)}`` for every tensor, to store beside them in a file."""
    return {name: tensor_checksum(t, layout=layout) for name, t in tensors.items()}


def verify_checksums(
    tensors: Mapping[str, torch.Tensor],
    table: object,
    source: str,
    label: Callable[[str], str] | None = None,
    *,
    layout: bool = True,
) -> None:
    """Refuse, with a one-line :class:`SparseforgeError`, tensors that do not match ``table``.

    ``table`` is the stored ``{name: CRC-32}`` (as read from the file, so it is checked too);
    ``source`` names the file in the message (e.g. ``"checkpoint 'x.pt'"``); ``label`` turns a
    stored name into the words for the message (default: ``tensor 'NAME'``); ``layout`` as in
    :func:`tensor_checksum` (``False`` for tables of the bytes alone). Every tensor of
    ``tensors`` must be in ``table`` and the other way round.
    """
    label = label or (lambda name: f"tensor {name!r}")
    if not isinstance(table, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in table.items()
    ):
        raise SparseforgeError(
            f"{source}: its checksum table is not a {{name: CRC-32}} mapping (the file is corrupted)"
        )
    missing = [k for k in tensors if k not in table]
    unexpected = [k for k in table if k not in tensors]
    if missing or unexpected:
        raise SparseforgeError(
            f"{source}: tensor names differ from its checksum table (not in the table: {missing[:3]}, "
            f"not in the file: {unexpected[:3]}); the file is corrupted"
        )
    bad = [k for k, t in tensors.items() if tensor_checksum(t, layout=layout) != table[k]]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise SparseforgeError(f"{source}: {label(bad[0])} fails its checksum{more} (the file is corrupted)")


def write_text(path: str | os.PathLike[str], text: str, *, what: str = "output") -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`; returns the path."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), what=what)


def describe_read_error(exc: BaseException) -> str:
    """A short reason for a failed ``torch.load(..., weights_only=True)`` or safetensors read.

    torch's refusal of a file it will not unpickle is several lines of advice to load it unsafely;
    this keeps what went wrong, in one line.
    """
    text = str(exc).strip()
    if "Weights only load failed" in text:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if found:
            return f"it holds a Python object ({found.group(1)}) besides tensors, which is never unpickled"
        operand = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n|$)", text)
        detail = operand.group(1).strip() if operand and operand.group(1).strip() else ""
        if not detail:
            later = [
                ln.strip()
                for ln in text.splitlines()
                if ln.strip() and "WeightsUnpickler" not in ln and "Check the doc" not in ln
            ]
            detail = later[-1] if later else ""
        return "not a torch file of tensors" + (f": {detail[:80]}" if detail else "")
    return text.splitlines()[0][:160] if text else type(exc).__name__
