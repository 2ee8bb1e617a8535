"""The two stages of a CF model as export-ready modules (tensors in, tensors out), for ONNX.

Early exit is data-dependent control flow, which an exported graph cannot hold; it is split at
the exit decision instead:

- :class:`CoarseStageGraph`: fine images in; the coarse image is made inside (as the model does),
  then the coarse stage; out come the coarse logits, their max-softmax confidence and the state the
  fine stage needs (final tokens, input embeddings, class attention).
- :class:`FineStageGraph`: the fine images and coarse state of the rows that go on; the fine stage
  with informative selection inside; out come the fine logits.

The runtime (``utils.inference.onnx_runtime``) decides the exit between the two. Both wrappers only call the
model's stage methods (``forward_coarse``, ``forward_fine``), so they compute exactly what
``forward_early_exit`` computes.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn

from .cf_vit import CoarseState

__all__ = ['CoarseStageGraph', 'FineStageGraph', 'SeparableBilinear', 'COARSE_INPUTS', 'COARSE_OUTPUTS',
           'FINE_INPUTS', 'FINE_OUTPUTS']

COARSE_INPUTS = ('x_fine',)
COARSE_OUTPUTS = ('coarse_logits', 'confidence', 'tokens', 'embeddings', 'cls_attn')
FINE_INPUTS = ('x_fine', 'tokens', 'embeddings', 'cls_attn')
FINE_OUTPUTS = ('fine_logits',)


class SeparableBilinear(nn.Module):
    """``F.interpolate(x, size, mode='bilinear', align_corners=True)`` as two gathers and blends.

    onnxruntime's ``Resize`` differs from torch's kernel by up to 1e-4 on normalized images, which
    twelve blocks amplify to 1e-3 in the logits; this form repeats torch's arithmetic (the source
    positions and weights in float32, columns blended first, then rows) and matches it to float
    rounding. Indices and weights are buffers fixed by the input and output sides.
    """

    def __init__(self, in_size: int, out_size: int) -> None:
        super().__init__()
        for axis in ('h', 'w'):  # square images: both axes alike
            lo, hi, w_lo, w_hi = self._taps(in_size, out_size)
            self.register_buffer(f'{axis}_lo', lo, persistent=False)
            self.register_buffer(f'{axis}_hi', hi, persistent=False)
            self.register_buffer(f'{axis}_w_lo', w_lo, persistent=False)
            self.register_buffer(f'{axis}_w_hi', w_hi, persistent=False)

    @staticmethod
    def _taps(in_size: int, out_size: int) -> Tuple[torch.Tensor, ...]:
        scale = torch.tensor((in_size - 1) / (out_size - 1) if out_size > 1 else 0.0, dtype=torch.float32)
        src = torch.arange(out_size, dtype=torch.float32) * scale
        lo = src.floor().long().clamp(max=in_size - 1)
        hi = (lo + 1).clamp(max=in_size - 1)
        w_hi = src - lo.float()
        return lo, hi, 1.0 - w_hi, w_hi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = x.index_select(3, self.w_lo) * self.w_w_lo + x.index_select(3, self.w_hi) * self.w_w_hi
        rows_lo = cols.index_select(2, self.h_lo) * self.h_w_lo.view(-1, 1)
        return rows_lo + cols.index_select(2, self.h_hi) * self.h_w_hi.view(-1, 1)


class CoarseStageGraph(nn.Module):
    """Fine images (B, 3, S_f, S_f) -> coarse logits, confidence and the coarse state (see module doc)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if getattr(model, 'selection_policy', 'attention') != 'attention':
            raise ValueError(f"only selection_policy='attention' exports (the graphs hand the class attention "
                             f"to the fine stage); this model has selection_policy={model.selection_policy!r}")
        self.model = model
        coarse, fine = model.img_size_list
        self.resize = SeparableBilinear(fine, coarse)

    def forward(self, x_fine: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        state = self.model.forward_coarse(self.resize(x_fine))
        logits = state.output
        confidence = logits.float().softmax(dim=-1).max(dim=-1).values  # as forward_details computes it
        return logits, confidence, state.tokens, state.embeddings, state.cls_attn


class FineStageGraph(nn.Module):
    """Fine images and coarse state of the rows that go on -> fine logits (informative selection on)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x_fine: torch.Tensor, tokens: torch.Tensor, embeddings: torch.Tensor,
                cls_attn: torch.Tensor) -> torch.Tensor:
        state = CoarseState(tokens, embeddings, cls_attn, None, self.model.coarse_grid)
        return self.model.forward_fine(x_fine, state, selection=True).output
