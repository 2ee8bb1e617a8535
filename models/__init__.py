"""CF-ViT models. Importing this package registers them with timm.

>>> import timm, models
>>> model = timm.create_model('cf_deit_small', coarse_stage_size=9, num_classes=1000)
>>> cf = timm.create_model('cf_deit_small_patch16_224.fb_in1k', pretrained=True)  # plain DeiT-S, converted
"""
from .cf_deit import cf_deit_small, cf_deit_tiny
from .cf_lvvit import CFLVViT, cf_lvvit_small, cf_lvvit_tiny
from .cf_vit import (
    CFOutput, CFVisionTransformer, CoarseState, FineState, TokenLayout, checkpoint_filter_fn, resolve_img_size_list,
)
from .convert import ConversionError, convert_state_dict, convert_vit, load_plain_vit
from .token_ops import coarse_from_fine
from .vit_variants import CONVERTED_MODEL_NAMES, PLAIN_ARCHITECTURES

#: The registered coarse-to-fine model names of the release (CONVERTED_MODEL_NAMES: the variants of
#: plain timm ViTs, models.vit_variants).
MODEL_NAMES = ('cf_deit_tiny', 'cf_deit_small', 'cf_lvvit_tiny', 'cf_lvvit_small')

__all__ = [
    'CFVisionTransformer', 'CFLVViT', 'CFOutput', 'CoarseState', 'FineState', 'TokenLayout',
    'checkpoint_filter_fn', 'coarse_from_fine', 'resolve_img_size_list', 'MODEL_NAMES',
    'cf_deit_tiny', 'cf_deit_small', 'cf_lvvit_tiny', 'cf_lvvit_small',
    'ConversionError', 'convert_vit', 'convert_state_dict', 'load_plain_vit', 'CONVERTED_MODEL_NAMES',
    'PLAIN_ARCHITECTURES',
]
