"""MaskState and Sparsifier: zeros survive every optimizer, change_masks, finalize, DDP prefixes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseforge
from sparseforge import MaskState, SparseforgeError, Sparsifier
from sparseforge.algorithms import RigL


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))


class Wrapper(nn.Module):
    """Stands in for DDP: parameter names get a ``module.`` prefix."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.module = m

    def forward(self, x):
        return self.module(x)


class NoisyOnes(torch.optim.Optimizer):
    """An optimizer sparseforge knows nothing about: adds a constant plus noise to every
    parameter (ignoring gradients) and keeps a state buffer that it fills with ones each step."""

    def __init__(self, params, shift: float = 0.01) -> None:
        super().__init__(params, {"shift": shift})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if "ones" not in state:
                    state["ones"] = torch.zeros_like(p)
                    state["count"] = torch.zeros(())
                state["ones"].fill_(1.0)
                state["count"] += 1
                p.add_(group["shift"] + 0.01 * torch.randn_like(p))
        return None


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "custom": lambda ps: NoisyOnes(ps),
}


def train(model, optimizer, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        y = torch.randint(0, 4, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def weights_of(model):
    return {"0.weight": model[0].weight, "2.weight": model[2].weight}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_weights_and_state_stay_zero_for_200_steps(opt_name):
    model = make_model()
    masks = sparseforge.prune(model, sparsity=0.7)
    initial = {n: p.detach().clone() for n, p in weights_of(model).items()}
    opt = OPTIMIZERS[opt_name](model.parameters())
    sp = Sparsifier(model, opt, masks)
    train(model, opt, 200)
    assert masks.step == 200  # counted exactly once per step
    for name, param in weights_of(model).items():
        mask = masks[name]
        assert (param[~mask] == 0).all(), name
        # training did happen on kept weights
        assert not torch.equal(param[mask], initial[name][mask])
        state_tensors = [v for v in opt.state[param].values() if isinstance(v, torch.Tensor) and v.shape == param.shape]
        assert state_tensors, "optimizer kept no per-weight state"
        for value in state_tensors:
            assert (value[~mask] == 0).all(), name
            assert (value[mask] != 0).any(), name
    # the dense biases are not masked
    assert (model[0].bias != 0).all()
    sp.finalize()


def test_custom_optimizer_revives_zeros_without_sparsifier():
    # Sanity check of the test optimizer: without a Sparsifier the pruned weights do not stay zero.
    model = make_model()
    masks = sparseforge.prune(model, sparsity=0.7)
    opt = NoisyOnes(model.parameters())
    train(model, opt, 3)
    assert (model[0].weight[~masks["0.weight"]] != 0).any()


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_zero_state_update_mode_keeps_weights_zero(opt_name):
    model = make_model()
    masks = sparseforge.prune(model, sparsity=0.5)
    opt = OPTIMIZERS[opt_name](model.parameters())
    Sparsifier(model, opt, masks, zero_state="update")
    train(model, opt, 50)
    for name, param in weights_of(model).items():
        assert (param[~masks[name]] == 0).all()
        for v in opt.state[param].values():
            if isinstance(v, torch.Tensor) and v.shape == param.shape:
                assert (v[~masks[name]] == 0).all()


def test_sparsifier_masks_existing_state_and_weights_on_attach():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 3)  # dense state everywhere
    masks = MaskState({"0.weight": torch.rand(10, 6) > 0.5})
    Sparsifier(model, opt, masks)
    m = masks["0.weight"]
    assert (model[0].weight[~m] == 0).all()
    assert (opt.state[model[0].weight]["exp_avg"][~m] == 0).all()
    assert (opt.state[model[0].weight]["exp_avg_sq"][~m] == 0).all()
    assert (opt.state[model[0].weight]["exp_avg"][m] != 0).all()


def test_finalize_leaves_a_plain_model():
    fresh_keys = list(make_model(5).state_dict().keys())
    model = make_model()
    masks = sparseforge.prune(model, sparsity=0.7)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, opt, masks)
    assert sp.attached
    assert len(opt._optimizer_step_pre_hooks) == 1 and len(opt._optimizer_step_post_hooks) == 1
    train(model, opt, 5)
    returned = sp.finalize()
    assert returned is masks
    assert not sp.attached
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert len(opt._optimizer_step_post_hooks) == 0
    assert list(model.state_dict().keys()) == fresh_keys
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert not list(model.buffers())
    for name, p in weights_of(model).items():
        assert (p[~masks[name]] == 0).all()
    step_before = masks.step
    train(model, opt, 3, seed=7)
    assert masks.step == step_before  # nothing counts any more
    revived = sum(int((p[~masks[n]] != 0).sum()) for n, p in weights_of(model).items())
    assert revived > 0  # further steps no longer keep zeros


