"""``sparseforge llm``: one-shot pruning and evaluation of pretrained transformers in local folders."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import SparseforgeError
from .app import app, console, err_console
from .outputs import outputs_of

llm_app = typer.Typer(
    name="llm",
    help="Pretrained transformers (a local folder as save_pretrained writes it; nothing is downloaded): "
    "prune in one shot on calibration text, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(llm_app, name="llm")

MODEL_DIR_HELP = "A transformer folder as save_pretrained writes it: config.json, weights, tokenizer files."


def _check_positive(value: int, option: str) -> int:
    if value < 1:
        raise SparseforgeError(f"{option} {value} is not allowed; allowed: an integer >= 1")
    return value


def _target_sparsity(sparsity: float | None, structure: str) -> tuple[Any, float | None]:
    """``(parsed structure, the sparsity to pass to prune_model)``, checked like prune_model does."""
    from ..errors import check_sparsity
    from ..structures import NM, Unstructured, parse_structure

    parsed = parse_structure(structure)
    if isinstance(parsed, NM):
        fixed = 1.0 - parsed.n_keep / parsed.m
        if sparsity is not None and not math.isclose(sparsity, fixed, abs_tol=1e-9):
            raise SparseforgeError(
                f"--sparsity {sparsity:g} conflicts with --structure {structure}, which fixes the sparsity at "
                f"{fixed:g}; omit --sparsity"
            )
        return parsed, None
    if not isinstance(parsed, Unstructured):
        raise SparseforgeError(
            f"--structure {structure} is not supported by one-shot pruning; allowed: unstructured or N:M such as 2:4"
        )
    return parsed, check_sparsity(0.5 if sparsity is None else sparsity)


def _check_seqlen(model: Any, seqlen: int, where: str) -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and seqlen > limit:
        raise SparseforgeError(
            f"--seqlen {seqlen} exceeds the max_position_embeddings={limit} of {where}; allowed: --seqlen <= {limit}"
        )


@llm_app.command("prune")
def prune_cmd(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(help=MODEL_DIR_HELP, show_default=False)],
    out: Annotated[Path, typer.Option(help="Folder to write the pruned model into (must not exist).")],
    calibration: Annotated[
        Path, typer.Option(help="UTF-8 text file; random windows of its tokens are the calibration data.")
    ],
    method: Annotated[str, typer.Option(help="One-shot method: wanda, sparsegpt, ria, magnitude.")] = "wanda",
    sparsity: Annotated[
        float | None,
        typer.Option(help="Fraction of zeros of every pruned layer, in [0, 1); default 0.5. N:M fixes it."),
    ] = None,
    structure: Annotated[str, typer.Option(help="unstructured or N:M (kept:group, e.g. 2:4).")] = "unstructured",
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the calibration windows.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward pass.")] = 8,
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it is a pruned model sparseforge wrote.")] = False,
    packed: Annotated[
        bool,
        typer.Option(
            help="Also write the pruned layers packed for fast CPU inference (sparseforge_packed.safetensors); "
            "sparseforge.oneshot.load(OUT) loads them in place. Needs float32 weights."
        ),
    ] = False,
    batch_sizes: Annotated[
        str | None,
        typer.Option(
            help="With --packed: rows per layer call to tune for (batch x tokens), comma-separated. "
            "Default: 1,8,128 for a decoder (generation, prompts), 32,128,512 for an encoder.",
            show_default=False,
        ),
    ] = None,
    autotune: Annotated[
        bool | None,
        typer.Option(
            "--autotune/--no-autotune",
            help="With --packed: measure every format against dense (default), or use the rule "
            "(CSR where at most 25% of the weights are kept, else dense).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Prune a pretrained transformer in one shot on calibration text and save it (save_pretrained layout).

    Example: sparseforge llm prune ./llama --method wanda --structure 2:4 --calibration c4.txt --out ./llama-2of4

    Example: sparseforge llm prune ./gpt2 --sparsity 0.8 --calibration c4.txt --out ./gpt2-80 --packed --batch-sizes 1,16
    """
    from ..oneshot import available_methods, prune_model
    from ..oneshot.io import REPORT_FILE, calibration_ids, check_pruned_out, load_transformer, save_pruned

    # 1. everything that needs no weights
    out = check_pruned_out(out, overwrite=overwrite)
    methods = available_methods()
    if method not in methods:
        raise SparseforgeError(f"--method {method!r} is not known; allowed: {', '.join(methods)}")
    parsed, method_sparsity = _target_sparsity(sparsity, structure)
    _check_positive(samples, "--samples")
    _check_positive(seqlen, "--seqlen")
    _check_positive(batch_size, "--batch-size")
    tuned = _packing_options(packed, batch_sizes, autotune, method_sparsity)
    from ..fileio import check_input_file

    check_input_file(calibration, "calibration text")

    # 2. the model; 3. the calibration windows (the text must be long enough)
    with err_console.status(f"loading {model_dir} ..."):
        model, tokenizer, kind = load_transformer(model_dir)
    _check_seqlen(model, seqlen, f"{model_dir}")
    if packed:  # float32 on the CPU, checked before the work
        from ..oneshot import find_linear_layers
        from ..oneshot.packed import check_packable

        try:
            check_packable(model, [layer.param_name for layer in find_linear_layers(model)])
        except SparseforgeError as exc:
            raise SparseforgeError(str(exc).replace("packed=True", "--packed", 1)) from None
    ids = calibration_ids(tokenizer, calibration, samples, seqlen, seed)

    # 4. the work (prune_model checks N:M against every layer before it changes a weight)
    report = prune_model(
        model, ids, method=method, sparsity=method_sparsity, structure=parsed, batch_size=batch_size, progress=True
    )
    status = f"packing the pruned layers and saving to {out} ..." if packed else f"saving to {out} ..."
    with err_console.status(status):
        pack_kw: dict[str, Any] = {"packed": True, "batch_sizes": tuned, "autotune": autotune is not False}
        path = outputs_of(ctx).wrote(
            save_pruned(model, tokenizer, out, report, overwrite=overwrite, **(pack_kw if packed else {}))
        )

    from rich.table import Table

    table = Table(title=f"{method} {report.structure} on {report.blocks_name} ({kind})")
    table.add_column("block")
    table.add_column("relative error", justify="right")
    table.add_column("seconds", justify="right")
    for block in report.blocks:
        table.add_row(block.name, f"{block.error:.4e}", f"{block.seconds:.2f}")
    console.print(table)
    console.print(
        f"sparsity {report.masks.sparsity():.4f} over {len(report.layers)} pruned layers "
        f"(target {report.sparsity:g}; left dense: {', '.join(report.dense) or 'none'}); "
        f"{report.samples} x {report.seqlen} calibration tokens, {report.seconds:.1f} s"
    )
    _print_sizes(path, REPORT_FILE)
    console.print(f"wrote {path} (report: {path / REPORT_FILE})")


