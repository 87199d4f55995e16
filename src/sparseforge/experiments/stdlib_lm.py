"""A small Llama-style decoder LM that sparseforge trains itself, offline, on the Python standard library.

One-shot pruning of a decoder is measured by perplexity, which needs a pretrained causal LM; none
ships with the project's dependencies and nothing is downloaded. This module makes one:

* :func:`corpus` reads the standard library's ``.py`` sources (``sysconfig``'s ``stdlib`` path;
  tests, IDLE, installed packages and other generated or demo folders left out) in sorted order
  and splits them *by file* into a training and a held-out part (a file is held out when the
  CRC-32 of its relative path is divisible by 20: fixed, about 5 % of the files, the two parts
  disjoint), each capped in characters so reading and tokenizing take seconds;
* :func:`train_tokenizer` trains a byte-level BPE (the ``tokenizers`` library) on the training
  part and wraps it as a ``transformers`` fast tokenizer;
* :func:`config_for` gives the ``LlamaConfig`` of a size: ``"tiny"`` (trains in seconds, for
  tests) or ``"small"`` (4 layers of width 256, MLP width 704: a multiple of 8, so 2:4 and 4:8
  apply to every pruned layer);
* :func:`fit` trains a ``LlamaForCausalLM`` on seeded random windows of the training tokens
  (AdamW, linear warmup then cosine decay, gradient clipping); the same seed gives bitwise the
  same weights on the same machine and thread count;
* :func:`train` does all of it and writes a normal transformer folder, all or nothing (a
  temporary folder renamed into place): ``save_pretrained``'s model and tokenizer files,
  ``heldout.txt`` (held-out text), ``calibration.txt`` (training-split text) and
  ``stdlib_lm.json`` (what was trained, the loss curve and the held-out perplexity).

The folder loads with ``AutoModelForCausalLM.from_pretrained(DIR, local_files_only=True)``,
``AutoTokenizer.from_pretrained(DIR)`` and :func:`sparseforge.oneshot.load_transformer`, and the
``llm`` commands take it (``--seqlen`` at most the model's context, 256 for ``small``)::

    python -m sparseforge.experiments.stdlib_lm --out .cache/stdlib-llama --size small
    sparseforge llm prune .cache/stdlib-llama --calibration .cache/stdlib-llama/calibration.txt \\
        --seqlen 256 --method wanda --out pruned
    sparseforge llm eval pruned --text .cache/stdlib-llama/heldout.txt --seqlen 256
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError, check_int, check_seed

__all__ = [
    "CALIBRATION_FILE",
    "HELDOUT_FILE",
    "INFO_FILE",
    "SIZES",
    "Corpus",
    "Size",
    "Trained",
    "build",
    "config_for",
    "corpus",
    "fit",
    "heldout_perplexity",
    "save",
    "train",
    "train_tokenizer",
]

#: Held-out text (whole held-out files, joined by blank lines) inside the model folder.
HELDOUT_FILE = "heldout.txt"
#: Training-split text inside the model folder, for calibration of one-shot pruning.
CALIBRATION_FILE = "calibration.txt"
#: What was trained (JSON) inside the model folder; also marks a folder this module wrote.
INFO_FILE = "stdlib_lm.json"
#: The end-of-text token: between files in training, and the tokenizer's bos / eos / pad token.
EOS = "<|endoftext|>"

_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
        "encodings",  # mostly generated code-page tables
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "site-packages",
        "test",
        "tests",
        "turtledemo",
    }
)
_HELDOUT_MODULUS = 20


@dataclass(frozen=True)
class Size:
    """Model and training sizes of one named configuration."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    seqlen: int
    batch: int
    steps: int
    lr: float
    train_chars: int
    heldout_chars: int
    calibration_chars: int


#: The named sizes: ``tiny`` for tests (seconds), ``small`` the real one (minutes on 2 cores).
SIZES: dict[str, Size] = {
    "tiny": Size(
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
        vocab=512,
        seqlen=64,
        batch=8,
        steps=150,
        lr=5e-3,
        train_chars=300_000,
        heldout_chars=60_000,
        calibration_chars=120_000,
    ),
    "small": Size(
        hidden=256,
        layers=4,
        heads=4,
        intermediate=704,
        vocab=4096,
        seqlen=256,
        batch=16,
        steps=400,
        lr=3e-3,
        train_chars=3_000_000,
        heldout_chars=400_000,
        calibration_chars=1_500_000,
    ),
}


def _size(size: str) -> Size:
    if size not in SIZES:
        raise SparseforgeError(f"size {size!r} is not known; allowed: {', '.join(SIZES)}")
    return SIZES[size]


