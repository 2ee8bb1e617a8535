"""CF-LV-ViT: the coarse-to-fine method on LV-ViT (convolutional stem, auxiliary token head).

Differences from CF-DeiT, all in construction or in :meth:`CFLVViT.forward_stage_head`:

- patch embedding: the four-layer convolutional stem of LV-ViT;
- blocks divide both residual branches by ``skip_lam = 2``;
- an ``aux_head`` classifies every patch token; at evaluation a stage's logits are
  ``head(cls) + 0.25 * max over tokens of aux_head(tokens)``, which the release divides by
  1.25 at the coarse stage only (its early-exit thresholds were calibrated on that asymmetry);
- in training with ``dense_train_outputs`` (main_lvvit.py switches it on, as the release always
  did), each stage returns ``(cls_logits, dense_logits, box)`` for token labeling, the dense
  logits laid out on the stage's full grid and un-mixed from MixToken; without it, the
  evaluation logits (timm's contract: one (B, C) tensor per stage).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
import torch.nn as nn
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import init_weights_vit_timm

from .cf_deit import create_cf_model
from .cf_vit import NO_BOX, CFVisionTransformer, TokenLayout, _cfg, release_cfgs
from .layers import ConvStemPatchEmbed
from .token_ops import scatter_to_fine_grid

__all__ = ['CFLVViT']

#: Weight of the auxiliary token head in the evaluation logits.
AUX_WEIGHT = 0.25


class CFLVViT(CFVisionTransformer):
    """Coarse-to-fine LV-ViT (the released ``CF_LV_ViT`` with ``p_emb='4_2'``, dense head, MixToken).

    Args:
        aux_weight: weight of ``aux_head``'s max-over-tokens in the evaluation logits.
        normalize_coarse_logits: divide the coarse evaluation logits by ``1 + aux_weight``. True
            reproduces the released model.
        normalize_fine_logits: the same for the fine stage. False reproduces the released model
            (it never divided there).
        stem_chans: width of the convolutional stem.
        dense_train_outputs: training-mode ``forward`` returns the dense token-labeling tuples
            (the released model always did; ``main_lvvit.py`` switches it on). False: (B, C)
            evaluation logits per stage, what timm's training tools expect.
        **kwargs: as for :class:`CFVisionTransformer`; defaults here are LV-ViT's (skip_lam 2,
            LayerNorm eps 1e-5, no qkv bias, MixToken on, position embedding in the
            non-selective fine stage).
    """

    return_dense = True
    RECORDED_SWITCHES = CFVisionTransformer.RECORDED_SWITCHES + (
        'aux_weight', 'normalize_coarse_logits', 'normalize_fine_logits')

    def __init__(
            self,
            aux_weight: float = AUX_WEIGHT,
            normalize_coarse_logits: bool = True,
            normalize_fine_logits: bool = False,
            stem_chans: int = 64,
            dense_train_outputs: bool = False,
            **kwargs: Any,
    ) -> None:
        kwargs.setdefault('skip_lam', 2.0)
        kwargs.setdefault('qkv_bias', False)
        kwargs.setdefault('norm_layer', partial(nn.LayerNorm, eps=1e-5))
        kwargs.setdefault('mix_token', True)
        kwargs.setdefault('fine_pos_embed_without_selection', True)
        kwargs.setdefault('embed_layer', partial(ConvStemPatchEmbed, stem_chans=stem_chans))
        super().__init__(**kwargs)
        self.aux_weight = aux_weight
        self.normalize_coarse_logits = normalize_coarse_logits
        self.normalize_fine_logits = normalize_fine_logits
        self.dense_train_outputs = dense_train_outputs

    def _init_extra_heads(self) -> None:
        self.aux_head = (nn.Linear(self.embed_dim, self.num_classes, **self._head_factory()) if self.num_classes > 0
                         else nn.Identity())

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self._init_extra_heads()
        if isinstance(self.aux_head, nn.Linear):
            init_weights_vit_timm(self.aux_head)
        self.aux_head.train(self.training)

    def forward_stage_head(self, z: torch.Tensor, stage: int, dense: bool = False,
                           layout: Optional[TokenLayout] = None) -> Any:
        """Class-token logits plus the auxiliary token head.

        Args:
            z: (B, 1+M, D) normed tokens of a stage.
            stage: 0 coarse, 1 fine.
            dense: training output for token labeling instead of logits.
            layout: where the tokens sit (needed when ``dense``).

        Returns:
            (B, C) logits; or, when ``dense``, ``(cls_logits (B, C), dense_logits (B, h*w, C),
            box)`` with the dense logits on the stage's full row-major grid, un-mixed, and the
            MixToken box ``(row0, col0, row1, col1)`` on that grid ((0, 0, 0, 0) if none). Without
            a classifier (``num_classes=0``): the (B, D) class token, timm's pooled feature.
        """
        if self.num_classes == 0 and not dense:
            return z[:, 0]
        cls_logits = self.head(z[:, 0])
        aux = self.aux_head(z[:, 1:])  # (B, M, C)
        if dense:
            if layout is None:
                raise ValueError('dense outputs need the token layout')
            if layout.important_coarse_index is not None:
                aux = scatter_to_fine_grid(aux, layout.important_coarse_index,
                                           layout.unimportant_coarse_index, layout.coarse_grid)
            box = layout.mix_box
            if box is not None:
                h, w = layout.grid
                aux_map = self._mix_maps(aux.transpose(1, 2).reshape(aux.shape[0], -1, h, w), box)
                aux = aux_map.flatten(2).transpose(1, 2)
            return cls_logits, aux, tuple(box) if box is not None else NO_BOX
        logits = cls_logits + self.aux_weight * aux.max(dim=1).values
        normalize = self.normalize_coarse_logits if stage == 0 else self.normalize_fine_logits
        if normalize:
            logits = logits / (1.0 + self.aux_weight)
        return logits


def _lvvit_cfg(**kwargs: Any) -> dict:
    return _cfg(crop_pct=0.9, first_conv='patch_embed.conv1', classifier=('head', 'aux_head'), **kwargs)


default_cfgs = generate_default_cfgs({
    'cf_lvvit_tiny': _lvvit_cfg(),
    **release_cfgs('cf_lvvit_small', crop_pct=0.9, first_conv='patch_embed.conv1', classifier=('head', 'aux_head')),
})


@register_model
def cf_lvvit_tiny(pretrained: bool = False, **kwargs: Any) -> CFLVViT:
    """CF-LV-ViT-T: D=240, 4 heads, 12 blocks, mlp_ratio 3 (no released weights)."""
    model_args = dict(patch_size=16, embed_dim=240, depth=12, num_heads=4, mlp_ratio=3.0)
    return create_cf_model(CFLVViT, 'cf_lvvit_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def cf_lvvit_small(pretrained: bool = False, **kwargs: Any) -> CFLVViT:
    """CF-LV-ViT-S as released: D=384, 6 heads, 16 blocks, mlp_ratio 3."""
    model_args = dict(patch_size=16, embed_dim=384, depth=16, num_heads=6, mlp_ratio=3.0)
    return create_cf_model(CFLVViT, 'cf_lvvit_small', pretrained, **dict(model_args, **kwargs))
