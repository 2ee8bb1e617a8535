"""Image transforms derived from a model's pretrained cfg (crop_pct, interpolation, mean/std)."""
from __future__ import annotations

import math
from typing import Any, Callable, Dict

import torch.nn as nn
from timm.data import create_transform, resolve_data_config


def data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's data config of ``model``: input size (the fine side), crop_pct, interpolation, mean, std."""
    return resolve_data_config({}, model=model)


def eval_transform(model: nn.Module) -> Callable:
    """Evaluation transform of SPEC 1.

    Resize the short side to ``int(S_f / crop_pct)`` (bicubic), center-crop ``S_f``, to tensor,
    normalize. ``crop_pct`` is 0.875 for CF-DeiT and 0.9 for CF-LV-ViT. The coarse image is not
    made here: the model (or the engine) derives it from the fine one on the fly.
    """
    cfg = data_config(model)
    return create_transform(**cfg, is_training=False)


def eval_resize_size(fine_size: int, crop_pct: float) -> int:
    """Short side before the center crop, ``floor(S_f / crop_pct)`` (256 for 224 at 0.875)."""
    return int(math.floor(fine_size / crop_pct))
