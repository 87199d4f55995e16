"""Pretrained transformers in and out of one-shot pruning: local folders only, nothing downloaded.

* :func:`load_transformer` reads a folder as ``save_pretrained`` writes it (``config.json``,
  weights, tokenizer files) with ``local_files_only=True`` and tells a decoder (causal LM) from
  an encoder;
* :func:`calibration_ids` cuts seeded random windows of token ids out of a text file (the
  calibration data of :func:`~sparseforge.oneshot.prune_model`); :func:`text_windows` cuts
  consecutive ones (for perplexity);
* :func:`save_pruned` writes the pruned model, its tokenizer, the masks (safetensors, with a
  CRC-32 of every mask) and the report (JSON) into a temporary folder beside the output folder,
  then renames it into place, so a half-written model is never found at the output path;
  :func:`load_masks` reads the masks back, checked. With ``packed=True`` the pruned layers,
  converted for fast CPU inference, are written into the same temporary folder
  (:data:`~sparseforge.oneshot.packed.PACKED_FILE`), and :func:`sparseforge.oneshot.load` loads
  the folder with them in place.

Temporary folders are named ``.NAME.sftmp-PID-...`` like :mod:`sparseforge.fileio`'s temporary
files; those of processes that no longer run are removed by the next save of ``NAME``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_int, check_seed
from ..fileio import (
    TEMP_MARK,
    check_input_file,
    checksum_table,
    describe_os_error,
    describe_read_error,
    pid_alive,
    verify_checksums,
)
from ..masks import MaskState

if TYPE_CHECKING:
    from .driver import OneShotReport

__all__ = [
    "MASKS_FILE",
    "REPORT_FILE",
    "calibration_ids",
    "check_pruned_out",
    "load_masks",
    "load_transformer",
    "save_pruned",
    "text_windows",
]

#: The masks of a pruned model's folder (safetensors, one bool tensor per pruned weight).
MASKS_FILE = "sparseforge_masks.safetensors"
#: The report of a pruned model's folder (JSON: what ``OneShotReport.to_dict()`` holds, plus file sizes).
REPORT_FILE = "sparseforge_report.json"

_CHECKSUM_KEY = "sparseforge.tensor_crc32"
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_EXPECTED = "a transformer folder as save_pretrained writes it (config.json, weights such as model.safetensors, and tokenizer files)"


def _transformers() -> Any:
    """The ``transformers`` package (the [llm] extra), or a one-line error saying how to get it."""
    try:
        module = importlib.import_module("transformers")
    except ImportError:
        raise SparseforgeError(
            "loading a pretrained transformer needs the transformers package; install sparseforge[llm]"
        ) from None
    return module


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' progress bars and warnings off (results and errors are ours to report)."""
    logging = importlib.import_module("transformers.utils.logging")
    bars = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def _kind(config: Any) -> str:
    """``"decoder"`` when the folder holds a causal LM, else ``"encoder"``."""
    if getattr(config, "is_encoder_decoder", False):
        raise SparseforgeError(
            f"model type {config.model_type!r} is an encoder-decoder; allowed: a decoder (causal LM) or an encoder"
        )
    architectures = getattr(config, "architectures", None) or []
    if architectures:
        return "decoder" if any("CausalLM" in a or "LMHeadModel" in a for a in architectures) else "encoder"
    names = importlib.import_module("transformers.models.auto.modeling_auto")
    causal = config.model_type in names.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    masked = config.model_type in names.MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return "decoder" if causal and (not masked or getattr(config, "is_decoder", False)) else "encoder"


def check_model_dir(model_dir: str | os.PathLike[str], what: str = "model folder") -> Path:
    """``model_dir`` as a ``Path`` if it looks like a saved transformer, else a one-line error."""
    path = Path(model_dir)
    if not path.exists():
        raise SparseforgeError(f"{what} {str(path)!r} does not exist; expected {_EXPECTED}")
    if not path.is_dir():
        raise SparseforgeError(f"{what} {str(path)!r} is a file; expected {_EXPECTED}")
    if not (path / "config.json").is_file():
        raise SparseforgeError(f"{what} {str(path)!r} has no config.json; expected {_EXPECTED}")
    if not any((path / name).is_file() for name in _WEIGHT_FILES):
        raise SparseforgeError(
            f"{what} {str(path)!r} has no weights ({', '.join(_WEIGHT_FILES[::2])}); expected {_EXPECTED}"
        )
    return path


