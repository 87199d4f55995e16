"""Tests for sparseforge.scores. Expected values are derived by hand in the comments."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.scores import (
    MovementAccumulator,
    grasp,
    iter_batches,
    magnitude,
    movement,
    random_scores,
    snip,
    synflow,
    synflow_masks,
)

T = torch.tensor


def sq_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Summed squared error: L = sum (out - t)^2."""
    return ((out - target) ** 2).sum()


def linear3(w: list[float]) -> nn.Linear:
    """y = w . x, one output, no bias."""
    m = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        m.weight.copy_(T([w]))
    return m


# Batch 1: w = [1, -2, 0.25], x = [3, 1, -4], t = 1 -> y = 3 - 2 - 1 = 0, dL/dy = 2(y - t) = -2,
#          g1 = -2 x = [-6, -2, 8]
# Batch 2: x = [1, 0, 0], t = 0 -> y = 1, dL/dy = 2, g2 = [2, 0, 0]
W_LIN = [1.0, -2.0, 0.25]
B1 = (T([[3.0, 1.0, -4.0]]), T([[1.0]]))
B2 = (T([[1.0, 0.0, 0.0]]), T([[0.0]]))


class Quad(nn.Module):
    """Outputs its parameter vector, ignoring the input (loss_fn supplies the maths)."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.w = nn.Parameter(T(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w


def half_weighted_sq(out: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """L = 0.5 * sum a_i w_i^2 -> g = a w, H = diag(a), Hg = a^2 w."""
    return 0.5 * (a * out**2).sum()


class TwoScalars(nn.Module):
    """Outputs (u, v); used with L = u v + 0.5 c u^2 (non-diagonal Hessian)."""

    def __init__(self, u: float, v: float) -> None:
        super().__init__()
        self.u = nn.Parameter(T(u))
        self.v = nn.Parameter(T(v))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.u, self.v])


def chain(w1: list[list[float]], w2: list[list[float]]) -> nn.Sequential:
    """x (3) -> W1 (2x3) -> ReLU -> W2 (2x2), no biases."""
    net = nn.Sequential(nn.Linear(3, 2, bias=False), nn.ReLU(), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(T(w1))
        net[2].weight.copy_(T(w2))
    return net


# SynFlow chain: R = 1^T |W2| |W1| 1.
#   dR/dW1_ij = sum_k |W2_ki|  (column sums of |W2|: col0 = 2 + 0.5 = 2.5, col1 = 1 + 4 = 5)
#   dR/dW2_ki = sum_j |W1_ij|  (row sums of |W1|:    row0 = 1 + 2 + 0.5 = 3.5, row1 = 3 + 0 + 1 = 4)
W1 = [[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]
W2 = [[2.0, -1.0], [-0.5, 4.0]]
SYN_W1 = [[1 * 2.5, 2 * 2.5, 0.5 * 2.5], [3 * 5.0, 0 * 5.0, 1 * 5.0]]  # [[2.5, 5, 1.25], [15, 0, 5]]
SYN_W2 = [[2 * 3.5, 1 * 4.0], [0.5 * 3.5, 4 * 4.0]]  # [[7, 4], [1.75, 16]]


def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "requires": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before["params"][n]), n
        assert p.grad is before["grads"][n], n
        assert p.requires_grad == before["requires"][n], n
    for n, b in model.named_buffers():
        assert torch.equal(b, before["buffers"][n]), n
    for n, m in model.named_modules():
        assert m.training == before["modes"][n], n


# ----------------------------------------------------------------------------------- data-free


def test_magnitude_hand_values():
    w = T([[-1.5, 2.0], [0.0, -3.25]], dtype=torch.float64, requires_grad=True)
    out = magnitude({"w": w})
    assert list(out) == ["w"]
    assert out["w"].dtype == torch.float32 and not out["w"].requires_grad
    assert torch.equal(out["w"], T([[1.5, 2.0], [0.0, 3.25]]))


def test_random_scores_seeded_and_independent_of_global_rng():
    params = {"a": torch.zeros(4, 5), "b": torch.zeros(7)}
    torch.manual_seed(1)
    s1 = random_scores(params, seed=3)
    torch.manual_seed(999)
    torch.rand(10)
    s2 = random_scores(params, seed=3)
    s3 = random_scores(params, seed=4)
    for k in params:
        assert s1[k].shape == params[k].shape and s1[k].dtype == torch.float32
        assert torch.equal(s1[k], s2[k])
        assert not torch.equal(s1[k], s3[k])
        assert bool((s1[k] >= 0).all() and (s1[k] < 1).all())


# ------------------------------------------------------------------------------------- SNIP


def test_snip_one_batch_hand_values():
    model = linear3(W_LIN)
    # |w * g1| = |[1*-6, -2*-2, 0.25*8]| = [6, 4, 2]
    out = snip(model, dict(model.named_parameters()), B1, loss_fn=sq_loss)
    assert torch.equal(out["weight"], T([[6.0, 4.0, 2.0]]))
    assert out["weight"].dtype == torch.float32 and not out["weight"].requires_grad


@pytest.mark.parametrize("kind", ["list", "generator"])
def test_snip_sums_grads_over_batches(kind):
    model = linear3(W_LIN)
    # g = g1 + g2 = [-4, -2, 8]; |w * g| = [4, 4, 2]
    data = [B1, B2] if kind == "list" else (b for b in [B1, B2])
    out = snip(model, dict(model.named_parameters()), data, loss_fn=sq_loss)
    assert torch.equal(out["weight"], T([[4.0, 4.0, 2.0]]))


def test_snip_default_cross_entropy_hand_values():
    # Linear(2, 2) with W = 0, b = [1, 1]: logits = [1, 1], softmax p = [0.5, 0.5], target 0
    # -> dL/dlogits = p - e0 = [-0.5, 0.5]; dL/db = [-0.5, 0.5]; |b * dL/db| = [0.5, 0.5];
    # |W * dL/dW| = 0 since W = 0.
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(1.0)
    out = snip(model, dict(model.named_parameters()), (T([[2.0, 4.0]]), T([0])))
    assert torch.equal(out["weight"], torch.zeros(2, 2))
    assert torch.allclose(out["bias"], T([0.5, 0.5]))


# ------------------------------------------------------------------------------------ GraSP


def test_grasp_diagonal_hessian():
    # w = [1, -2, 3], a = [2, 1, -1]: g = a w = [2, -2, -3], Hg = a g = [4, -2, 3],
    # score = w * Hg = [4, 4, 9] (= a^2 w^2)
    model = Quad([1.0, -2.0, 3.0])
    a = T([2.0, 1.0, -1.0])
    out = grasp(model, dict(model.named_parameters()), (torch.zeros(1), a), loss_fn=half_weighted_sq)
    assert torch.equal(out["w"], T([4.0, 4.0, 9.0]))


def test_grasp_two_batches_from_generator():
    # Two identical batches: g = 2 a w, Hg = sum_b H_b g = 2a * 2aw = 4 a^2 w -> score 4 a^2 w^2
    model = Quad([1.0, -2.0, 3.0])
    a = T([2.0, 1.0, -1.0])
    data = ((torch.zeros(1), a) for _ in range(2))
    out = grasp(model, dict(model.named_parameters()), data, loss_fn=half_weighted_sq)
    assert torch.equal(out["w"], T([16.0, 16.0, 36.0]))


def test_grasp_non_diagonal_hessian_and_sign():
    # L = u v + 0.5 c u^2 with u = 1, v = 1, c = -3:
    #   g = (v + c u, u) = (-2, 1); H = [[c, 1], [1, 0]] = [[-3, 1], [1, 0]]
    #   Hg = (-3 * -2 + 1 * 1, 1 * -2) = (7, -2); score = W * Hg = (1 * 7, 1 * -2) = (7, -2)
    c = -3.0

    def loss_fn(out: torch.Tensor, _y: torch.Tensor) -> torch.Tensor:
        u, v = out[0], out[1]
        return u * v + 0.5 * c * u**2

    model = TwoScalars(1.0, 1.0)
    out = grasp(model, dict(model.named_parameters()), (torch.zeros(1), torch.zeros(1)), loss_fn=loss_fn)
    assert torch.equal(out["u"], T(7.0))
    assert torch.equal(out["v"], T(-2.0))  # negative: GraSP's -W*Hg = 2 > 0, so v is removed first


# ---------------------------------------------------------------------------------- SynFlow


def test_synflow_chain_hand_values():
    net = chain(W1, W2)
    out = synflow(net, dict(net.named_parameters()), input_shape=(3,))
    assert torch.equal(out["0.weight"], T(SYN_W1))
    assert torch.equal(out["2.weight"], T(SYN_W2))
    assert out["0.weight"].dtype == torch.float32


def test_synflow_respects_masks():
    net = chain(W1, W2)
    params = dict(net.named_parameters())
    # Mask W1[1, 0] (value 3): it scores 0, row sum of |W1| row 1 becomes 1, so W2[:, 1] scores
    # become |W2[:, 1]| * 1 = [1, 4]; W1 scores elsewhere unchanged.
    m1 = torch.ones(2, 3, dtype=torch.bool)
    m1[1, 0] = False
    out = synflow(net, params, input_shape=[3], masks={"0.weight": m1})
    assert torch.equal(out["0.weight"], T([[2.5, 5.0, 1.25], [0.0, 0.0, 5.0]]))
    assert torch.equal(out["2.weight"], T([[7.0, 1.0], [1.75, 4.0]]))
    # Mask column 1 of W2 (every path out of hidden unit 1): W1 row 1 has no path left -> 0.
    m2 = torch.ones(2, 2, dtype=torch.bool)
    m2[:, 1] = False
    out = synflow(net, {"0.weight": params["0.weight"]}, input_shape=(3,), masks={"2.weight": m2})
    assert list(out) == ["0.weight"]
    assert torch.equal(out["0.weight"], T([[2.5, 5.0, 1.25], [0.0, 0.0, 0.0]]))


def test_synflow_uses_eval_mode_float64_copy_and_leaves_model_alone():
    # BatchNorm1d in train mode cannot take a batch of 1: success shows the copy runs in eval mode.
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    net.train()
    before = snapshot(net)
    out = synflow(net, {"0.weight": net[0].weight, "3.weight": net[3].weight}, input_shape=(3,))
    assert set(out) == {"0.weight", "3.weight"}
    assert all(s.dtype == torch.float32 and bool((s >= 0).all()) for s in out.values())
    assert_unchanged(net, before)
    assert net[0].weight.dtype == torch.float32


def global_topk(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the round(density * total) highest scores over all tensors (ties: lower index)."""
    flat = torch.cat([s.flatten() for s in scores.values()])
    k = int(round(density * flat.numel()))
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = keep[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def test_synflow_masks_schedule_density_and_model_unchanged():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.ReLU(), nn.Linear(8, 4, bias=False))
    params = {"0.weight": net[0].weight, "2.weight": net[2].weight}
    before = snapshot(net)
    asked: list[float] = []

    def mask_fn(scores, density):
        asked.append(density)
        return global_topk(scores, density)

    masks = synflow_masks(net, params, input_shape=(6,), mask_fn=mask_fn, density=0.25, rounds=10)
    total = 48 + 32
    assert sum(int(m.sum()) for m in masks.values()) == 20  # exactly 0.25 * 80
    assert all(m.dtype == torch.bool for m in masks.values())
    assert len(asked) == 10
    assert asked[0] == pytest.approx(0.25 ** (1 / 10))
    assert asked[-1] == pytest.approx(0.25)
    assert all(a > b for a, b in pairwise(asked))
    assert total == sum(p.numel() for p in params.values())
    assert_unchanged(net, before)