# -- corpus ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """The standard library's sources split by file: relative paths and texts of both parts."""

    root: str
    train_files: tuple[str, ...]
    train_texts: tuple[str, ...]
    heldout_files: tuple[str, ...]
    heldout_texts: tuple[str, ...]
    skipped: tuple[str, ...] = field(default=())

    @property
    def train_chars(self) -> int:
        return sum(len(t) for t in self.train_texts)

    @property
    def heldout_chars(self) -> int:
        return sum(len(t) for t in self.heldout_texts)


def stdlib_sources(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The ``.py`` files under the standard library's folder (``root``), sorted, skipped folders left out."""
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not base.is_dir():
        raise SparseforgeError(f"standard library folder {str(base)!r} is not a folder; allowed: a folder of .py files")
    files: list[Path] = []
    for here, dirs, names in os.walk(base):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(here) / n for n in sorted(names) if n.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


def is_heldout(relative: str) -> bool:
    """Whether the file at this relative path (``/``-separated) belongs to the held-out part."""
    return zlib.crc32(relative.encode("utf-8")) % _HELDOUT_MODULUS == 0


def corpus(
    train_chars: int = SIZES["small"].train_chars,
    heldout_chars: int = SIZES["small"].heldout_chars,
    *,
    root: str | os.PathLike[str] | None = None,
) -> Corpus:
    """Read the standard library's sources, split by file into training and held-out parts.

    Files are taken in sorted order of their relative path; each goes to the part
    :func:`is_heldout` names, until that part holds ``train_chars`` / ``heldout_chars``
    characters (the file that crosses the cap is the last one taken). Files that are not UTF-8
    or are empty are skipped. No module is imported.
    """
    train_chars = check_int(train_chars, "train_chars", minimum=1)
    heldout_chars = check_int(heldout_chars, "heldout_chars", minimum=1)
    base_files = stdlib_sources(root)
    base = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    parts: dict[bool, tuple[list[str], list[str]]] = {True: ([], []), False: ([], [])}
    caps = {True: heldout_chars, False: train_chars}
    sizes = {True: 0, False: 0}
    skipped: list[str] = []
    for path in base_files:
        rel = path.relative_to(base).as_posix()
        held = is_heldout(rel)
        if sizes[held] >= caps[held]:
            if sizes[not held] >= caps[not held]:
                break
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            skipped.append(rel)
            continue
        if not text.strip():
            continue
        parts[held][0].append(rel)
        parts[held][1].append(text)
        sizes[held] += len(text)
    if not parts[False][0] or not parts[True][0]:
        raise SparseforgeError(
            f"standard library folder {str(base)!r} gave {len(parts[False][0])} training and {len(parts[True][0])} "
            "held-out files; allowed: a folder with enough .py files for both"
        )
    return Corpus(
        root=str(base),
        train_files=tuple(parts[False][0]),
        train_texts=tuple(parts[False][1]),
        heldout_files=tuple(parts[True][0]),
        heldout_texts=tuple(parts[True][1]),
        skipped=tuple(skipped),
    )


def _joined(texts: Sequence[str], max_chars: int) -> str:
    """Whole texts joined by a blank line, in order, while the total stays within ``max_chars`` (at least one)."""
    out: list[str] = []
    total = 0
    for text in texts:
        if out and total + len(text) > max_chars:
            break
        out.append(text.rstrip("\n") + "\n")
        total += len(text) + 1
    return "\n".join(out)


# -- tokenizer ---------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts``, as a transformers fast tokenizer.

    Every byte is in the alphabet (no unknown token); :data:`EOS` is the one special token and
    the tokenizer's bos, eos and pad token. No token is added around a text.
    """
    vocab_size = check_int(vocab_size, "vocab_size", minimum=300)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=1 << 30
    )


def encode_files(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """The texts tokenized one by one and joined by the end-of-text token, a 1-D LongTensor."""
    eos = int(tokenizer.convert_tokens_to_ids(EOS))
    ids: list[int] = []
    for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids.extend(row)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# -- model -------------------------------------------------------------------------------------------


def config_for(size: str, vocab_size: int | None = None) -> Any:
    """The ``LlamaConfig`` of the named size (``"tiny"`` or ``"small"``); ``vocab_size`` overrides the size's."""
    from transformers import LlamaConfig

    s = _size(size)
    vocab = s.vocab if vocab_size is None else check_int(vocab_size, "vocab_size", minimum=1)
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.heads,
        max_position_embeddings=s.seqlen,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        architectures=["LlamaForCausalLM"],
    )