def _parse_batch_sizes(text: str) -> tuple[int, ...]:
    from ..oneshot.packed import MAX_BATCH_ROWS, check_batch_sizes

    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts):
        raise SparseforgeError(
            f"--batch-sizes {text!r} is not allowed; allowed: comma-separated integers in [1, {MAX_BATCH_ROWS}] "
            "(rows per call: batch x tokens), e.g. 1,8,128"
        )
    try:
        return check_batch_sizes([int(p) for p in parts])
    except SparseforgeError:
        raise SparseforgeError(
            f"--batch-sizes {text!r} is not allowed; allowed: comma-separated integers in [1, {MAX_BATCH_ROWS}] "
            "(rows per call: batch x tokens), e.g. 1,8,128"
        ) from None


def _packing_options(
    packed: bool, batch_sizes: str | None, autotune: bool | None, sparsity: float | None
) -> tuple[int, ...] | None:
    """The batch sizes of --batch-sizes (``None``: the default of the model's kind), checked with --packed."""
    if not packed:
        given = [
            o for o, v in (("--batch-sizes", batch_sizes), ("--autotune/--no-autotune", autotune)) if v is not None
        ]
        if given:
            raise SparseforgeError(f"{given[0]} tunes the packed layers; allowed: only with --packed")
        return None
    if sparsity == 0.0:
        raise SparseforgeError("--packed with --sparsity 0 has nothing to pack; allowed: --sparsity in (0, 1)")
    return _parse_batch_sizes(batch_sizes) if batch_sizes is not None else None