def test_synflow_masks_one_round_equals_one_shot():
    net = chain(W1, W2)
    params = dict(net.named_parameters())
    # All 10 scores: W1 [2.5, 5, 1.25, 15, 0, 5], W2 [7, 4, 1.75, 16]; top 4 = 16, 15, 7, then 5
    # (tie between W1[0,1] and W1[1,2]: the lower index W1[0,1] wins).
    masks = synflow_masks(net, params, input_shape=(3,), mask_fn=global_topk, density=0.4, rounds=1)
    assert torch.equal(masks["0.weight"], T([[False, True, False], [True, False, False]]))
    assert torch.equal(masks["2.weight"], T([[True, False], [False, True]]))


# --------------------------------------------------------------------------------- movement


def test_movement_sign_one_and_two_batches():
    model = linear3(W_LIN)
    params = dict(model.named_parameters())
    # -w * g1 = -[1*-6, -2*-2, 0.25*8] = [6, -4, -2]
    assert torch.equal(movement(model, params, B1, loss_fn=sq_loss)["weight"], T([[6.0, -4.0, -2.0]]))
    # g = [-4, -2, 8]: -w * g = [4, -4, -2]
    assert torch.equal(movement(model, params, [B1, B2], loss_fn=sq_loss)["weight"], T([[4.0, -4.0, -2.0]]))