def load_transformer(model_dir: str | os.PathLike[str], *, what: str = "model folder") -> tuple[nn.Module, Any, str]:
    """``(model, tokenizer, kind)`` from a local folder; ``kind`` is ``"decoder"`` or ``"encoder"``.

    A decoder (its config names a ``...ForCausalLM`` / ``...LMHeadModel`` architecture) is
    loaded with ``AutoModelForCausalLM``, an encoder with ``AutoModel`` (no task head). Nothing
    is downloaded and no code from the folder runs (``trust_remote_code=False``). The model is
    in eval mode, in the dtype it was saved in. A folder that is not a transformer, or whose
    files cannot be read, is a one-line :class:`SparseforgeError` saying what was expected.
    """
    path = check_model_dir(model_dir, what)
    tf = _transformers()
    source = f"{what} {str(path)!r}"
    with _quiet_transformers():
        try:
            config = tf.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise SparseforgeError(
                f"{source}: config.json cannot be read ({_first_line(exc)}); expected {_EXPECTED}"
            ) from None
        kind = _kind(config)
        auto = tf.AutoModelForCausalLM if kind == "decoder" else tf.AutoModel
        try:
            model = auto.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise SparseforgeError(f"{source}: the weights cannot be loaded ({_first_line(exc)})") from None
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
        except Exception as exc:
            raise SparseforgeError(
                f"{source}: no tokenizer can be loaded ({_first_line(exc)}); expected {_EXPECTED}"
            ) from None
    if not isinstance(model, nn.Module) or not callable(tokenizer):
        raise SparseforgeError(f"{source} did not load as a PyTorch model with a tokenizer; expected {_EXPECTED}")
    model.eval()
    return model, tokenizer, kind


# -- token windows -----------------------------------------------------------------------------


