"""The registered CF-DeiT models (``cf_deit_tiny``, ``cf_deit_small``) and :func:`create_cf_model`, timm's
builder for every registered CF model: tags and input sizes resolved, pretrained weights through
:func:`models.convert.pretrained_filter_fn` (CF weights as they are, a plain ViT's converted), missing
weights one :class:`~models.cf_vit.WeightsNotFoundError` line.

Kept apart from :mod:`models.cf_vit` (the model) so that imports flow one way: ``models.convert`` builds on
the model, and the builder here on both.
"""
from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._builder import resolve_pretrained_cfg

from .cf_vit import CFVisionTransformer, WeightsNotFoundError, _cfg, release_cfgs, resolve_img_size_list
from .convert import pretrained_filter_fn

__all__ = ['create_cf_model', 'cf_deit_tiny', 'cf_deit_small']

default_cfgs = generate_default_cfgs({
    'cf_deit_tiny': _cfg(),
    **release_cfgs('cf_deit_small'),
})



def _has_source(cfg: Any) -> bool:
    return cfg.source == 'local-dir' or any(getattr(cfg, k) for k in ('url', 'hf_hub_id', 'file', 'state_dict'))


def create_cf_model(model_cls: type, variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """Build a registered CF model through timm, with the input-size shorthands resolved.

    The model's ``pretrained_cfg['input_size']`` is set to its fine input size, so timm's
    ``resolve_data_config`` gives the right evaluation transform for any grid. ``features_only=True``
    goes through timm's feature getter (:meth:`CFVisionTransformer.forward_intermediates`, coarse
    stage), by default on the last 3 blocks (``out_indices``).
    """
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
    sizes = [kwargs.pop(k, None) for k in ('img_size_list', 'coarse_stage_size', 'img_size')]
    if isinstance(kwargs.get('pretrained_cfg'), str) and all(v is None for v in sizes) and cfg.input_size:
        sizes[2] = cfg.input_size[-1]  # a tag (cf_deit_small.release_g9_in1k): its input size
    kwargs['img_size_list'] = resolve_img_size_list(*sizes, kwargs.get('patch_size', 16))
    kwargs['img_size'] = kwargs['img_size_list'][1]  # or timm passes the cfg's (fixed) input size
    out_indices = kwargs.pop('out_indices', 3)
    name = f'{variant}.{cfg.tag}' if cfg.tag else variant
    if pretrained and not _has_source(cfg):
        raise WeightsNotFoundError(
            f'{name} has no download address: pass the file you downloaded ({cfg.origin_url or "README"}) as '
            'pretrained_cfg_overlay=dict(file=PATH)')
    try:
        model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=pretrained_filter_fn,
                                     feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **kwargs)
    except OSError as e:  # a hub or url source unreachable (offline), a missing file
        if not pretrained:
            raise
        where = cfg.file or cfg.hf_hub_id or cfg.url
        raise WeightsNotFoundError(
            f'cannot read the weights of {name} from {where} ({type(e).__name__}; HF_HUB_OFFLINE='
            f'{os.environ.get("HF_HUB_OFFLINE", "")}): download them once, or pass a local copy as '
            'pretrained_cfg_overlay=dict(file=PATH)') from e
    fine = kwargs['img_size_list'][1]
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, fine, fine))
    model.default_cfg = model.pretrained_cfg
    return model


@register_model
def cf_deit_tiny(pretrained: bool = False, **kwargs: Any) -> CFVisionTransformer:
    """CF-DeiT-Ti: D=192, 3 heads, 12 blocks (for CPU-sized experiments; no released weights)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return create_cf_model(CFVisionTransformer, 'cf_deit_tiny', pretrained, **dict(model_args, **kwargs))


@register_model
def cf_deit_small(pretrained: bool = False, **kwargs: Any) -> CFVisionTransformer:
    """CF-DeiT-S as released: D=384, 6 heads, 12 blocks."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6))
    return create_cf_model(CFVisionTransformer, 'cf_deit_small', pretrained, **dict(model_args, **kwargs))