def test_movement_accumulator_two_steps():
    w = nn.Parameter(T([1.0, -2.0]))
    b = nn.Parameter(T([5.0]))
    acc = MovementAccumulator()
    # step 1: W = [1, -2], grad = [0.5, 1] -> -W*g = [-0.5, 2]; b has no grad -> adds nothing
    w.grad = T([0.5, 1.0])
    acc.update({"w": w, "b": b})
    # step 2: W = [2, -2], grad = [-1, -1] -> -W*g = [2, -2]; b: -5 * 0.5 = -2.5
    with torch.no_grad():
        w.copy_(T([2.0, -2.0]))
    w.grad = T([-1.0, -1.0])
    b.grad = T([0.5])
    acc.update({"w": w, "b": b})
    s = acc.scores()
    assert acc.steps == 2
    assert torch.equal(s["w"], T([1.5, 0.0]))
    assert torch.equal(s["b"], T([-2.5]))
    s["w"].add_(100.0)  # a copy: the accumulator is not affected
    assert torch.equal(acc.scores()["w"], T([1.5, 0.0]))
    acc.reset()
    assert acc.scores() == {} and acc.steps == 0
    acc.update({"w": w})
    with pytest.raises(SparseforgeError, match="shape"):
        acc.update({"w": torch.zeros(3)})