def _token_ids(tokenizer: Any, text_file: str | os.PathLike[str], what: str) -> tuple[Path, torch.Tensor]:
    """The whole text of ``text_file`` tokenized once (no special tokens), as a 1-D LongTensor."""
    path = check_input_file(text_file, what)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SparseforgeError(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise describe_os_error(exc, path, what) from None
    with _quiet_transformers():  # no warning that the text is longer than the model's maximum length
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return path, torch.tensor(ids, dtype=torch.long).reshape(-1)


def _enough(path: Path, ids: torch.Tensor, samples: int, seqlen: int, what: str) -> None:
    need = samples * seqlen
    if ids.numel() < need:
        raise SparseforgeError(
            f"{what} {str(path)!r} has {ids.numel()} tokens; samples x seqlen = {samples} x {seqlen} = {need} needed"
        )


def calibration_ids(
    tokenizer: Any, text_file: str | os.PathLike[str], samples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens of the text, a LongTensor ``(samples, seqlen)``.

    The text is tokenized once; window starts are drawn uniformly (seeded by ``seed``, the same
    windows on every machine), as SparseGPT and Wanda draw theirs. The text must hold at least
    ``samples * seqlen`` tokens (else a one-line error with the numbers).
    """
    samples = check_int(samples, "samples", minimum=1)
    seqlen = check_int(seqlen, "seqlen", minimum=1)
    seed = check_seed(seed)
    what = "calibration text"
    path, ids = _token_ids(tokenizer, text_file, what)
    _enough(path, ids, samples, seqlen, what)
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (samples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def text_windows(tokenizer: Any, text_file: str | os.PathLike[str], samples: int, seqlen: int) -> torch.Tensor:
    """The first ``samples`` consecutive windows of ``seqlen`` tokens of the text, ``(samples, seqlen)``."""
    samples = check_int(samples, "samples", minimum=1)
    seqlen = check_int(seqlen, "seqlen", minimum=1)
    what = "text"
    path, ids = _token_ids(tokenizer, text_file, what)
    _enough(path, ids, samples, seqlen, what)
    return ids[: samples * seqlen].reshape(samples, seqlen).clone()


# -- the output folder ----------------------------------------------------------------------------


def check_pruned_out(out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Check, before any work, that a pruned model can be saved into folder ``out_dir``.

    Refused with a one-line error: an existing file; an existing folder without ``overwrite``;
    with ``overwrite``, an existing folder that is neither empty nor a folder this module wrote
    (no ``sparseforge_report.json``: an arbitrary folder is never deleted); a path whose nearest
    existing parent is not a writable folder. Nothing is created.
    """
    path = Path(out_dir)
    what = "output folder"
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise SparseforgeError(f"{what} {str(path)!r} exists and is not a folder; allowed: a new folder")
        if not overwrite:
            raise SparseforgeError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
        try:
            entries = list(path.iterdir())
        except OSError as exc:
            raise describe_os_error(exc, path, what) from None
        if entries and not (path / REPORT_FILE).is_file():
            raise SparseforgeError(
                f"{what} {str(path)!r} is not empty and holds no {REPORT_FILE}, so it is not a pruned model "
                "sparseforge wrote; it is never replaced: choose another folder"
            )
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise SparseforgeError(f"{what} {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SparseforgeError(f"{what} {str(path)!r}: permission denied (cannot write in {str(parent)!r})")
    return path


def _temp_dir_pattern(path: Path) -> re.Pattern[str]:
    return re.compile(re.escape(f".{path.name}{TEMP_MARK}") + r"(\d+)-(new|old)-[^/]*$")


def clean_stale_temp_dirs(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary folders of ``out_dir`` left by processes that no longer run.

    A new, unfinished output is deleted. An old output moved aside by an overwrite that was
    killed between its two renames is moved back when ``out_dir`` is missing, else deleted.
    """
    path = Path(out_dir)
    pattern = _temp_dir_pattern(path)
    removed: list[Path] = []
    try:
        entries = sorted(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if not match or pid_alive(int(match.group(1))):
            continue
        try:
            if match.group(2) == "old" and not path.exists():
                os.rename(entry, path)
                continue
            shutil.rmtree(entry)
            removed.append(entry)
        except OSError:
            pass
    return removed


def _finish_tree(folder: Path) -> None:
    """Give every file and the folder the usual umask-derived mode, and flush them to disk."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)  # mkdtemp makes 0700; some writers make their files 0600
    for file in folder.rglob("*"):
        if file.is_file():
            os.chmod(file, 0o666 & ~umask)
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
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


def save_masks(path: str | os.PathLike[str], masks: MaskState) -> Path:
    """Write ``masks`` as a safetensors file with a CRC-32 of every mask and the target sparsities."""
    from safetensors.torch import save_file

    tensors = {name: mask.detach().cpu().contiguous().clone() for name, mask in masks.items()}
    meta = {
        "sparseforge": "1",
        "masks": "1",
        "step": str(masks.step),
        "targets": json.dumps(masks.targets, sort_keys=True),
        _CHECKSUM_KEY: json.dumps(checksum_table(tensors), sort_keys=True),
    }
    save_file(tensors, str(path), metadata=meta)
    return Path(path)


def load_masks(model_dir: str | os.PathLike[str]) -> MaskState:
    """The masks saved by :func:`save_pruned` in ``model_dir`` (or a masks file), every CRC-32 checked."""
    path = Path(model_dir)
    if path.is_dir():
        path = path / MASKS_FILE
    what = "masks file"
    path = check_input_file(path, what)
    source = f"{what} {str(path)!r}"
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        table = json.loads(meta[_CHECKSUM_KEY]) if _CHECKSUM_KEY in meta else None
        targets = json.loads(meta.get("targets", "{}"))
        step = int(meta.get("step", 0))
    except Exception as exc:
        raise SparseforgeError(f"{source} cannot be read ({describe_read_error(exc)})") from None
    if table is None:
        raise SparseforgeError(f"{source} has no checksum table; it was not written by sparseforge")
    verify_checksums(tensors, table, source, lambda name: f"mask {name!r}")
    bad = [name for name, t in tensors.items() if t.dtype != torch.bool]
    if bad:
        raise SparseforgeError(f"{source}: mask {bad[0]!r} has dtype {tensors[bad[0]].dtype}; allowed: torch.bool")
    return MaskState.from_state_dict({"masks": tensors, "step": step, "targets": targets})


def _save_model(model: nn.Module, folder: Path) -> None:
    save = getattr(model, "save_pretrained", None)
    if not callable(save):
        raise SparseforgeError(f"a {type(model).__name__} has no save_pretrained; allowed: a transformers model")
    try:
        accepts_safe = "safe_serialization" in inspect.signature(save).parameters
    except (TypeError, ValueError):
        accepts_safe = False
    # transformers 5 always writes safetensors (the argument is gone); 4.x is asked to
    save(str(folder), **({"safe_serialization": True} if accepts_safe else {}))


def _weights_bytes(sizes: dict[str, int]) -> int:
    """Bytes of the model's own weight files (``model*.safetensors``, ``pytorch_model*.bin``) among ``sizes``."""
    return sum(
        n for name, n in sizes.items() if re.fullmatch(r"(model.*\.safetensors|pytorch_model.*\.bin)", Path(name).name)
    )


def write_folder(path: Path, write: Callable[[Path], None], *, what: str = "output folder") -> Path:
    """Call ``write(tmp)`` on a new temporary folder beside ``path``, then rename it to ``path``: all or nothing.

    Stale temporary folders of processes that no longer run are removed first; every file is
    flushed to disk before the rename; an existing ``path`` (the caller decided it may be
    replaced) is renamed aside, the new folder renamed in, and the old one deleted, or moved back
    if anything fails in between. On any error or interrupt the temporary folder is deleted.
    File-system errors are one-line :class:`SparseforgeError` messages naming ``what``.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise describe_os_error(exc, path.parent, what) from None
    clean_stale_temp_dirs(path)
    prefix = f".{path.name}{TEMP_MARK}{os.getpid()}-"
    try:
        tmp = Path(tempfile.mkdtemp(prefix=prefix + "new-", dir=path.parent))
    except OSError as exc:
        raise describe_os_error(exc, path, what) from None
    old: Path | None = None
    try:
        write(tmp)
        _finish_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=prefix + "old-", dir=path.parent))
            os.rename(path, old)  # onto the empty folder just made: a unique name, atomically
        os.rename(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise describe_os_error(exc, path, what) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if path.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                try:
                    os.rename(old, path)
                except OSError:
                    pass
    return path


def save_pruned(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    report: OneShotReport,
    *,
    overwrite: bool = False,
    packed: bool = False,
    batch_sizes: Sequence[int] | None = None,
    autotune: bool = True,
) -> Path:
    """Save a pruned transformer into the folder ``out_dir``, all or nothing; return its path.

    The folder gets what ``save_pretrained`` writes (safetensors weights, config, tokenizer), the
    masks (:data:`MASKS_FILE`, read back by :func:`load_masks`) and the report
    (:data:`REPORT_FILE`: ``report.to_dict()``, the size in bytes of every other file under
    ``"files"`` and of the model's weight files under ``"weights_bytes"``).

    ``packed=True`` also writes the pruned layers converted for fast CPU inference
    (:data:`~sparseforge.oneshot.packed.PACKED_FILE`, see :func:`sparseforge.oneshot.load`):
    :func:`sparseforge.inference.convert` tunes them for ``batch_sizes`` (rows per call, batch x
    tokens; default :func:`~sparseforge.oneshot.packed.default_batch_sizes` of the model's kind)
    by measurement (``autotune=True``) or by its rule. The report's ``"packed"`` entry holds the
    file, the batch sizes, each layer's format and plan, the notes of convert, the file's size
    and the size of the same layers as dense float32 weights. The pruned layers must be float32
    on the CPU (checked before anything is written); ``batch_sizes`` and ``autotune`` need
    ``packed=True``. ``model`` is never changed (copies of its layers are converted). All of it is
    written into a temporary folder ``.NAME.sftmp-PID-new-...`` beside ``out_dir``, flushed to
    disk, then renamed to ``out_dir``. An existing ``out_dir`` is refused unless ``overwrite``
    (and even then only an empty folder or one this function wrote, see :func:`check_pruned_out`):
    it is renamed aside, the new folder renamed in, and the old one deleted; if anything fails in
    between, the old folder is moved back. On any error or interrupt the temporary folder is
    deleted, so ``out_dir`` never holds a half-written model.
    """
    path = check_pruned_out(out_dir, overwrite=overwrite)
    what = "output folder"
    if not isinstance(packed, bool):
        raise SparseforgeError(f"packed={packed!r} is not allowed; allowed: True or False")
    if not packed and (batch_sizes is not None or autotune is not True):
        raise SparseforgeError("batch_sizes and autotune tune the packed layers; allowed: pass them with packed=True")
    pack = None
    if packed:
        from .packed import check_batch_sizes, default_batch_sizes, model_kind, pack_layers

        sizes_tuned = (
            check_batch_sizes(batch_sizes) if batch_sizes is not None else default_batch_sizes(model_kind(model))
        )
        pack = pack_layers(model, report.masks.names(), sizes_tuned, autotune=autotune)

    def write(tmp: Path) -> None:
        with _quiet_transformers():
            _save_model(model, tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        save_masks(tmp / MASKS_FILE, report.masks)
        packed_entry = None
        if pack is not None:
            from ..inference.serialization import save_converted
            from .packed import PACKED_FILE, dense_bytes

            save_converted(tmp / PACKED_FILE, pack.layers, layers_only=True)
            packed_entry = {
                "file": PACKED_FILE,
                "batch_sizes": list(pack.report.batch_sizes),
                "autotune": pack.report.autotune,
                "sparse_layers": len(pack.report.sparse_layers),
                "layers": {
                    d.name: {"action": d.action, "format": d.format, "plan": d.plan, "reason": d.reason}
                    for d in pack.report.layers
                },
                "notes": pack.notes,
                "bytes": (tmp / PACKED_FILE).stat().st_size,
                "dense_bytes": dense_bytes(pack.report, pack.layers),
            }
        sizes = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        payload = {
            **report.to_dict(),
            "masks_file": MASKS_FILE,
            "files": sizes,
            "weights_bytes": _weights_bytes(sizes),
            "packed": packed_entry,
        }
        (tmp / REPORT_FILE).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

    return write_folder(path, write, what=what)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
