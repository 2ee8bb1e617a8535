"""Coarse-to-fine variants of timm's plain ViT families, with the plain models' pretrained weights.

Each ``cf_<family>_<size>_patch16_224`` has the shape of timm's ``<family>_<size>_patch16_224`` and one
pretrained tag per weight set timm keeps for it (same tag name, same ``hf_hub_id`` / ``url``, same
normalization and crop). Loading goes through timm's own loader; the model's
``pretrained_filter_fn`` (:func:`models.convert.pretrained_filter_fn`) converts the plain weights::

    timm.create_model('cf_deit_small_patch16_224.fb_in1k', pretrained=True, coarse_stage_size=7)
    timm.create_model('cf_deit_small_patch16_224.fb_in1k', pretrained=True,
                      pretrained_cfg_overlay=dict(file='deit_small.pth'))   # a local copy, no network

Every variant has ``fine_pos_embed_without_selection=True`` (``models.convert.CONVERTED_SWITCHES``):
its fine stage without selection is then the plain ViT. CF weights (trained here, or saved by
``save_for_hf``) load into them as they are.

| CF model | plain timm model | D | depth | heads | layer scale |
|---|---|---|---|---|---|
| ``cf_deit_tiny/small/base_patch16_224`` | ``deit_*_patch16_224`` | 192/384/768 | 12 | 3/6/12 | no |
| ``cf_vit_tiny/small/base_patch16_224`` | ``vit_*_patch16_224`` | 192/384/768 | 12 | 3/6/12 | no |
| ``cf_deit3_small/base_patch16_224`` | ``deit3_*_patch16_224`` | 384/768 | 12 | 6/12 | yes (1e-6) |
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict

import timm
import torch.nn as nn
from timm.models import generate_default_cfgs, get_pretrained_cfg, register_model

from .cf_deit import create_cf_model
from .cf_vit import CFVisionTransformer, _cfg
from .convert import CONVERTED_SWITCHES

__all__ = ['CONVERTED_MODEL_NAMES', 'PLAIN_ARCHITECTURES']

_SHAPES = {'tiny': dict(embed_dim=192, num_heads=3), 'small': dict(embed_dim=384, num_heads=6),
           'base': dict(embed_dim=768, num_heads=12)}
#: CF model name -> (plain timm architecture, CF model arguments).
PLAIN_ARCHITECTURES: Dict[str, tuple] = {}
for _family, _sizes, _extra in (('deit', ('tiny', 'small', 'base'), {}), ('vit', ('tiny', 'small', 'base'), {}),
                                ('deit3', ('small', 'base'), dict(init_values=1e-6))):
    for _size in _sizes:
        PLAIN_ARCHITECTURES[f'cf_{_family}_{_size}_patch16_224'] = (
            f'{_family}_{_size}_patch16_224',
            dict(patch_size=16, depth=12, mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 **_SHAPES[_size], **_extra, **CONVERTED_SWITCHES))

#: The registered CF variants of plain timm ViTs.
CONVERTED_MODEL_NAMES = tuple(PLAIN_ARCHITECTURES)

#: Fields of the plain model's pretrained cfg that describe its weights and their data.
_KEPT = ('hf_hub_id', 'url', 'num_classes', 'mean', 'std', 'crop_pct', 'crop_mode', 'interpolation', 'license',
         'origin_url', 'label_names', 'label_offset')


def _tag_cfgs(cf_name: str, plain: str) -> Dict[str, Dict[str, Any]]:
    """One CF cfg per pretrained tag timm has for ``plain`` at 224 px, pointing at the same weights."""
    cfgs = {}
    for name in timm.list_pretrained(f'{plain}.*'):
        tag = name.split('.', 1)[1]
        src = get_pretrained_cfg(name).to_dict()
        if tuple(src.get('input_size') or ()) != (3, 224, 224):
            continue
        kept = {k: src[k] for k in _KEPT if src.get(k) is not None}
        if src.get('custom_load'):  # the url is an original-format file (.npz); the hub copy is timm's layout
            kept.pop('url', None)
        kept['description'] = f'the weights of {name}, converted to coarse-to-fine on load (models.convert)'
        cfgs[f'{cf_name}.{tag}'] = _cfg(**kept)
    if not cfgs:  # a timm without these weights: the architecture alone
        cfgs[cf_name] = _cfg(description=f'coarse-to-fine {plain}')
    return cfgs


default_cfgs = generate_default_cfgs({
    name: cfg for cf_name, (plain, _) in PLAIN_ARCHITECTURES.items() for name, cfg in _tag_cfgs(cf_name, plain).items()
})


def _variant(cf_name: str):
    plain, model_args = PLAIN_ARCHITECTURES[cf_name]

    def create(pretrained: bool = False, **kwargs: Any) -> CFVisionTransformer:
        return create_cf_model(CFVisionTransformer, cf_name, pretrained, **dict(model_args, **kwargs))

    create.__name__ = create.__qualname__ = cf_name
    create.__doc__ = (f'CF version of timm\'s {plain} (D={model_args["embed_dim"]}, {model_args["num_heads"]} heads, '
                      f'12 blocks{", layer scale" if "init_values" in model_args else ""}); its pretrained tags '
                      'load the plain weights and convert them.')
    create.__module__ = __name__
    return register_model(create)


for _name in CONVERTED_MODEL_NAMES:
    globals()[_name] = _variant(_name)
