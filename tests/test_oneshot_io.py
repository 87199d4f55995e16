"""Pretrained transformers in and out of one-shot pruning (sparseforge.oneshot.io), offline.

Tiny random Llama (decoder) and BERT (encoder) models and a word-level tokenizer trained in
memory are saved with save_pretrained into temporary folders; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
from pathlib import Path

import pytest
import torch

from conftest import requires
from sparseforge.errors import SparseforgeError

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
pytestmark = requires(HAS_TRANSFORMERS, "transformers (the [llm] extra) is not installed")

_SYLLABLES = ["ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "de", "vu", "an", "el"]


def make_text(words: int, seed: int = 0) -> str:
    """Deterministic text of ``words`` words from a vocabulary of about 140, ten words a line."""
    rng = random.Random(seed)
    vocab = [a + b for a in _SYLLABLES for b in _SYLLABLES]
    out = [rng.choice(vocab) for _ in range(words)]
    return "\n".join(" ".join(out[i : i + 10]) for i in range(0, words, 10)) + "\n"


def make_tokenizer(text: str):  # -> PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[CLS]", "[SEP]"]
    tok.train_from_iterator([text], trainers.WordLevelTrainer(vocab_size=500, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def make_llama(folder: Path, tokenizer, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_bert(folder: Path, tokenizer, seed: int = 0, intermediate: int = 64) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama folder, a tiny BERT folder, a calibration text of 1,200 words and a short one."""
    root = tmp_path_factory.mktemp("llm_assets")
    text = make_text(1200)
    tokenizer = make_tokenizer(text)
    (root / "calib.txt").write_text(text, encoding="utf-8")
    (root / "short.txt").write_text(make_text(50, seed=1), encoding="utf-8")
    return {
        "root": root,
        "llama": make_llama(root / "llama", tokenizer),
        "bert": make_bert(root / "bert", tokenizer),
        "text": root / "calib.txt",
        "short": root / "short.txt",
    }


# -- load_transformer -----------------------------------------------------------------------------


def test_load_transformer_tells_decoder_from_encoder(assets: dict[str, Path]) -> None:
    from sparseforge.oneshot.io import load_transformer

    model, tokenizer, kind = load_transformer(assets["llama"])
    assert kind == "decoder" and type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer("ka lo")["input_ids"]
    model, _, kind = load_transformer(assets["bert"])
    assert kind == "encoder" and type(model).__name__ == "BertModel"


def test_load_transformer_refuses_what_is_not_a_transformer(tmp_path: Path, assets: dict[str, Path]) -> None:
    from sparseforge.oneshot.io import load_transformer

    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        tmp_path: "has no config.json",
        tmp_path / "missing": "does not exist",
        tmp_path / "notes.txt": "is a file",
    }
    for path, needle in cases.items():
        with pytest.raises(SparseforgeError, match=needle) as info:
            load_transformer(path)
        assert "config.json" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SparseforgeError, match="has no weights"):
        load_transformer(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SparseforgeError, match="config.json cannot be read") as info:
        load_transformer(tmp_path)
    assert "\n" not in str(info.value)


# -- calibration windows ----------------------------------------------------------------------------


def test_calibration_ids_seeded_windows_of_the_text(assets: dict[str, Path]) -> None:
    from sparseforge.oneshot.io import calibration_ids, load_transformer, text_windows

    _, tokenizer, _ = load_transformer(assets["llama"])
    a = calibration_ids(tokenizer, assets["text"], 6, 16, seed=0)
    b = calibration_ids(tokenizer, assets["text"], 6, 16, seed=0)
    c = calibration_ids(tokenizer, assets["text"], 6, 16, seed=1)
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    full = torch.tensor(tokenizer(assets["text"].read_text(), add_special_tokens=False)["input_ids"])
    windows = full.unfold(0, 16, 1)
    for row in a:  # every sample is a window of the tokenized text
        assert bool((windows == row).all(dim=1).any())
    seq = text_windows(tokenizer, assets["text"], 3, 10)
    assert torch.equal(seq.reshape(-1), full[:30])


def test_calibration_text_too_short_names_the_numbers(assets: dict[str, Path]) -> None:
    from sparseforge.oneshot.io import calibration_ids, load_transformer

    _, tokenizer, _ = load_transformer(assets["llama"])
    n = len(tokenizer(assets["short"].read_text(), add_special_tokens=False)["input_ids"])
    with pytest.raises(SparseforgeError) as info:
        calibration_ids(tokenizer, assets["short"], 4, 32)
    assert (
        str(info.value)
        == f"calibration text {str(assets['short'])!r} has {n} tokens; samples x seqlen = 4 x 32 = 128 needed"
    )
    with pytest.raises(SparseforgeError, match="does not exist"):
        calibration_ids(tokenizer, assets["root"] / "nope.txt", 4, 32)


