"""The compiled C kernels (``csrc/spmm.c``): built on first use, cached per user, loaded with ctypes.

On the first call of :func:`get_library` the C source shipped in the package is compiled with the
system C compiler (``$SPARSEFORGE_CC``, else ``$CC``, else ``cc``) and the flags in
:data:`CFLAGS` into a shared library in the cache directory (``$SPARSEFORGE_CACHE``, else
``$XDG_CACHE_HOME/sparseforge``, else ``~/.cache/sparseforge``). The file name holds a hash of
the source, the flags, the compiler's version line and the CPU's feature flags, so a changed
source, compiler or machine gets its own build. The library is written to a temporary file and
moved into place with ``os.replace``, so concurrent first uses (pytest-xdist, several processes)
are safe: each builds its own temporary file and the last rename wins with identical content.

If no compiler is found or the build fails, :func:`get_library` returns ``None`` after one
one-line warning, and :func:`native_reason` says why; :mod:`.kernels` then uses the Numba kernels
(and without those, dense ``F.linear``). ``SPARSEFORGE_NATIVE=0`` disables the C kernels.

Threads: the library runs its own small pthread pool (no OpenMP). The calling thread claims row
chunks from the same atomic counter as the workers and waits only for chunks a worker actually
took, so on a busy machine a worker that is not scheduled in time costs nothing. An OpenMP
region in its place (even one sharing PyTorch's libgomp pool) waits at its barrier for every
thread; measured on the loaded 2-core box (load ~4.5): 4 sparse layers took 48 ms with OpenMP
vs 6.6 ms with this pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path


__all__ = ["CFLAGS", "SOURCE", "cache_dir", "compiler_command", "get_library", "native_available", "native_reason", "build_library", "NativeBuildError"]

#: The kernel source shipped with the package.
SOURCE = Path(__file__).with_name("csrc") / "spmm.c"
#: Compiler flags (a list, appended after the compiler command).
CFLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=gnu11", "-fno-strict-aliasing"]
#: ABI version the Python side expects (``sf_abi_version()`` in the C source).
ABI = 4
#: Seconds a compile may take before it is abandoned.
COMPILE_TIMEOUT_S = 180.0

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded (message is one line)."""


def cache_dir() -> Path:
    """Directory holding compiled kernels: ``$SPARSEFORGE_CACHE`` or ``~/.cache/sparseforge``."""
    env = os.environ.get("SPARSEFORGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparseforge"


def compiler_command() -> list[str]:
    """The C compiler command: ``$SPARSEFORGE_CC``, else ``$CC``, else ``cc`` (split like a shell)."""
    return shlex.split(os.environ.get("SPARSEFORGE_CC") or os.environ.get("CC") or "cc")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(cmd: list[str]) -> str:
    out = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=30, check=True)
    return (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else ""


def build_library(compiler: list[str] | None = None, directory: Path | None = None) -> Path:
    """Compile :data:`SOURCE` (if not cached yet) and return the path of the shared library.

    Raises :class:`NativeBuildError` (one-line message) when the compiler is missing or fails.
    """
    cmd = list(compiler) if compiler is not None else compiler_command()
    if not cmd or shutil.which(cmd[0]) is None:
        raise NativeBuildError(f"C compiler {cmd[0] if cmd else '<empty>'!r} not found (set SPARSEFORGE_CC or CC)")
    try:
        version = _compiler_version(cmd)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"C compiler {cmd[0]!r} does not run: {type(exc).__name__}") from None
    src = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([src, " ".join(cmd + CFLAGS).encode(), version.encode(), _cpu_flags().encode(),
                                     platform.machine().encode(), str(ABI).encode()])).hexdigest()[:20]
    out_dir = Path(directory) if directory is not None else cache_dir()
    target = out_dir / f"spmm-{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeBuildError(f"cannot create cache directory {str(out_dir)!r}: {exc.strerror}") from None
    fd, tmp = tempfile.mkstemp(prefix=f".spmm-{key}-", suffix=".so.tmp", dir=out_dir)
    os.close(fd)
    try:
        res = subprocess.run([*cmd, *CFLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        if res.returncode != 0:
            first = next((ln for ln in res.stderr.splitlines() if "error" in ln), res.stderr.strip().splitlines()[0] if res.stderr.strip() else "")
            raise NativeBuildError(f"compiling {SOURCE.name} failed (exit {res.returncode}): {first[:200]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"compiling {SOURCE.name} took over {COMPILE_TIMEOUT_S:.0f} s") from None
    except OSError as exc:
        raise NativeBuildError(f"compiling {SOURCE.name} failed: {type(exc).__name__}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int


def _declare(lib: ctypes.CDLL) -> None:
    for suffix in ("u16", "i32"):
        getattr(lib, f"sf_csr_spmv_{suffix}").argtypes = [_P, _P, _P, _P, _P, _P, _INT, _INT, _INT]
        getattr(lib, f"sf_csr_spmm_{suffix}").argtypes = [_P, _P, _P, _P, _I64, _P, _P, _INT, _INT]
        getattr(lib, f"sf_csr_spmm_blk_{suffix}").argtypes = [_P, _P, _P, _P, _I64, _P, _P, _INT, _INT, _I64, _I64, _I64]
    lib.sf_bitmask_spmv.argtypes = [_P, _I64, _P, _P, _I64, _P, _P, _P, _INT, _INT, _INT]
    lib.sf_bitmask_spmm.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _P, _INT, _INT]
    lib.sf_bitmask_spmm.restype = _INT
    lib.sf_transpose.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _I64, _INT]
    lib.sf_transpose.restype = None
    for name in ("sf_csr_spmv_u16", "sf_csr_spmv_i32", "sf_csr_spmm_u16", "sf_csr_spmm_i32",
                 "sf_csr_spmm_blk_u16", "sf_csr_spmm_blk_i32", "sf_bitmask_spmv"):
        getattr(lib, name).restype = None


def load_library(path: Path) -> ctypes.CDLL:
    """Load a built library and check its ABI version; raises :class:`NativeBuildError`."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeBuildError(f"cannot load {path.name}: {exc}") from None
    lib.sf_abi_version.restype = _INT
    if lib.sf_abi_version() != ABI:
        raise NativeBuildError(f"{path.name} has ABI {lib.sf_abi_version()}, expected {ABI}")
    lib.sf_init()
    _declare(lib)
    return lib


def get_library() -> ctypes.CDLL | None:
    """The loaded C kernels, building them on first use; ``None`` (after one warning) if impossible."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        if os.environ.get("SPARSEFORGE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
            _reason = "disabled by SPARSEFORGE_NATIVE=0"
        else:
            try:
                _lib = load_library(build_library())
            except NativeBuildError as exc:
                _reason = str(exc)
            except Exception as exc:  # never let a build problem crash inference
                _reason = f"{type(exc).__name__}: {exc}"
            if _lib is None:
                warnings.warn(f"sparseforge: C kernels unavailable, using the Numba kernels instead: {_reason}", RuntimeWarning, stacklevel=3)
        _tried = True
        return _lib


def native_available() -> bool:
    """Whether the C kernels are (or can be built and) loaded in this process."""
    return get_library() is not None


def native_reason() -> str | None:
    """One line saying why the C kernels are unavailable, or ``None`` if they are loaded."""
    get_library()
    return _reason


def _reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`get_library` call builds/loads again."""
    global _lib, _reason, _tried
    with _lock:
        _lib, _reason, _tried = None, None, False
