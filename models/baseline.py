"""A plain (single-stage) timm classifier behind the coarse-to-fine calling convention.

Baselines such as DeiT are trained by ``main_deit.py`` with the very same recipe as CF-DeiT when
wrapped here: the model sees the fine image only and both "stages" return its logits, so the
CF-ViT objective reduces to the plain criterion (the KL term between identical distributions is
zero, and so is its gradient) and evaluation reports the same top-1 twice.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

from .cf_vit import resolve_img_size_list

__all__ = ['SingleStageBaseline', 'create_baseline']


class SingleStageBaseline(nn.Module):
    """Wraps ``model`` (input side ``img_size_list[1]``) so that ``forward(x)`` returns ``[y, y]``
    (and ``forward_stages(x)`` the pair, as CF models do)."""

    return_dense = False

    def __init__(self, model: nn.Module, img_size: int) -> None:
        super().__init__()
        self.model = model
        self.img_size_list = [img_size // 2, img_size]
        self.num_classes = getattr(model, 'num_classes', None)
        self.informative_selection = False
        self.pretrained_cfg = dict(getattr(model, 'pretrained_cfg', {}) or {}, input_size=(3, img_size, img_size))
        self.default_cfg = self.pretrained_cfg

    def set_informative_selection(self, enabled: bool = True) -> None:
        """No-op: a single-stage model has no selection (kept for the training loop)."""
        self.informative_selection = bool(enabled)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The wrapped model's grad checkpointing (timm's)."""
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set:
        inner = getattr(self.model, 'no_weight_decay', None)
        return {f'model.{n}' for n in inner()} if inner else set()

    def forward_stages(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(y, y)``: the model's logits of the fine image, as both "stages" (any mode)."""
        x_f = x if isinstance(x, torch.Tensor) else x[-1]
        y = self.model(x_f)
        return y, y

    def forward(self, x: Union[torch.Tensor, Sequence[torch.Tensor]]) -> List[torch.Tensor]:
        return list(self.forward_stages(x))


def create_baseline(name: str, coarse_stage_size: Optional[int] = None, patch_size: int = 16,
                    **kwargs: Any) -> SingleStageBaseline:
    """A timm model at the fine input size of ``coarse_stage_size`` (``2 * patch * g`` pixels)."""
    img_size = resolve_img_size_list(None, coarse_stage_size, None, patch_size)[1]
    model = timm.create_model(name, img_size=img_size, patch_size=patch_size, **kwargs)
    return SingleStageBaseline(model, img_size)
