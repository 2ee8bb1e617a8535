"""Per-stage GFLOPs of a coarse-to-fine model, counted by ``torch.utils.flop_counter``.

Convention of the DeiT/DynamicViT/CF-ViT papers (and of fvcore, which produced the released
numbers): one multiply-add is one FLOP. ``FlopCounterMode`` counts a multiply-add as two, so its
matmul/convolution/attention counts are halved. fvcore also counts normalization and upsampling;
the same per-element costs are registered here (LayerNorm 5, eval BatchNorm 2, nearest upsampling
1 per element), so the totals agree with the released ``flop`` entries.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ['stage_gflops', 'count_gflops']

aten = torch.ops.aten


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


# FlopCounterMode reports 2 x multiply-adds; these per-element costs are doubled to stay in its units.
def _layer_norm_flop(input_shape, *args, **kwargs) -> int:
    return 2 * 5 * _numel(input_shape)


def _batch_norm_flop(input_shape, *args, **kwargs) -> int:
    return 2 * 2 * _numel(input_shape)


def _upsample_flop(*args, out_shape=None, **kwargs) -> int:
    return 2 * _numel(out_shape)


def _sdpa_flop(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _custom_mapping() -> Dict:
    """Formulas keyed by aten overload packets (what ``FlopCounterMode`` looks up)."""
    mapping = {aten.native_layer_norm: _layer_norm_flop, aten.upsample_nearest2d: _upsample_flop}
    # every kernel BatchNorm (LV-ViT's stem) may dispatch to: the CPU ones, and cuDNN's / MIOpen's on GPUs,
    # so the count does not depend on the device
    for name in ('_native_batch_norm_legit_no_training', '_native_batch_norm_legit', 'native_batch_norm',
                 '_batch_norm_no_update', '_batch_norm_with_update', 'cudnn_batch_norm', 'miopen_batch_norm'):
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = _batch_norm_flop
    # the CPU kernel of scaled_dot_product_attention has no formula of its own in torch
    if hasattr(aten, '_scaled_dot_product_flash_attention_for_cpu'):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_flop
    return mapping


def count_gflops(fn, *args, **kwargs) -> float:
    """GFLOPs (multiply-adds / 1e9) of ``fn(*args, **kwargs)``, run under a FLOP counter."""
    counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
    with counter:
        fn(*args, **kwargs)
    return counter.get_total_flops() / 2 / 1e9


@torch.no_grad()
def stage_gflops(model: nn.Module, selection: bool = True,
                 device: Optional[torch.device] = None) -> List[float]:
    """GFLOPs of one image: ``[coarse, coarse + fine]`` (the released ``flop`` entry).

    The second number counts both stages, since an image that goes on has paid for both.

    Args:
        model: a CF model (its train/eval mode is restored afterwards).
        selection: count the fine stage with informative selection (as at inference).
        device: where to run the counting forward (default: the model's device).
    """
    was_training = model.training
    model.eval()
    try:
        device = device or next(model.parameters()).device
        c, f = model.img_size_list
        x_c = torch.zeros(1, 3, c, c, device=device)
        x_f = torch.zeros(1, 3, f, f, device=device)
        counter = FlopCounterMode(display=False, custom_mapping=_custom_mapping())
        with counter:
            state = model.forward_coarse(x_c)
        coarse = counter.get_total_flops() / 2 / 1e9
        fine = count_gflops(model.forward_fine, x_f, state, selection=selection)
    finally:
        model.train(was_training)
    return [coarse, coarse + fine]