# -- save_pruned ----------------------------------------------------------------------------------


def _pruned(assets: dict[str, Path], structure: str = "2:4"):
    from sparseforge.oneshot import prune_model
    from sparseforge.oneshot.io import calibration_ids, load_transformer

    model, tokenizer, _ = load_transformer(assets["llama"])
    ids = calibration_ids(tokenizer, assets["text"], 4, 32, seed=0)
    report = prune_model(model, ids, method="wanda", structure=structure, progress=False)
    return model, tokenizer, report, ids


def test_save_pruned_round_trip(tmp_path: Path, assets: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    from sparseforge.oneshot.io import MASKS_FILE, REPORT_FILE, load_masks, save_pruned

    model, tokenizer, report, ids = _pruned(assets)
    out = save_pruned(model, tokenizer, tmp_path / "a" / "pruned", report)
    assert out == tmp_path / "a" / "pruned"
    assert [p.name for p in out.parent.iterdir()] == ["pruned"]  # no temporary folder left
    loaded = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    with torch.inference_mode():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    masks = load_masks(out)
    assert sorted(masks.names()) == sorted(report.masks.names())
    assert masks.sparsity() == 0.5
    state = loaded.state_dict()
    for name, mask in masks.items():
        assert mask.dtype == torch.bool and mask.float().mean() == 0.5
        assert bool((state[name][~mask] == 0).all())
    data = json.loads((out / REPORT_FILE).read_text())
    assert data["method"] == "wanda" and data["structure"] == "2:4" and data["pruned_sparsity"] == 0.5
    assert data["files"][MASKS_FILE] == (out / MASKS_FILE).stat().st_size
    assert data["files"]["model.safetensors"] == (out / "model.safetensors").stat().st_size
    assert "tokenizer.json" in data["files"]


def test_save_pruned_refuses_an_existing_folder_and_overwrites_only_its_own(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    from sparseforge.oneshot.io import REPORT_FILE, save_pruned

    model, tokenizer, report, _ = _pruned(assets)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SparseforgeError, match="already exists; pass --overwrite"):
        save_pruned(model, tokenizer, out, report)
    with pytest.raises(SparseforgeError, match="never replaced"):
        save_pruned(model, tokenizer, out, report, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    save_pruned(model, tokenizer, out, report, overwrite=True)  # an empty folder may be replaced
    (out / "stale.txt").write_text("from the previous run")
    save_pruned(model, tokenizer, out, report, overwrite=True)  # and a folder it wrote
    assert (out / REPORT_FILE).is_file() and not (out / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SparseforgeError, match="is not a folder"):
        save_pruned(model, tokenizer, tmp_path / "file", report, overwrite=True)


def test_failed_save_leaves_nothing_and_the_old_folder_intact(
    tmp_path: Path, assets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sparseforge.oneshot import io
    from sparseforge.oneshot.io import REPORT_FILE, save_pruned

    model, tokenizer, report, _ = _pruned(assets)
    out = save_pruned(model, tokenizer, tmp_path / "out", report)
    before = (out / REPORT_FILE).read_text()

    def broken(path: object, masks: object) -> None:
        raise KeyboardInterrupt  # an interrupt half-way through the save

    monkeypatch.setattr(io, "save_masks", broken)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, tokenizer, out, report, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save_pruned(model, tokenizer, tmp_path / "new", report)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (out / REPORT_FILE).read_text() == before


def test_stale_temporary_folders_are_cleaned(tmp_path: Path, assets: dict[str, Path]) -> None:
    from sparseforge.oneshot.io import REPORT_FILE, clean_stale_temp_dirs

    dead = 2**22 + 12345  # above Linux's default pid_max (4194304): no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    new = tmp_path / f".out.sftmp-{dead}-new-abc"
    old = tmp_path / f".out.sftmp-{dead}-old-def"
    mine = tmp_path / f".out.sftmp-{os.getpid()}-new-ghi"
    for folder in (new, old, mine):
        folder.mkdir()
    (old / REPORT_FILE).write_text("{}")
    clean_stale_temp_dirs(tmp_path / "out")
    # the unfinished new folder is gone; the old output moved aside by a killed overwrite is back
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", mine.name])
    assert (tmp_path / "out" / REPORT_FILE).is_file()