def adam_setup():
    model = make_model()
    masks = sparseforge.prune(model, sparsity=0.5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sp = Sparsifier(model, opt, masks)
    train(model, opt, 5)
    return model, masks, opt, sp


def test_change_masks_drop_grow_values_and_state():
    model, masks, opt, sp = adam_setup()
    w0, w2 = model[0].weight, model[2].weight
    old0, old2 = masks["0.weight"].clone(), masks["2.weight"].clone()
    before_w0, before_w2 = w0.detach().clone(), w2.detach().clone()
    before_state = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (w0, w2)}

    # Layer 0: drop the first 3 kept positions, grow the first 4 pruned positions (flat order).
    flat_old = old0.reshape(-1)
    kept_idx = flat_old.nonzero().reshape(-1)[:3]
    pruned_idx = (~flat_old).nonzero().reshape(-1)[:4]
    new0 = flat_old.clone()
    new0[kept_idx] = False
    new0[pruned_idx] = True
    new0 = new0.reshape(old0.shape)
    # Layer 2: swap 2 kept for 2 pruned, grown at 0 (no grown value given).
    flat2 = old2.reshape(-1)
    k2 = flat2.nonzero().reshape(-1)[-2:]
    p2 = (~flat2).nonzero().reshape(-1)[-2:]
    new2 = flat2.clone()
    new2[k2] = False
    new2[p2] = True
    new2 = new2.reshape(old2.shape)

    grown_values = {"0.weight": torch.full_like(w0, 7.0)}
    counts = sp.change_masks({"0.weight": new0, "2.weight": new2}, grown_values)
    assert counts == {"0.weight": (3, 4), "2.weight": (2, 2)}
    assert torch.equal(masks["0.weight"], new0) and torch.equal(masks["2.weight"], new2)

    for p, old, new, before, grown_val in ((w0, old0, new0, before_w0, 7.0), (w2, old2, new2, before_w2, 0.0)):
        dropped = old & ~new
        grown = new & ~old
        same = ~(dropped | grown)
        assert (p[dropped] == 0).all()
        assert (p[grown] == grown_val).all()
        assert torch.equal(p[same], before[same])
        for key in ("exp_avg", "exp_avg_sq"):
            state = opt.state[p][key]
            assert (state[dropped] == 0).all() and (state[grown] == 0).all()
            assert torch.equal(state[same], before_state[id(p)][key][same])
        assert torch.equal(opt.state[p]["step"], before_state[id(p)]["step"])

    # After a step the new masks are enforced and grown weights can train.
    train(model, opt, 2, seed=3)
    for p, new in ((w0, new0), (w2, new2)):
        assert (p[~new] == 0).all()
        assert (opt.state[p]["exp_avg"][~new] == 0).all()
    grown0 = new0 & ~old0
    assert (w0[grown0] != 7.0).any()


def test_change_masks_rejects_unknown_layer_and_bad_shape():
    model, masks, opt, sp = adam_setup()
    with pytest.raises(SparseforgeError) as e:
        sp.change_masks({"nope.weight": torch.ones(3, dtype=torch.bool)})
    assert "'nope.weight'" in str(e.value)
    with pytest.raises(SparseforgeError) as e:
        sp.change_masks({"0.weight": torch.ones(3, 3, dtype=torch.bool)})
    assert "(3, 3)" in str(e.value)


