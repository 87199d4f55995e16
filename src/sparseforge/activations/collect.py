"""One calibrated pass over a model that hands each chosen layer's input rows to a callback."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..oneshot.driver import calibration_batches, real_rows

__all__ = ["CalibrationData", "for_each_input"]

#: What the calibrated passes accept: token ids ``(n, seqlen)``, ``(ids, attention_mask)`` or a mapping.
CalibrationData = torch.Tensor | Mapping[str, torch.Tensor] | tuple[torch.Tensor, torch.Tensor]


def for_each_input(
    model: nn.Module,
    calibration: CalibrationData,
    layers: Mapping[str, nn.Module],
    visit: Callable[[str, torch.Tensor], None],
    *,
    batch_size: int = 8,
) -> int:
    """Run the model on the calibration data and call ``visit(name, rows)`` with each layer's input.

    ``rows`` is the layer's input as a 2-D ``(tokens, in_features)`` tensor holding the real
    (unpadded) tokens of the batch, as the layer received it (before any thresholding the layer
    itself applies). Runs under ``torch.inference_mode()`` in eval mode (restored after). Returns
    the number of real tokens seen.
    """
    batches, token_masks = calibration_batches(model, calibration, batch_size)
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        x = inputs[0]
        rows = real_rows(x, state["mask"])
        visit(name, rows.reshape(-1, rows.shape[-1]))

    handles = [module.register_forward_pre_hook(lambda m, a, n=name: hook(n, m, a)) for name, module in layers.items()]
    was_training = model.training
    model.eval()
    tokens = 0
    try:
        with torch.inference_mode():
            for batch, mask in zip(batches, token_masks, strict=True):
                state["mask"] = mask
                model(**batch)
                tokens += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return tokens
