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

Threads: two runtimes, chosen with :func:`set_threading` or ``$SPARSEFORGE_THREADING``
(``openmp`` or ``pool``; default ``openmp`` where the compiler supports ``-fopenmp``):

* ``openmp``: each call is an OpenMP parallel region. The library is linked against
  ``libgomp.so.1``, and PyTorch has already loaded its own copy under that name, so the region runs
  on PyTorch's intra-op threads. After each of its parallel ops PyTorch's idle threads keep
  spinning for a while; a separate pool has to compete with them for the cores. Measured on the
  idle 2-core box (4 sparse 4096² layers, 90 %, batch 1, right after a dense forward): 2.55 ms
  with OpenMP vs 3.38 ms with the pool.
* ``pool``: the library's own pthread pool. The calling thread claims row chunks from the same
  atomic counter as the workers and waits only for chunks a worker actually took, so on a machine
  busy with other jobs a worker that is not scheduled in time costs nothing, while an OpenMP
  region waits at its closing barrier for every thread. On the same box at load ~4.5: 48 ms with
  OpenMP vs 6.6 ms with the pool. Use it on oversubscribed machines.

In a child of ``fork()`` the library always uses the pool (libgomp's threads do not survive a fork).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import threading
import warnings
from pathlib import Path

from ..errors import SparseforgeError
from ..fileio import atomic_write

__all__ = [
    "CFLAGS",
    "OPENMP_FLAGS",
    "THREADING_MODES",
    "SOURCE",
    "cache_dir",
    "set_threading",
    "threading_mode",
    "compiler_command",
    "get_library",
    "native_available",
    "native_reason",
    "build_library",
    "NativeBuildError",
]

#: The kernel source shipped with the package.
SOURCE = Path(__file__).with_name("csrc") / "spmm.c"
#: Compiler flags (a list, appended after the compiler command).
CFLAGS = ["-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=gnu11", "-fno-strict-aliasing"]
#: Libraries linked after the source (the portable activation epilogues use expf and nearbyintf).
LIBS = ["-lm"]
#: Added to :data:`CFLAGS` when the compiler supports OpenMP (else the build is retried without).
OPENMP_FLAGS = ["-fopenmp"]
#: ABI version the Python side expects (``sf_abi_version()`` in the C source).
ABI = 11
#: Threading runtimes of the C library (:func:`set_threading`), in the C library's numbering.
THREADING_MODES = {"pool": 0, "openmp": 1}
#: Environment variable that picks the runtime when the library is loaded.
THREADING_ENV = "SPARSEFORGE_THREADING"
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


def build_library(compiler: list[str] | None = None, directory: Path | None = None, openmp: bool = True) -> Path:
    """Compile :data:`SOURCE` (if not cached yet) and return the path of the shared library.

    With ``openmp`` the build first tries :data:`OPENMP_FLAGS` and, if that fails (a compiler
    without OpenMP), builds without them (the library then only has its pthread pool).
    Raises :class:`NativeBuildError` (one-line message) when the compiler is missing or fails.
    """
    if openmp:
        try:
            return _build(compiler, directory, OPENMP_FLAGS)
        except NativeBuildError:
            pass
    return _build(compiler, directory, [])


def _build(compiler: list[str] | None, directory: Path | None, extra: list[str]) -> Path:
    cmd = list(compiler) if compiler is not None else compiler_command()
    if not cmd or shutil.which(cmd[0]) is None:
        raise NativeBuildError(f"C compiler {cmd[0] if cmd else '<empty>'!r} not found (set SPARSEFORGE_CC or CC)")
    try:
        version = _compiler_version(cmd)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeBuildError(f"C compiler {cmd[0]!r} does not run: {type(exc).__name__}") from None
    src = SOURCE.read_bytes()
    flags = CFLAGS + extra
    key = hashlib.sha256(
        b"\0".join(
            [
                src,
                " ".join(cmd + flags + LIBS).encode(),
                version.encode(),
                _cpu_flags().encode(),
                platform.machine().encode(),
                str(ABI).encode(),
            ]
        )
    ).hexdigest()[:20]
    out_dir = Path(directory) if directory is not None else cache_dir()
    target = out_dir / f"spmm-{key}.so"
    if target.exists():
        return target
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NativeBuildError(f"cannot create cache directory {str(out_dir)!r}: {exc.strerror}") from None

    def compile_to(tmp: str) -> None:
        res = subprocess.run(
            [*cmd, *flags, str(SOURCE), "-o", tmp, *LIBS], capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S
        )
        if res.returncode != 0:
            first = next(
                (ln for ln in res.stderr.splitlines() if "error" in ln),
                res.stderr.strip().splitlines()[0] if res.stderr.strip() else "",
            )
            raise NativeBuildError(f"compiling {SOURCE.name} failed (exit {res.returncode}): {first[:200]}")

    # the one atomic-write path: a killed compile leaves a .spmm-KEY.so.sftmp-PID-* file that the
    # next build of the same library deletes
    try:
        atomic_write(target, compile_to, what="compiled kernel library")
    except subprocess.TimeoutExpired:
        raise NativeBuildError(f"compiling {SOURCE.name} took over {COMPILE_TIMEOUT_S:.0f} s") from None
    except SparseforgeError as exc:
        raise NativeBuildError(f"compiling {SOURCE.name} failed: {exc}") from None
    except OSError as exc:
        raise NativeBuildError(f"compiling {SOURCE.name} failed: {type(exc).__name__}: {exc}") from None
    return target


_P = ctypes.c_void_p
_I64 = ctypes.c_int64
_INT = ctypes.c_int
_F32 = ctypes.c_float


def _declare(lib: ctypes.CDLL) -> None:
    for suffix in ("u16", "i32"):
        getattr(lib, f"sf_csr_spmv_{suffix}").argtypes = [_P, _P, _P, _P, _P, _P, _INT, _INT, _INT, _P]
        getattr(lib, f"sf_csr_spmm_{suffix}").argtypes = [_P, _P, _P, _P, _I64, _P, _P, _INT, _INT]
        getattr(lib, f"sf_csr_spmm_blk_{suffix}").argtypes = [
            _P,
            _P,
            _P,
            _P,
            _I64,
            _P,
            _P,
            _INT,
            _INT,
            _I64,
            _I64,
            _I64,
        ]
    lib.sf_bitmask_spmv.argtypes = [_P, _I64, _P, _P, _I64, _P, _P, _P, _INT, _INT, _INT, _P]
    lib.sf_bitmask_spmm.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _P, _INT, _INT]
    lib.sf_bitmask_spmm.restype = _INT
    lib.sf_block_spmv.argtypes = [_P, _P, _P, _I64, _I64, _P, _P, _P, _INT, _INT, _P]
    lib.sf_block_spmm.argtypes = [_P, _P, _P, _I64, _I64, _P, _I64, _P, _P, _INT, _INT, _I64, _I64, _I64]
    lib.sf_insparse_dense.argtypes = [_P, _I64, _I64, _I64, _P, _F32, _P, _P, _P, _I64, _INT, _I64, _INT]
    lib.sf_insparse_dense.restype = _I64
    lib.sf_insparse_bitmask.argtypes = [_P, _P, _P, _P, _I64, _I64, _I64, _P, _F32, _P, _P, _P, _I64, _INT, _I64, _INT]
    lib.sf_insparse_bitmask.restype = _I64
    lib.sf_transpose.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _I64, _INT]
    lib.sf_transpose.restype = None
    lib.sf_pairs_spmm.argtypes = [
        *(_P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _I64, _P, _INT, _P, _INT, _INT),
        *(_P, _I64, _I64),
    ]
    lib.sf_pairs_spmm.restype = _INT
    lib.sf_nonfinite.argtypes = [_P, _I64, _I64, _I64, _INT]
    lib.sf_nonfinite.restype = _INT
    lib.sf_transpose_check.argtypes = [_P, _I64, _I64, _I64, _P, _I64, _I64, _INT]
    lib.sf_transpose_check.restype = _INT
    lib.sf_set_threading.argtypes = [_INT]
    lib.sf_set_threading.restype = _INT
    lib.sf_openmp_available.restype = _INT
    lib.sf_has_avx2.restype = _INT
    lib.sf_has_avx512.restype = _INT
    lib.sf_get_threading.restype = _INT
    for name in (
        "sf_csr_spmv_u16",
        "sf_csr_spmv_i32",
        "sf_csr_spmm_u16",
        "sf_csr_spmm_i32",
        "sf_csr_spmm_blk_u16",
        "sf_csr_spmm_blk_i32",
        "sf_bitmask_spmv",
        "sf_block_spmv",
        "sf_block_spmm",
    ):
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


