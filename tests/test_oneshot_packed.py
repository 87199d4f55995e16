"""Packed output of one-shot pruned transformers (save_pruned(packed=True), ``llm prune --packed``),
loading it with packed layers (sparseforge.oneshot.load), and GPT-2's Conv1D in convert; offline.

Tiny random BERT, GPT-2, OPT and Llama models with a word-level tokenizer trained in memory.
Layers are pruned to 80 % so that convert's rule (``autotune=False``: CSR at density <= 0.25)
packs every pruned layer: the sparse path is forced, whatever the timings of this machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import requires
from sparseforge.errors import SparseforgeError
from sparseforge.inference import kernels_available
from test_cli_llm import cli
from test_oneshot_io import HAS_TRANSFORMERS, make_bert, make_llama, make_text, make_tokenizer

pytestmark = [
    requires(HAS_TRANSFORMERS, "transformers (the [llm] extra) is not installed"),
    requires(kernels_available(), "no sparse kernel (C compiler or numba) is available"),
]


def make_gpt2(folder: Path, tokenizer, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_opt(folder: Path, tokenizer, seed: int = 0) -> Path:
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=64,
        num_attention_heads=2,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    OPTForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


MAKERS = {"bert": make_bert, "gpt2": make_gpt2, "opt": make_opt, "llama": make_llama}


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packed_assets")
    text = make_text(1200)
    tokenizer = make_tokenizer(text)
    (root / "calib.txt").write_text(text, encoding="utf-8")
    out: dict[str, Path] = {family: make(root / family, tokenizer) for family, make in MAKERS.items()}
    out["text"] = root / "calib.txt"
    return out


def _pruned(assets: dict[str, Path], family: str):
    """(model, tokenizer, report, ids): the tiny model pruned to 80 % by magnitude."""
    from sparseforge.oneshot import prune_model
    from sparseforge.oneshot.io import calibration_ids, load_transformer

    model, tokenizer, _ = load_transformer(assets[family])
    ids = calibration_ids(tokenizer, assets["text"], 2, 16, seed=0)
    report = prune_model(model, ids, method="magnitude", sparsity=0.8, progress=False)
    return model, tokenizer, report, ids


def _outputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        out = model(input_ids=ids)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


# -- Conv1D in convert ------------------------------------------------------------------------------


def test_conv1d_converts_like_linear_and_gives_its_outputs() -> None:
    from transformers.pytorch_utils import Conv1D

    from sparseforge.inference import SparseLinear, convert

    torch.manual_seed(0)
    layer = Conv1D(24, 40)  # nf=24 outputs, nx=40 inputs: weight stored (40, 24)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) > 0.85)
        layer.bias.normal_()
    model = nn.Sequential(layer, nn.ReLU())
    fast, report = convert(model, batch_sizes=(1, 6), autotune=False)
    assert isinstance(fast[0], SparseLinear) and isinstance(model[0], Conv1D)  # a copy was converted
    decision = report.layers[0]
    assert decision.layer_type == "Conv1D" and decision.shape == (24, 40) and decision.action == "sparse"
    assert fast[0].layout == "linear" and (fast[0].out_features, fast[0].in_features) == (24, 40)
    x = torch.randn(3, 2, 40)
    expected = x @ layer.weight.detach() + layer.bias.detach()  # y = x W + b, W (in, out)
    with torch.inference_mode():
        assert torch.allclose(fast(x), torch.relu(expected), atol=1e-5)
        assert torch.allclose(fast(x[0]), model(x[0]), atol=1e-5)  # 2-D input (rows = 2)


def test_conv1d_in_fp16_is_skipped_with_the_reason() -> None:
    from transformers.pytorch_utils import Conv1D

    from sparseforge.inference import convert

    layer = Conv1D(8, 8).half()
    with pytest.warns(UserWarning, match="nothing converted"):
        fast, report = convert(nn.Sequential(layer), autotune=False)
    assert report.layers[0].action == "skipped" and "float16" in report.layers[0].reason
    assert isinstance(fast[0], Conv1D)


def test_converted_gpt2_round_trips_through_save_and_load_converted(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D

    from sparseforge.inference import SparseLinear, convert, load_converted, save_converted

    cfg = GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Conv1D):
                m.weight.mul_(torch.rand_like(m.weight) > 0.85)
    with pytest.warns(UserWarning, match="1 of 9 layers run dense: lm_head"):  # tied to the embedding, no zeros
        fast, report = convert(model, batch_sizes=(1, 8), autotune=False)
    names = [n for n, m in model.named_modules() if isinstance(m, Conv1D)]
    assert len(names) == 8 and sorted(report.sparse_layers) == sorted(names)
    path = save_converted(tmp_path / "gpt2.safetensors", fast)
    skeleton = GPT2LMHeadModel(cfg).eval()  # Conv1D at the converted names, other weights random
    loaded = load_converted(path, skeleton)
    assert all(isinstance(loaded.get_submodule(n), SparseLinear) for n in names)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(_outputs(loaded, ids), _outputs(model, ids), atol=1e-4)


# -- save_pruned(packed=True) and load ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "gpt2", "opt", "llama"])
def test_prune_save_packed_load_gives_the_same_outputs_with_packed_layers(
    tmp_path: Path, assets: dict[str, Path], family: str
) -> None:
    from sparseforge.inference import SparseLinear
    from sparseforge.oneshot import PACKED_FILE, load, save_pruned
    from sparseforge.oneshot.io import REPORT_FILE

    model, tokenizer, report, ids = _pruned(assets, family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_pruned(model, tokenizer, tmp_path / "out", report, packed=True, batch_sizes=[1, 16], autotune=False)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the model is not changed
    assert (out / PACKED_FILE).is_file() and [p.name for p in tmp_path.iterdir()] == ["out"]

    loaded, tok, kind, packing, note = load(out)
    assert packing == "packed" and PACKED_FILE in note and kind == ("encoder" if family == "bert" else "decoder")
    assert tok("ka lo")["input_ids"] == tokenizer("ka lo")["input_ids"]
    pruned_layers = {name.rpartition(".")[0] for name in report.masks.names()}
    sparse = {n for n, m in loaded.named_modules() if isinstance(m, SparseLinear)}
    assert sparse == pruned_layers and len(sparse) == len(report.layers)
    assert all(loaded.get_submodule(n).plan.paths == {"sparse"} for n in sparse)
    assert torch.allclose(_outputs(loaded, ids), _outputs(model, ids), atol=1e-4, rtol=1e-4)

    data = json.loads((out / REPORT_FILE).read_text())
    pack = data["packed"]
    assert pack["file"] == PACKED_FILE and pack["batch_sizes"] == [1, 16] and pack["autotune"] is False
    assert pack["sparse_layers"] == len(sparse) and set(pack["layers"]) == sparse
    assert pack["bytes"] == (out / PACKED_FILE).stat().st_size == data["files"][PACKED_FILE]
    dense = sum(
        4 * m.out_features * (m.in_features + (m.bias is not None)) for n, m in loaded.named_modules() if n in sparse
    )
    assert pack["dense_bytes"] == dense and pack["bytes"] < dense  # 80 % zeros: smaller than dense
    assert data["weights_bytes"] == (out / "model.safetensors").stat().st_size


def test_default_batch_sizes_follow_the_model_kind(tmp_path: Path, assets: dict[str, Path]) -> None:
    from sparseforge.oneshot import save_pruned
    from sparseforge.oneshot.io import REPORT_FILE
    from sparseforge.oneshot.packed import DECODER_BATCH_SIZES, ENCODER_BATCH_SIZES

    for family, expected in (("llama", DECODER_BATCH_SIZES), ("bert", ENCODER_BATCH_SIZES)):
        model, tokenizer, report, _ = _pruned(assets, family)
        out = save_pruned(model, tokenizer, tmp_path / family, report, packed=True, autotune=False)
        assert json.loads((out / REPORT_FILE).read_text())["packed"]["batch_sizes"] == list(expected)
    assert DECODER_BATCH_SIZES[0] == 1  # token-by-token generation is one row per call


def test_load_without_packed_file_is_dense_or_converted_on_request(tmp_path: Path, assets: dict[str, Path]) -> None:
    from sparseforge.inference import SparseLinear
    from sparseforge.oneshot import load, save_pruned
    from sparseforge.oneshot.io import REPORT_FILE

    model, tokenizer, report, ids = _pruned(assets, "gpt2")
    out = save_pruned(model, tokenizer, tmp_path / "plain", report)
    assert json.loads((out / REPORT_FILE).read_text())["packed"] is None
    dense = load(out)
    assert dense.packing == "dense" and "convert=True" in dense.note
    assert not any(isinstance(m, SparseLinear) for m in dense.model.modules())
    assert torch.equal(_outputs(dense.model, ids), _outputs(model, ids))
    converted = load(out, convert=True, batch_sizes=[1, 8], autotune=False)
    assert converted.packing == "converted" and "8 of 9 layers packed" in converted.note
    assert sum(isinstance(m, SparseLinear) for m in converted.model.modules()) == 8
    assert torch.allclose(_outputs(converted.model, ids), _outputs(model, ids), atol=1e-4, rtol=1e-4)


# -- bad inputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_dirs(tmp_path_factory: pytest.TempPathFactory, assets: dict[str, Path]) -> dict[str, Path]:
    from sparseforge.oneshot import save_pruned

    root = tmp_path_factory.mktemp("packed_dirs")
    out = {}
    for family in ("llama", "opt"):
        model, tokenizer, report, _ = _pruned(assets, family)
        out[family] = save_pruned(model, tokenizer, root / family, report, packed=True, batch_sizes=[1], autotune=False)
    return out


def _one_line_error(call, match: str) -> str:
    with pytest.raises(SparseforgeError, match=match) as info:
        call()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_load_refuses_what_is_not_a_pruned_model_folder(tmp_path: Path, packed_dirs: dict[str, Path]) -> None:
    from sparseforge.oneshot import load

    _one_line_error(lambda: load(tmp_path / "nope"), r"pruned model folder '.*nope' does not exist")
    (tmp_path / "file").write_text("x")
    _one_line_error(lambda: load(tmp_path / "file"), r"pruned model folder '.*file' is a file")
    _one_line_error(lambda: load(tmp_path), r"has no config.json")
    _one_line_error(lambda: load(packed_dirs["llama"], batch_sizes=[1]), r"only when converting on load")
    _one_line_error(lambda: load(packed_dirs["llama"], convert="yes"), r"convert='yes' is not allowed")
    _one_line_error(lambda: load(packed_dirs["llama"], convert=True, batch_sizes=[0]), r"batch_sizes=\[0\]")


def test_a_corrupted_packed_file_names_the_file_and_the_tensor(tmp_path: Path, packed_dirs: dict[str, Path]) -> None:
    from safetensors import safe_open

    from sparseforge.oneshot import PACKED_FILE, load

    folder = tmp_path / "copy"
    shutil.copytree(packed_dirs["llama"], folder)
    path = folder / PACKED_FILE
    with safe_open(str(path), framework="pt") as f:
        name = sorted(f.keys())[0]
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    info = json.loads(raw[8:header])[name]
    raw[header + info["data_offsets"][0]] ^= 0xFF  # one byte of the tensor's data
    path.write_bytes(bytes(raw))
    message = _one_line_error(lambda: load(folder), "fails its checksum")
    assert PACKED_FILE in message and repr(name) in message


def test_a_packed_file_of_another_model_is_refused(tmp_path: Path, packed_dirs: dict[str, Path], assets) -> None:
    from sparseforge.oneshot import PACKED_FILE, load, prune_model, save_pruned
    from sparseforge.oneshot.io import calibration_ids, load_transformer

    folder = tmp_path / "mixed"
    shutil.copytree(packed_dirs["llama"], folder)
    shutil.copy(packed_dirs["opt"] / PACKED_FILE, folder / PACKED_FILE)
    _one_line_error(lambda: load(folder), r"is not in the skeleton|does not fit the skeleton")

    # same architecture, other weights (a Llama of another seed): shapes match, weights do not
    other = make_llama(tmp_path / "llama2", load_transformer(assets["llama"])[1], seed=5)
    model, tokenizer, _ = load_transformer(other)
    ids = calibration_ids(tokenizer, assets["text"], 2, 16)
    report = prune_model(model, ids, method="magnitude", sparsity=0.8, progress=False)
    donor = save_pruned(model, tokenizer, tmp_path / "donor", report, packed=True, batch_sizes=[1], autotune=False)
    shutil.copy(donor / PACKED_FILE, folder / PACKED_FILE)
    message = _one_line_error(lambda: load(folder), r"differs from the weight in the folder's model file")
    assert PACKED_FILE in message


def test_save_pruned_refuses_packing_options_it_cannot_serve(tmp_path: Path, assets: dict[str, Path]) -> None:
    from sparseforge.oneshot import save_pruned

    model, tokenizer, report, _ = _pruned(assets, "llama")
    out = tmp_path / "out"
    _one_line_error(lambda: save_pruned(model, tokenizer, out, report, batch_sizes=[1]), r"with packed=True")
    _one_line_error(lambda: save_pruned(model, tokenizer, out, report, autotune=False), r"with packed=True")
    for bad in ([], [0], [1, 70000], "1,8", [1.5]):
        _one_line_error(
            lambda bad=bad: save_pruned(model, tokenizer, out, report, packed=True, batch_sizes=bad),
            r"batch_sizes=.* is not allowed.*allowed: a non-empty list of integers in \[1, 65536\]",
        )
    model.half()
    _one_line_error(
        lambda: save_pruned(model, tokenizer, out, report, packed=True), r"torch.float16 weights .* float32 on the CPU"
    )
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


# -- the command line -------------------------------------------------------------------------------------


def test_cli_prune_packed_writes_the_file_and_prints_sizes(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from sparseforge.inference import SparseLinear
    from sparseforge.oneshot import PACKED_FILE, load

    out = tmp_path / "gpt2-80"
    args = ["--method", "magnitude", "--sparsity", "0.8", "--samples", "2", "--seqlen", "16"]
    status = cli(
        "llm", "prune", assets["gpt2"], *args, "--calibration", assets["text"], "--out", out,
        "--packed", "--batch-sizes", "4,1", "--no-autotune",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert status == 0, captured.err
    text = " ".join(captured.out.split())
    for f in sorted(p for p in out.iterdir()):
        size = f.stat().st_size
        assert f"{f.name} │ {size} │ {size / 1e6:.3f}" in text or f"{f.name} | {size} | {size / 1e6:.3f}" in text
    packed = (out / PACKED_FILE).stat().st_size
    weights = (out / "model.safetensors").stat().st_size
    assert f"dense weights (model files): {weights} bytes" in text
    assert f"{PACKED_FILE} {packed} bytes" in text and "8 of 8 pruned layers run sparse, batch sizes 1,4, rule" in text
    loaded = load(out)
    assert loaded.packing == "packed" and sum(isinstance(m, SparseLinear) for m in loaded.model.modules()) == 8


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch-sizes", "1,8"], "error: --batch-sizes tunes the packed layers; allowed: only with --packed"),
        (["--no-autotune"], "error: --autotune/--no-autotune tunes the packed layers; allowed: only with --packed"),
        (["--packed", "--batch-sizes", "1,x"], "error: --batch-sizes '1,x' is not allowed; allowed: comma-separated"),
        (["--packed", "--batch-sizes", "0"], "error: --batch-sizes '0' is not allowed"),
        (["--packed", "--batch-sizes", "99999"], "error: --batch-sizes '99999' is not allowed"),
        (["--packed", "--sparsity", "0"], "error: --packed with --sparsity 0 has nothing to pack"),
    ],
)
def test_cli_packing_options_it_cannot_serve_are_refused_before_work(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str], extra: list[str], needle: str
) -> None:
    out = tmp_path / "out"
    args = ["--samples", "2", "--seqlen", "16", "--calibration", assets["text"], "--out", out, *extra]
    assert cli("llm", "prune", assets["llama"], *args) == 2
    err = capsys.readouterr().err
    assert needle in " ".join(err.split()) and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_measured_packing_loads_to_the_same_outputs(tmp_path: Path, assets: dict[str, Path]) -> None:
    """autotune=True (the default): whatever this machine measures, the loaded model computes the same."""
    from sparseforge.inference import SparseLinear
    from sparseforge.oneshot import load, save_pruned
    from sparseforge.oneshot.io import REPORT_FILE

    model, tokenizer, report, ids = _pruned(assets, "llama")
    out = save_pruned(model, tokenizer, tmp_path / "out", report, packed=True, batch_sizes=[1, 32])
    pack = json.loads((out / REPORT_FILE).read_text())["packed"]
    assert pack["autotune"] is True and len(pack["layers"]) == len(report.layers)
    loaded = load(out)
    assert loaded.packing == "packed"
    assert sum(isinstance(m, SparseLinear) for m in loaded.model.modules()) == pack["sparse_layers"]
    assert torch.allclose(_outputs(loaded.model, ids), _outputs(model, ids), atol=1e-4, rtol=1e-4)


def test_a_failure_while_writing_the_packed_file_leaves_no_folder(
    tmp_path: Path, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sparseforge.inference.serialization as serialization
    from sparseforge.oneshot import save_pruned

    model, tokenizer, report, _ = _pruned(assets, "opt")

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(serialization, "save_converted", broken)
    with pytest.raises(SparseforgeError, match="no space left"):
        save_pruned(model, tokenizer, tmp_path / "out", report, packed=True, batch_sizes=[1], autotune=False)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary folder


def test_cli_packed_refuses_a_float16_model_before_pruning(
    tmp_path: Path, assets: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    half = tmp_path / "llama-fp16"
    AutoModelForCausalLM.from_pretrained(assets["llama"]).half().save_pretrained(half)
    AutoTokenizer.from_pretrained(assets["llama"]).save_pretrained(half)
    out = tmp_path / "out"
    args = ["--samples", "2", "--seqlen", "16", "--calibration", assets["text"], "--out", out, "--packed"]
    assert cli("llm", "prune", half, *args) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error: --packed: pruned layer 'model.layers.0.self_attn.q_proj' has torch.float16 weights" in err
    assert not out.exists()