def _print_sizes(path: Path, report_file: str) -> None:
    """A table of every file in the output folder (bytes, MB), then dense weights vs packed layers."""
    from rich.table import Table

    data = json.loads((path / report_file).read_text(encoding="utf-8"))
    files = sorted(str(f.relative_to(path)) for f in path.rglob("*") if f.is_file())
    table = Table(title=f"files written to {path}")
    table.add_column("file")
    table.add_column("bytes", justify="right")
    table.add_column("MB", justify="right")
    for name in files:
        size = (path / name).stat().st_size
        table.add_row(name, str(size), f"{size / 1e6:.3f}")
    console.print(table)
    weights = int(data.get("weights_bytes") or 0)
    pack = data.get("packed")
    if pack:
        ratio = f"{pack['bytes'] / pack['dense_bytes']:.1%} of dense" if pack["dense_bytes"] else "no layer packed"
        console.print(
            f"dense weights (model files): {weights} bytes ({weights / 1e6:.3f} MB); packed layers "
            f"({pack['sparse_layers']} of {len(pack['layers'])} pruned layers run sparse, batch sizes "
            f"{','.join(map(str, pack['batch_sizes']))}, {'measured' if pack['autotune'] else 'rule'}): "
            f"{pack['file']} {pack['bytes']} bytes ({pack['bytes'] / 1e6:.3f} MB) vs {pack['dense_bytes']} bytes "
            f"({pack['dense_bytes'] / 1e6:.3f} MB) as dense float32 ({ratio})"
        )
        for note in pack.get("notes") or []:
            console.print(f"note: {note}")
    else:
        console.print(f"dense weights (model files): {weights} bytes ({weights / 1e6:.3f} MB); no packed layers")


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _sentences(text: Path, samples: int) -> list[str]:
    from ..fileio import describe_os_error

    try:
        lines = [line.strip() for line in text.read_text(encoding="utf-8").splitlines()]
    except UnicodeDecodeError as exc:
        raise SparseforgeError(f"text {str(text)!r} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise describe_os_error(exc, text, "text") from None
    sentences = [line for line in lines if line][:samples]
    if not sentences:
        raise SparseforgeError(f"text {str(text)!r} has no non-empty line; allowed: one sentence per line")
    return sentences


def _embeddings(model: Any, tokenizer: Any, sentences: list[str], seqlen: int, batch_size: int) -> Any:
    """Mean-pooled last hidden states over the attention mask, one row per sentence (fp32)."""
    import torch

    device = next(model.parameters()).device
    rows = []
    with torch.inference_mode():
        for s in range(0, len(sentences), batch_size):
            enc = tokenizer(
                sentences[s : s + batch_size], padding=True, truncation=True, max_length=seqlen, return_tensors="pt"
            )
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            hidden = model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            rows.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0))
    return torch.cat(rows)


def _latency(
    loaded: dict[str, Any], kind: str, text: Path, seqlen: int, repeats: int = 5
) -> dict[str, dict[str, float]]:
    """Median wall times, the models' calls interleaved: a decoder's greedy generation of 32 tokens
    after a 16-token prompt at batch 1 (tokens/s of the generated ones); an encoder's sentence
    embedding of 1 and of 32 sentences (ms)."""
    import statistics
    import time

    import torch

    out: dict[str, dict[str, list[float]]] = {role: {} for role in loaded}
    if kind == "decoder":
        model, tokenizer, _ = loaded["model"]
        ids = tokenizer(text.read_text(encoding="utf-8")[:4000], return_tensors="pt")["input_ids"][:, :16]
        new = 32
        for _ in range(repeats):
            for role, (m, _tok, _) in loaded.items():
                with torch.inference_mode():
                    start = time.perf_counter()
                    m.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
                    seconds = time.perf_counter() - start
                out[role].setdefault("generate tokens/s (batch 1)", []).append(new / seconds)
    else:
        sentences = _sentences(text, 32)
        for _ in range(repeats):
            for role, (m, tok, _) in loaded.items():
                for count in (1, 32):
                    start = time.perf_counter()
                    _embeddings(m, tok, sentences[:count], min(seqlen, 128), 32)
                    out[role].setdefault(f"embed {count} ms", []).append(1000 * (time.perf_counter() - start))
    return {role: {k: statistics.median(v) for k, v in values.items()} for role, values in out.items()}