def _threading_from_env() -> str:
    value = os.environ.get(THREADING_ENV, "openmp").strip().lower() or "openmp"
    if value not in THREADING_MODES:
        raise SparseforgeError(f"{THREADING_ENV}={value!r} is not allowed; allowed: {sorted(THREADING_MODES)}")
    return value


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
            mode = _threading_from_env()  # a bad value raises here, before any build
            import torch  # noqa: F401  # load PyTorch's libgomp first, so the library shares it

            try:
                _lib = load_library(build_library())
                _lib.sf_set_threading(THREADING_MODES[mode])
            except NativeBuildError as exc:
                _reason = str(exc)
            except Exception as exc:  # never let a build problem crash inference
                _reason = f"{type(exc).__name__}: {exc}"
            if _lib is None:
                warnings.warn(
                    f"sparseforge: C kernels unavailable, using the Numba kernels instead: {_reason}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        _tried = True
        return _lib


def set_threading(mode: str) -> str:
    """Pick the C kernels' threading runtime: ``"openmp"`` (PyTorch's threads) or ``"pool"``.

    Returns the runtime in effect: ``"pool"`` when OpenMP was asked for but the library was built
    without it, or in a child of ``fork()``. Raises :class:`~sparseforge.errors.SparseforgeError`
    for another name, :class:`NativeBuildError` when the C kernels are unavailable.
    """
    if mode not in THREADING_MODES:
        raise SparseforgeError(f"threading mode {mode!r} is not allowed; allowed: {sorted(THREADING_MODES)}")
    lib = get_library()
    if lib is None:
        raise NativeBuildError(f"C kernels unavailable: {_reason}")
    got = lib.sf_set_threading(THREADING_MODES[mode])
    return next(k for k, v in THREADING_MODES.items() if v == got)


def threading_mode() -> str | None:
    """The C kernels' threading runtime in effect (``"openmp"`` or ``"pool"``); ``None`` without them."""
    lib = get_library()
    if lib is None:
        return None
    got = lib.sf_get_threading()
    return next(k for k, v in THREADING_MODES.items() if v == got)


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