def test_masks_resolve_through_module_prefix():
    bare = make_model()
    masks = sparseforge.prune(bare, sparsity=0.6)
    assert masks.names() == ["0.weight", "2.weight"]
    wrapped = Wrapper(bare)
    assert [n for n, _ in wrapped.named_parameters()][0] == "module.0.weight"
    resolved = masks.resolve(wrapped)
    assert resolved["0.weight"] is bare[0].weight and resolved["2.weight"] is bare[2].weight
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    sp = Sparsifier(wrapped, opt, masks)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        opt.zero_grad()
        wrapped(torch.randn(4, 6, generator=g)).pow(2).sum().backward()
        opt.step()
    assert (bare[0].weight[~masks["0.weight"]] == 0).all()
    assert (opt.state[bare[0].weight]["momentum_buffer"][~masks["0.weight"]] == 0).all()
    sp.finalize()
    # Masks made on the wrapper have canonical names and resolve on the bare model.
    other = make_model(3)
    masks2 = sparseforge.prune(Wrapper(other), sparsity=0.6)
    assert masks2.names() == ["0.weight", "2.weight"]
    assert masks2.resolve(other)["0.weight"] is other[0].weight
    assert int(masks2["0.weight"].sum()) == 24  # round(0.4 * 60)


def test_mask_state_basics_and_round_trip():
    m = MaskState(
        {"a": torch.tensor([[1, 0, 1], [0, 0, 1]]), "b": torch.tensor([True, False])},
        step=3,
        targets={"a": 0.5, "b": 0.5},
    )
    assert m["a"].dtype == torch.bool
    assert m.nnz("a") == 3 and m.nnz() == 4 and m.numel() == 8
    assert m.sparsity("a") == 0.5 and m.sparsity() == 0.5
    assert "a" in m and len(m) == 2 and list(m) == ["a", "b"]
    copy = MaskState.from_state_dict(m.state_dict())
    assert copy.step == 3 and copy.targets == {"a": 0.5, "b": 0.5}
    assert all(torch.equal(copy[n], m[n]) for n in m)
    # state_dict holds copies, not references
    sd = m.state_dict()
    sd["masks"]["a"][0, 0] = False
    assert m["a"][0, 0]
    with pytest.raises(SparseforgeError) as e:
        m["a"] = torch.ones(2, 2, dtype=torch.bool)
    assert "(2, 2)" in str(e.value)
    with pytest.raises(SparseforgeError):
        MaskState.from_state_dict({"masks": {"a": torch.ones(2)}})  # not bool


def test_mask_state_resolve_errors():
    model = make_model()
    with pytest.raises(SparseforgeError) as e:
        MaskState({"missing.weight": torch.ones(2, dtype=torch.bool)}).resolve(model)
    assert "'missing.weight'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SparseforgeError) as e:
        MaskState({"0.weight": torch.ones(6, 10, dtype=torch.bool)}).resolve(model)
    assert "(6, 10)" in str(e.value)


def test_sparsifier_load_state_dict_restores_masks():
    model, masks, opt, sp = adam_setup()
    state = sp.state_dict()
    saved = {n: m.clone() for n, m in masks.items()}
    sp.change_masks({"0.weight": torch.ones(10, 6, dtype=torch.bool)})
    sp.load_state_dict(state)
    assert all(torch.equal(masks[n], saved[n]) for n in saved)
    assert (model[0].weight[~saved["0.weight"]] == 0).all()
    with pytest.raises(SparseforgeError):
        sp.load_state_dict({"masks": {"masks": {"0.weight": saved["0.weight"]}, "step": 0, "targets": {}}})