@llm_app.command("eval")
def eval_cmd(
    ctx: typer.Context,
    model_dir: Annotated[Path, typer.Argument(help=MODEL_DIR_HELP, show_default=False)],
    text: Annotated[Path, typer.Option(help="UTF-8 text file to evaluate on (an encoder: one sentence per line).")],
    samples: Annotated[int, typer.Option(help="Windows of --seqlen tokens (an encoder: sentences).")] = 16,
    seqlen: Annotated[int, typer.Option(help="Tokens per window (an encoder: at most, per sentence).")] = 512,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="The dense model's folder: an encoder is compared to it; a decoder's perplexity is shown too."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Where to write the JSON report; default MODEL_DIR/eval.json.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 8,
    latency: Annotated[
        bool,
        typer.Option(
            help="Also time what a user waits for: a decoder's greedy generation (tokens/s at batch 1), an "
            "encoder's embedding of 1 and of 32 sentences; the model with its packed layers when the folder has them."
        ),
    ] = True,
) -> None:
    """Evaluate a (pruned) transformer: perplexity on the text for a decoder; for an encoder the mean
    cosine similarity of its sentence embeddings (mean pooling) to those of --reference; and the
    latency of both (the pruned model runs with its packed layers when the folder has them).

    Example: sparseforge llm eval ./llama-2of4 --text wiki.txt --samples 32 --seqlen 512 --reference ./llama
    """
    from rich.table import Table

    from ..fileio import check_input_file, check_output_file, write_text
    from ..oneshot.evaluate import perplexity as _perplexity
    from ..oneshot.io import check_model_dir, load_transformer, text_windows

    # 1. everything that needs no weights
    model_dir = check_model_dir(model_dir)
    if reference is not None:
        check_model_dir(reference, "reference folder")
    report_path = check_output_file(
        json_path if json_path is not None else model_dir / "eval.json", "--json", suffixes=(".json",)
    )
    _check_positive(samples, "--samples")
    _check_positive(seqlen, "--seqlen")
    _check_positive(batch_size, "--batch-size")
    check_input_file(text, "text")

    # 2. the models and the score
    folders = [("model", model_dir)] + ([("reference", reference)] if reference is not None else [])
    loaded = {}
    packing = "dense"
    for role, folder in folders:
        with err_console.status(f"loading {folder} ..."):
            if role == "model":
                from ..oneshot.packed import load as load_packed

                found = load_packed(folder)
                loaded[role], packing = (found.model, found.tokenizer, found.kind), found.packing
            else:
                loaded[role] = load_transformer(folder, what="reference folder")
    kind = loaded["model"][2]
    if reference is not None and loaded["reference"][2] != kind:
        raise SparseforgeError(
            f"--reference {str(reference)!r} is {_a(loaded['reference'][2])} and {str(model_dir)!r} {_a(kind)}; "
            "allowed: two models of the same kind"
        )
    result: dict[str, Any] = {
        "model": str(model_dir),
        "kind": kind,
        "text": str(text),
        "seqlen": seqlen,
        "layers": packing,
    }
    table = Table(title=f"{kind} evaluation on {text}")
    if kind == "decoder":
        result["samples"] = samples
        table.add_column("model")
        table.add_column("tokens", justify="right")
        table.add_column("NLL (nats/token)", justify="right")
        table.add_column("perplexity", justify="right")
        for role, folder in folders:
            model, tokenizer, _ = loaded[role]
            _check_seqlen(model, seqlen, str(folder))
            ids = text_windows(tokenizer, text, samples, seqlen)
            with err_console.status(f"scoring {folder} ..."):
                nll, tokens = _perplexity(model, ids, batch_size)
            entry = {"folder": str(folder), "tokens": tokens, "nll": nll, "perplexity": math.exp(nll)}
            if role == "model":
                result.update({k: v for k, v in entry.items() if k != "folder"})
            else:
                result["reference"] = entry
            table.add_row(str(folder), str(tokens), f"{nll:.4f}", f"{math.exp(nll):.4f}")
    else:
        if reference is None:
            raise SparseforgeError(
                f"{str(model_dir)!r} is an encoder, which has no perplexity; pass --reference DENSE_MODEL_DIR to "
                "compare its sentence embeddings with those of the dense model"
            )
        import torch

        sentences = _sentences(text, samples)
        with err_console.status("embedding sentences ..."):
            emb = {
                role: _embeddings(loaded[role][0], loaded[role][1], sentences, seqlen, batch_size) for role in loaded
            }
        cosine = torch.nn.functional.cosine_similarity(emb["model"], emb["reference"], dim=1).double()
        result.update(
            {
                "reference": {"folder": str(reference)},
                "sentences": len(sentences),
                "cosine_mean": float(cosine.mean()),
                "cosine_min": float(cosine.min()),
            }
        )
        table.add_column("model")
        table.add_column("reference")
        table.add_column("sentences", justify="right")
        table.add_column("mean cosine", justify="right")
        table.add_column("min cosine", justify="right")
        table.add_row(
            str(model_dir),
            str(reference),
            str(len(sentences)),
            f"{result['cosine_mean']:.6f}",
            f"{result['cosine_min']:.6f}",
        )
    console.print(table)
    if latency:
        with err_console.status("timing ..."):
            result["latency"] = _latency(loaded, kind, text, seqlen)
        timing = Table(title=f"latency ({'packed layers' if packing != 'dense' else 'dense layers'}; median of 5)")
        timing.add_column("model")
        for label in result["latency"]["model"]:
            timing.add_column(label, justify="right")
        for role, folder in folders:
            values = result["latency"][role]
            timing.add_row(str(folder), *(f"{v:.2f}" for v in values.values()))
        console.print(timing)
    path = outputs_of(ctx).wrote(write_text(report_path, json.dumps(result, indent=2) + "\n", what="--json"))
    console.print(f"wrote {path}")
