"""CF-ViT models. Importing this package registers them with timm.

>>> import timm, models
>>> model = timm.create_model('cf_deit_small', coarse_stage_size=9, num_classes=1000)
"""
from .cf_lvvit import CFLVViT, cf_lvvit_small, cf_lvvit_tiny
from .cf_vit import (
    CFOutput, CFVisionTransformer, CoarseState, FineState, TokenLayout, checkpoint_filter_fn,
    cf_deit_small, cf_deit_tiny, resolve_img_size_list,
)
from .token_ops import coarse_from_fine

#: The registered coarse-to-fine model names.
MODEL_NAMES = ('cf_deit_tiny', 'cf_deit_small', 'cf_lvvit_tiny', 'cf_lvvit_small')

__all__ = [
    'CFVisionTransformer', 'CFLVViT', 'CFOutput', 'CoarseState', 'FineState', 'TokenLayout',
    'checkpoint_filter_fn', 'coarse_from_fine', 'resolve_img_size_list', 'MODEL_NAMES',
    'cf_deit_tiny', 'cf_deit_small', 'cf_lvvit_tiny', 'cf_lvvit_small',
]