def new_model(config: Any, seed: int) -> nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` (float32), its weights drawn from ``seed``."""
    from transformers import LlamaForCausalLM

    seed = check_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def _lr_factor(step: int, steps: int, warmup: int, floor: float = 0.1) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``floor`` of the peak at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def fit(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    steps: int,
    batch: int,
    seqlen: int,
    lr: float,
    seed: int = 0,
    progress: Callable[[int, int, float], None] | None = None,
    extra_loss: Callable[[int], torch.Tensor] | None = None,
) -> list[float]:
    """Train ``model`` in place on random windows of the 1-D token ids; the (task) loss of every step.

    Each step draws ``batch`` windows of ``seqlen`` tokens (starts from a generator seeded by
    ``seed``) and takes one AdamW step (betas 0.9 / 0.95, weight decay 0.1 on matrices only,
    gradient norm clipped at 1) on the mean next-token cross-entropy; the learning rate warms up
    linearly over the first 5 % of the steps, then follows a cosine down to a tenth of ``lr``.
    ``progress(step, steps, loss)`` is called after every step. ``extra_loss(step)``, called
    after each forward, returns a term added to the loss (e.g. an activation penalty read from
    forward hooks); the returned losses are the task loss alone.
    """
    steps = check_int(steps, "steps", minimum=1)
    batch = check_int(batch, "batch", minimum=1)
    seqlen = check_int(seqlen, "seqlen", minimum=2)
    seed = check_seed(seed)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise SparseforgeError(f"lr={lr!r} is not allowed; allowed: a finite number > 0")
    if ids.dim() != 1 or ids.numel() < seqlen + 1:
        raise SparseforgeError(
            f"{ids.numel()} training tokens; allowed: a 1-D tensor of at least seqlen + 1 = {seqlen + 1}"
        )
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seqlen)
    losses: list[float] = []
    model.train()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - seqlen + 1, (batch, 1), generator=generator)
        windows = ids[starts + offsets]
        logits = model(input_ids=windows, use_cache=False).logits[:, :-1]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), windows[:, 1:].reshape(-1))
        total = loss + extra_loss(step) if extra_loss is not None else loss
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    model.eval()
    return losses


def heldout_perplexity(model: nn.Module, ids: torch.Tensor, seqlen: int, windows: int = 64) -> tuple[float, int]:
    """``(perplexity, windows used)`` over the first consecutive ``seqlen``-token windows of the 1-D ids."""
    from ..oneshot.evaluate import perplexity

    n = min(windows, ids.numel() // seqlen)
    if n < 1:
        raise SparseforgeError(f"{ids.numel()} held-out tokens; allowed: at least seqlen = {seqlen}")
    nll, _ = perplexity(model, ids[: n * seqlen].reshape(n, seqlen), batch_size=8)
    return math.exp(nll), n


# -- the folder --------------------------------------------------------------------------------------


def _check_out(path: Path, overwrite: bool) -> None:
    what = "output folder"
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise SparseforgeError(f"{what} {str(path)!r} exists and is not a folder; allowed: a new folder")
        if not overwrite:
            raise SparseforgeError(f"{what} {str(path)!r} already exists; pass --overwrite to replace it")
        if any(path.iterdir()) and not (path / INFO_FILE).is_file():
            raise SparseforgeError(
                f"{what} {str(path)!r} is not empty and holds no {INFO_FILE}, so it is not a model this module "
                "wrote; it is never replaced: choose another folder"
            )


def write_folder(out_dir: str | os.PathLike[str], write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary folder beside ``out_dir``, then rename it to ``out_dir``.

    The same scheme as :func:`sparseforge.oneshot.io.save_pruned` (and its helpers: stale
    temporary folders of dead processes removed first; files flushed to disk before the rename;
    an overwritten folder moved aside and deleted only once the new one is in place, moved back
    if anything fails). An existing ``out_dir`` is replaced only with ``overwrite`` and only if it
    is empty or holds :data:`INFO_FILE`.
    """
    from ..oneshot.io import write_folder as write_atomically

    path = Path(out_dir)
    _check_out(path, overwrite)
    return write_atomically(path, write)


@dataclass
class Trained:
    """A trained model in memory, with what :func:`save` writes beside it."""

    model: nn.Module
    tokenizer: Any
    data: Corpus
    heldout_ids: torch.Tensor
    losses: list[float]
    info: dict[str, Any]


def _say(progress: bool | Callable[[str], None]) -> Callable[[str], None]:
    if callable(progress):
        return progress

    def say(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    return say


def build(
    size: str = "small",
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool | Callable[[str], None] = False,
    root: str | os.PathLike[str] | None = None,
) -> Trained:
    """Read the corpus, train the tokenizer and the model of ``size``; nothing is written.

    ``steps`` overrides the size's number of training steps; ``progress``: ``True`` prints to
    stderr, a callable gets each line.
    """
    s = _size(size)
    steps = s.steps if steps is None else check_int(steps, "steps", minimum=1)
    seed = check_seed(seed)
    say = _say(progress)
    t0 = time.perf_counter()
    data = corpus(s.train_chars, s.heldout_chars, root=root)
    tokenizer = train_tokenizer(data.train_texts, s.vocab)
    train_ids = encode_files(tokenizer, data.train_texts)
    heldout_ids = encode_files(tokenizer, data.heldout_texts)
    prep_seconds = time.perf_counter() - t0
    say(
        f"corpus: {len(data.train_files)} training files ({data.train_chars} chars, {train_ids.numel()} tokens), "
        f"{len(data.heldout_files)} held-out files ({heldout_ids.numel()} tokens); {prep_seconds:.1f} s"
    )
    config = config_for(size, len(tokenizer))
    model = new_model(config, seed)
    every = max(1, steps // 20)
    t1 = time.perf_counter()

    def report(step: int, total: int, loss: float) -> None:
        if step % every == 0 or step == total:
            say(f"step {step}/{total}  loss {loss:.4f}  {time.perf_counter() - t1:.0f} s")

    losses = fit(model, train_ids, steps=steps, batch=s.batch, seqlen=s.seqlen, lr=s.lr, seed=seed, progress=report)
    train_seconds = time.perf_counter() - t1
    ppl, windows = heldout_perplexity(model, heldout_ids, s.seqlen)
    say(f"trained in {train_seconds:.0f} s; held-out perplexity {ppl:.3f} over {windows} x {s.seqlen} tokens")
    info = {
        "size": size,
        "seed": seed,
        "steps": steps,
        "batch": s.batch,
        "seqlen": s.seqlen,
        "lr": s.lr,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "stdlib": data.root,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "train_files": list(data.train_files),
        "heldout_files": list(data.heldout_files),
        "train_tokens": int(train_ids.numel()),
        "heldout_tokens": int(heldout_ids.numel()),
        "prepare_seconds": prep_seconds,
        "train_seconds": train_seconds,
        "heldout_perplexity": ppl,
        "heldout_windows": windows,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_curve": [round(statistics.fmean(losses[i : i + every]), 4) for i in range(0, steps, every)],
    }
    return Trained(model, tokenizer, data, heldout_ids, losses, info)


def save(trained: Trained, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``trained`` as a transformer folder (with the texts and :data:`INFO_FILE`), all or nothing."""
    size = _size(str(trained.info["size"]))
    heldout_text = "\n".join(t.rstrip("\n") + "\n" for t in trained.data.heldout_texts)
    calibration_text = _joined(trained.data.train_texts, size.calibration_chars)
    info_text = json.dumps(trained.info, indent=2) + "\n"

    def write(tmp: Path) -> None:
        from ..oneshot.io import _quiet_transformers, _save_model

        with _quiet_transformers():
            _save_model(trained.model, tmp)
            trained.tokenizer.save_pretrained(str(tmp))
        (tmp / HELDOUT_FILE).write_text(heldout_text, encoding="utf-8")
        (tmp / CALIBRATION_FILE).write_text(calibration_text, encoding="utf-8")
        (tmp / INFO_FILE).write_text(info_text, encoding="utf-8")

    return write_folder(out_dir, write, overwrite=overwrite)


def train(
    out_dir: str | os.PathLike[str],
    size: str = "small",
    *,
    steps: int | None = None,
    seed: int = 0,
    progress: bool | Callable[[str], None] = False,
    overwrite: bool = False,
    root: str | os.PathLike[str] | None = None,
) -> Path:
    """Train the standard-library LM of ``size`` (:func:`build`) and save it at ``out_dir`` (:func:`save`).

    The output folder is checked before any work: an existing one is refused unless
    ``overwrite`` (and then only one this module wrote). Returns the folder's path.
    """
    _size(size)
    _check_out(Path(out_dir), overwrite)
    trained = build(size, steps=steps, seed=seed, progress=progress, root=root)
    path = save(trained, out_dir, overwrite=overwrite)
    _say(progress)(f"wrote {path}")
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sparseforge.experiments.stdlib_lm",
        description="Train a small Llama-style LM on the Python standard library's source, offline, and save it "
        "as a transformer folder (with heldout.txt and calibration.txt).",
    )
    parser.add_argument("--out", required=True, help="folder to write (must not exist unless --overwrite)")
    parser.add_argument("--size", default="small", help=f"one of {', '.join(SIZES)} (default small)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the size's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batches")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if this module wrote it")
    args = parser.parse_args(argv)
    try:
        train(args.out, args.size, steps=args.steps, seed=args.seed, progress=True, overwrite=args.overwrite)
    except SparseforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