# ----------------------------------------------------------------------- model left unchanged


class Mixed(nn.Module):
    """Linear -> BatchNorm (train mode, stats would move) -> Linear in eval mode, one frozen param."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.fc2 = nn.Linear(4, 2)
        self.fc2.eval()
        self.fc1.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


@pytest.mark.parametrize("fn", [snip, grasp, movement])
def test_gradient_scores_leave_model_unchanged(fn):
    torch.manual_seed(0)
    model = Mixed()
    model.fc2.weight.grad = torch.full_like(model.fc2.weight, 7.0)  # an existing grad is kept
    params = {"fc1.weight": model.fc1.weight, "fc1.bias": model.fc1.bias, "fc2.weight": model.fc2.weight}
    before = snapshot(model)
    x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    out = fn(model, params, [(x, y), (x + 1, y)])
    assert set(out) == set(params)
    for name, s in out.items():
        assert s.shape == params[name].shape and s.dtype == torch.float32 and not s.requires_grad
        assert bool(torch.isfinite(s).all())
    assert out["fc1.bias"].abs().sum() > 0  # frozen parameter still scored
    assert_unchanged(model, before)
    assert torch.equal(model.fc2.weight.grad, torch.full_like(model.fc2.weight, 7.0))


def test_names_with_ddp_prefix_or_other_key_resolve():
    model = linear3(W_LIN)
    # "module." prefix added by DDP, and an arbitrary key matched by tensor identity
    a = snip(model, {"module.weight": model.weight}, B1, loss_fn=sq_loss)
    b = snip(model, {"first": model.weight}, B1, loss_fn=sq_loss)
    assert torch.equal(a["module.weight"], T([[6.0, 4.0, 2.0]]))
    assert torch.equal(b["first"], T([[6.0, 4.0, 2.0]]))


# ------------------------------------------------------------------------------- bad input


def test_bad_input_errors():
    model = linear3(W_LIN)
    params = dict(model.named_parameters())
    with pytest.raises(SparseforgeError, match="empty"):
        snip(model, params, [], loss_fn=sq_loss)
    with pytest.raises(SparseforgeError, match="empty"):
        grasp(model, params, iter([]), loss_fn=sq_loss)
    with pytest.raises(SparseforgeError, match="data item 0"):
        snip(model, params, [B1[0]], loss_fn=sq_loss)
    with pytest.raises(SparseforgeError, match="'nope'"):
        snip(model, {"nope": torch.zeros(1, 3)}, B1, loss_fn=sq_loss)
    with pytest.raises(SparseforgeError, match="scalar"):
        snip(model, params, B1, loss_fn=lambda o, t: (o - t).reshape(-1).repeat(2))
    with pytest.raises(SparseforgeError, match="seed"):
        random_scores(params, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(SparseforgeError, match="mapping"):
        magnitude([torch.zeros(2)])  # type: ignore[arg-type]
    for shape in (None, (), (0,), "3", (3.0,)):
        with pytest.raises(SparseforgeError, match="input_shape"):
            synflow(model, params, input_shape=shape)  # type: ignore[arg-type]
    with pytest.raises(SparseforgeError, match="bool"):
        synflow(model, params, input_shape=(3,), masks={"weight": torch.ones(1, 3)})
    with pytest.raises(SparseforgeError, match="shape"):
        synflow(model, params, input_shape=(3,), masks={"weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(SparseforgeError, match="'other'"):
        synflow(model, params, input_shape=(3,), masks={"other": torch.ones(1, 3, dtype=torch.bool)})
    for rounds in (0, -1, 2.0):
        with pytest.raises(SparseforgeError, match="rounds"):
            synflow_masks(model, params, input_shape=(3,), mask_fn=global_topk, density=0.5, rounds=rounds)
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(SparseforgeError, match="density"):
            synflow_masks(model, params, input_shape=(3,), mask_fn=global_topk, density=density)


def test_iter_batches_forms():
    assert len(list(iter_batches(B1))) == 1
    assert len(list(iter_batches([B1, B2]))) == 2
    assert len(list(iter_batches(list(B1)))) == 1  # a [x, y] list is one batch
    with pytest.raises(SparseforgeError, match="data"):
        list(iter_batches(5))  # type: ignore[arg-type]


def test_grasp_matches_full_hessian_on_small_mlp():
    # Independent check: build the full Hessian with torch.autograd.functional.hessian.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1, 0])
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat0 = torch.cat([p.detach().flatten() for p in net.parameters()])

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        tensors, start = {}, 0
        for n, shp in zip(names, shapes, strict=True):
            k = shp.numel()
            tensors[n] = flat[start : start + k].reshape(shp)
            start += k
        out = torch.func.functional_call(net, tensors, (x,))
        return nn.functional.cross_entropy(out, y)

    g = torch.autograd.functional.jacobian(loss_of, flat0)
    h = torch.autograd.functional.hessian(loss_of, flat0)
    expected = flat0 * (h @ g)
    out = grasp(net, dict(net.named_parameters()), (x, y))
    got = torch.cat([out[n].double().flatten() for n in names])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_scores_work_inside_no_grad():
    model = linear3(W_LIN)
    with torch.no_grad():
        out = snip(model, dict(model.named_parameters()), B1, loss_fn=sq_loss)
        net = chain(W1, W2)
        syn = synflow(net, dict(net.named_parameters()), input_shape=(3,))
    assert torch.equal(out["weight"], T([[6.0, 4.0, 2.0]]))
    assert torch.equal(syn["0.weight"], T(SYN_W1))
