"""Perplexity of a causal LM over windows of token ids (shared by ``sparseforge llm eval`` and benchmarks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import check_int

__all__ = ["perplexity"]


def perplexity(model: Any, ids: torch.Tensor, batch_size: int = 8) -> tuple[float, int]:
    """``(mean next-token NLL in nats, tokens scored)`` of a causal LM over the windows ``ids``.

    ``ids`` is a LongTensor ``(windows, seqlen)``; every window is scored on its own (no cache,
    no state carried over), each position predicting the next one, so ``windows * (seqlen - 1)``
    tokens are scored. The perplexity is ``exp`` of the returned NLL. The sum runs in float64.
    """
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.inference_mode():
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s : s + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            target = batch[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
            total += float(nll.double())
            count += target.numel()
    return total / count, count