def test_change_masks_zeroes_state_at_grown_even_if_state_was_nonzero():
    # zero_state="update": state is only masked when masks change, so the custom optimizer's
    # "ones" buffer is 1 at pruned positions until change_masks zeroes the grown/dropped ones.
    model = make_model()
    masks = sparseforge.prune(model, sparsity=0.5)
    opt = NoisyOnes(model.parameters())
    sp = Sparsifier(model, opt, masks, zero_state="update")
    train(model, opt, 2)
    w = model[0].weight
    ones = opt.state[w]["ones"]
    assert (ones == 1).all()
    old = masks["0.weight"].clone()
    new = ~old  # drop every kept weight, grow every pruned one
    counts = sp.change_masks({"0.weight": new})
    assert counts == {"0.weight": (int(old.sum()), int((~old).sum()))}
    assert (ones == 0).all()
    assert (w == 0).all()  # dropped zeroed, grown at 0
    assert (opt.state[model[2].weight]["ones"] == 1).all()  # other layer untouched
    # partial change: only the changed positions are zeroed
    train(model, opt, 1)
    flip = torch.zeros_like(new)
    flip.view(-1)[:5] = True
    newer = new ^ flip
    sp.change_masks({"0.weight": newer})
    assert (ones.view(-1)[:5] == 0).all() and (ones.view(-1)[5:] == 1).all()


# -- zero_state="auto" (the default) ------------------------------------------------------------
class PlainSGDSubclass(torch.optim.SGD):
    """Changes nothing, but a subclass may change step(): auto must not assume grads is exact."""


@pytest.mark.parametrize(
    ("make", "mode", "reason"),
    [
        (
            lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
            "grads",
            "auto: exact for SGD",
        ),
        (lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True), "grads", "auto: exact for Adam"),
        (lambda ps: torch.optim.AdamW(ps, lr=1e-2), "grads", "auto: exact for AdamW"),
        (lambda ps: torch.optim.RMSprop(ps, lr=1e-2), "step", "auto: RMSprop is not SGD, Adam or AdamW"),
        (
            lambda ps: PlainSGDSubclass(ps, lr=0.1),
            "step",
            "auto: PlainSGDSubclass subclasses SGD and may change step()",
        ),
        (lambda ps: NoisyOnes(ps), "step", "auto: NoisyOnes is not SGD, Adam or AdamW"),
    ],
)
def test_default_zero_state_picks_grads_only_for_exact_sgd_adam_adamw(make, mode, reason):
    model = make_model()
    sp = Sparsifier(model, make(model.parameters()), sparseforge.prune(model, sparsity=0.75))
    assert sp.zero_state == mode and sp.zero_state_reason == reason
    algo = "None"
    assert repr(sp) == (
        f"Sparsifier(2 masks, sparsity=0.7500, step=0, zero_state={mode!r} ({reason}), algorithm={algo}, attached)"
    )
    sp.finalize()
    assert repr(sp).endswith(", finalized)")


def test_explicit_zero_state_is_kept_and_reported():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = Sparsifier(model, opt, sparseforge.prune(model, sparsity=0.5), RigL(end=50, every=5), zero_state="step")
    assert sp.zero_state == "step"
    assert "zero_state='step' (explicit), algorithm=RigL, attached" in repr(sp)
    sp.finalize()
    sub = PlainSGDSubclass(model.parameters(), lr=0.1)  # an explicit 'grads' for a subclass stays allowed
    assert Sparsifier(model, sub, sparseforge.prune(model, sparsity=0.5), zero_state="grads").zero_state == "grads"


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "adamw"])
def test_default_mode_skips_per_step_masking_yet_zeros_stay_exact(opt_name):
    """With the default the post-step weight/state masking really is skipped (the speed-up), and
    pruned weights and optimizer state are still exactly 0 after every step."""
    model = make_model()
    masks = sparseforge.prune(model, sparsity=0.7)
    opt = OPTIMIZERS[opt_name](model.parameters())
    sp = Sparsifier(model, opt, masks)
    calls = []
    original = sp._apply_weights
    sp._apply_weights = lambda: (calls.append(1), original())[1]  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(
            model(torch.randn(8, 6, generator=g)), torch.randint(0, 4, (8,), generator=g)
        ).backward()
        opt.step()
        for name, param in weights_of(model).items():
            assert (param[~masks[name]] == 0).all()
            for value in opt.state[param].values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape:
                    assert (value[~masks[name]] == 0).all()
    assert calls == []  # "grads": no per-step weight pass
    sp.finalize()
