"""Make a pretrained plain timm ViT coarse-to-fine.

A plain ``VisionTransformer`` (DeiT, ViT, DeiT-III, or a fine-tuned copy with any class count) has
every weight of a :class:`~models.cf_vit.CFVisionTransformer` but three:

- ``pos_embed`` becomes the fine position embedding ``pos_embed_list.1`` (resampled with timm's
  ``resample_abs_pos_embed`` if the fine grid differs) and, resampled to the coarse grid, the coarse
  one ``pos_embed_list.0``. A position embedding without the class token's slot (DeiT-III,
  ``no_embed_class=True``) gets a zero slot: the plain model adds nothing to its class token either.
- ``reuse_block`` (the feature-reuse LayerNorm + MLP) is new: the LayerNorm and ``fc1`` keep the CF
  model's fresh initialization, the OUTPUT layer ``fc2`` is zero, so the reuse adds exactly 0 until
  fine-tuning moves it.
- everything else (``cls_token``, ``patch_embed``, ``blocks``, ``norm``, ``head``) by name.

With the switch ``fine_pos_embed_without_selection=True`` (SPEC 4.4; the released CF-DeiT omitted
the fine position embedding while selection was off), a converted model's fine stage with selection
off computes the plain ViT on the fine image. Every converted model has that switch on.

What has no CF counterpart is refused with a :class:`ConversionError` (a ``ValueError``) whose
message is one line naming the reason: no class token, register tokens, rotary position
embeddings, a distilled two-token head, average or attention pooling, a patch size or grid the CF
model cannot hold, weights without a place in it, or a checkpoint that is no ViT at all.

>>> import timm
>>> from models.convert import convert_vit
>>> plain = timm.create_model('deit_small_patch16_224')
>>> cf = convert_vit(plain)                      # 7x7 coarse grid on 112 px, 14x14 on 224 px
>>> cf.forward_fine(x, cf.forward_coarse(x_c), selection=False).output  # == plain(x)
"""
from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
from timm.layers import LayerScale, resample_abs_pos_embed
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import Block, init_weights_vit_timm

from .cf_vit import CFVisionTransformer, checkpoint_filter_fn

__all__ = [
    'ConversionError', 'convert_vit', 'convert_state_dict', 'load_plain_vit', 'pretrained_filter_fn',
    'plain_vit_state_dict', 'is_cf_state_dict', 'cf_kwargs_from_vit', 'pretrained_overlay', 'CONVERTED_SWITCHES',
    'ViTGeometry', 'plain_vit_geometry', 'states_no_embed_class', 'NO_CLASS_SLOT_FAMILIES',
]

_logger = logging.getLogger(__name__)

#: What every converted model sets: the fine stage adds its position embedding also without
#: informative selection (SPEC 4.4), so that it computes the plain ViT there.
CONVERTED_SWITCHES = dict(fine_pos_embed_without_selection=True)

#: Key prefix of this project's plain baseline wrapper (``models.baseline.SingleStageBaseline``).
BASELINE_PREFIX = 'model.'
#: The reuse MLP's output layer, zero after conversion.
REUSE_OUTPUT = 'reuse_block.1.fc2.'


class ConversionError(ValueError):
    """A model or checkpoint that cannot be made coarse-to-fine; the message is one line for a person."""


# ---------------------------------------------------------------------------------------------- state dicts
def is_cf_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for a CF model's (or a released CF checkpoint's) weights."""
    return 'pos_embed_list.0' in state_dict


def _unwrap(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """The bare weights: ``{'model': ...}`` / ``{'state_dict': ...}`` layouts and the ``module.``
    (DistributedDataParallel) and ``model.`` (``SingleStageBaseline``) prefixes removed."""
    state_dict = checkpoint_filter_fn(dict(state_dict))
    if state_dict and all(k.startswith(BASELINE_PREFIX) for k in state_dict):
        state_dict = {k[len(BASELINE_PREFIX):]: v for k, v in state_dict.items()}
    return state_dict


def _looks_like_vit(state_dict: Mapping[str, Any]) -> bool:
    return 'patch_embed.proj.weight' in state_dict and any(
        k.startswith('blocks.0.attn.') for k in state_dict)


def plain_vit_state_dict(checkpoint: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The plain-ViT weights inside ``checkpoint`` (timm layout, a training checkpoint, or this
    project's baseline wrapper with its ``model.`` prefix), or None if it holds something else
    (a CF model's weights, a ResNet's, ...)."""
    state_dict = _unwrap(checkpoint)
    if is_cf_state_dict(state_dict) or not _looks_like_vit(state_dict):
        return None
    return state_dict


def _first_keys(state_dict: Mapping[str, Any], n: int = 4) -> str:
    keys = list(state_dict)
    return ', '.join(keys[:n]) + (', ...' if len(keys) > n else '') if keys else 'none'


def _refuse_unsupported(state_dict: Mapping[str, Any]) -> None:
    """Raise :class:`ConversionError` for what has no CF counterpart (checked on key names)."""
    if is_cf_state_dict(state_dict):
        raise ConversionError('these weights are already coarse-to-fine (pos_embed_list.0): load them directly')
    if not _looks_like_vit(state_dict):
        raise ConversionError(
            f'not a ViT checkpoint: no patch_embed.proj.weight and blocks.0.attn (its first keys: '
            f'{_first_keys(state_dict)})')
    if 'dist_token' in state_dict or 'head_dist.weight' in state_dict:
        raise ConversionError(
            'a distilled two-token ViT (dist_token, head_dist: deit_*_distilled) cannot be converted: the CF '
            'stages classify from the class token alone; use the non-distilled model')
    rope = [k for k in state_dict if 'rope' in k or 'freqs' in k]
    if rope:
        raise ConversionError(
            f'a ViT with rotary position embeddings ({rope[0]}) cannot be converted: CF-ViT needs absolute ones')
    if 'reg_token' in state_dict:
        raise ConversionError(
            'a ViT with register tokens (reg_token) cannot be converted: the CF stages carry the class token only')
    if 'cls_token' not in state_dict:
        raise ConversionError(
            'a ViT without a class token (class_token=False) cannot be converted: CF-ViT ranks patches by the '
            "class token's attention and classifies from it")
    pooled = [k for k in state_dict if k.startswith(('fc_norm.', 'attn_pool.'))]
    if pooled:
        raise ConversionError(
            f'a ViT pooled by {pooled[0].split(".")[0]} (global_pool avg/map) cannot be converted: CF-ViT '
            'classifies from the class token')
    if 'pos_embed' not in state_dict:
        raise ConversionError('a ViT without an absolute position embedding (pos_embed) cannot be converted')


class ViTGeometry(NamedTuple):
    """A plain ViT's token layout as its weights state it (:func:`plain_vit_geometry`)."""
    patch_size: int
    grid: Tuple[int, int]
    class_slot: bool  # pos_embed has a slot for the class token (False: no_embed_class, DeiT-III)


#: CF models whose plain family's position embedding has no class-token slot (timm's ``no_embed_class=True``).
NO_CLASS_SLOT_FAMILIES = ('cf_deit3_',)


def states_no_embed_class(model: nn.Module) -> bool:
    """Whether the plain ViTs that convert into ``model`` keep no class-token slot in ``pos_embed`` (the CF
    variants of DeiT-III, by their registered name); every other model takes timm's default layout (a slot)."""
    name = (getattr(model, 'pretrained_cfg', None) or {}).get('architecture') or ''
    return name.startswith(NO_CLASS_SLOT_FAMILIES)


def plain_vit_geometry(state_dict: Mapping[str, Any], no_embed_class: bool = False) -> ViTGeometry:
    """The patch size, grid and class-token slot of a plain ViT's weights, from what they state: the patch
    projection's kernel, the class token, and the position embedding's length read in the layout the
    caller knows (``no_embed_class``: the in-memory ViT's own attribute, or the target CF family's). The one
    place every conversion route (``--finetune``, ``--pretrained FILE``, ``pretrained_cfg_overlay``,
    :func:`convert_vit`) decides the geometry: what cannot be proven square is refused, never guessed.

    Raises:
        ConversionError: no ViT, a non-square or empty grid, an embedding that is not a real (1, N, D) tensor.
    """
    _refuse_unsupported(state_dict)
    proj, pos, cls = state_dict['patch_embed.proj.weight'], state_dict['pos_embed'], state_dict['cls_token']
    for name, t in (('patch_embed.proj.weight', proj), ('pos_embed', pos), ('cls_token', cls)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ConversionError(f'{name} is {kind}, not a real floating-point tensor: not a ViT\'s weights')
    if proj.dim() != 4 or proj.shape[-1] != proj.shape[-2] or proj.shape[-1] < 1:
        raise ConversionError(f'patch_embed.proj.weight {list(proj.shape)} is not a square patch projection')
    if pos.dim() != 3 or pos.shape[0] != 1 or pos.shape[2] != cls.shape[-1] or pos.shape[2] != proj.shape[0]:
        raise ConversionError(f'pos_embed must be (1, tokens, {proj.shape[0]}) like the class token and the patch '
                              f'embedding, got {list(pos.shape)}')
    n = pos.shape[1]
    patches = n if no_embed_class else n - 1
    layout = 'no class token slot' if no_embed_class else 'a class token'
    if patches < 1:
        raise ConversionError(f'pos_embed holds {n} tokens: no positions for patches (with {layout})')
    side = math.isqrt(patches)
    if side * side != patches:
        hint = ''
        if not no_embed_class and math.isqrt(n) ** 2 == n:
            hint = ('; a ViT whose position embedding has no class-token slot (no_embed_class, DeiT-III) converts '
                    'into the cf_deit3_* models or through convert_vit, which know that layout')
        raise ConversionError(
            f'pos_embed holds {n} tokens: {patches} patch positions and {layout}: not a square grid (a non-square '
            f'input or extra prefix tokens), which the CF grids cannot hold{hint}')
    return ViTGeometry(int(proj.shape[-1]), (side, side), not no_embed_class)


def _with_class_slot(pos_embed: torch.Tensor, geometry: ViTGeometry) -> torch.Tensor:
    """(1, [1+]h*w, D) -> (1, 1+h*w, D): a zero class-token slot added where there is none (DeiT-III)."""
    if geometry.class_slot:
        return pos_embed
    return torch.cat((pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed), dim=1)


def _reuse_state(model: CFVisionTransformer) -> Dict[str, torch.Tensor]:
    """The new feature-reuse block: the model's own LayerNorm and fc1, fc2 zero."""
    out = {}
    for k, v in model.state_dict().items():
        if k.startswith('reuse_block.'):
            out[k] = torch.zeros_like(v) if k.startswith(REUSE_OUTPUT) else v
    return out


def convert_state_dict(state_dict: Mapping[str, Any], model: CFVisionTransformer,
                       no_embed_class: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """The weights of ``model`` (a CF-DeiT/ViT) made from a plain ViT's ``state_dict``.

    Args:
        state_dict: a plain timm ViT's weights (bare, ``{'model': ...}``, ``{'state_dict': ...}``, with
            ``module.`` or this project's baseline ``model.`` prefix).
        model: the CF model the weights are for; its grids, patch size and width decide. Its
            ``reuse_block`` LayerNorm and fc1 are taken as they are (fresh), fc2 set to zero.
        no_embed_class: the ViT's ``pos_embed`` has no class-token slot; None: as ``model``'s family says
            (:func:`states_no_embed_class`). The geometry is :func:`plain_vit_geometry`'s.

    Returns:
        A state dict with every key of ``model``. The head is copied whatever its class count: a caller
        that trains on other classes drops it (timm's pretrained loader and ``--finetune`` do).

    Raises:
        ConversionError: what cannot be converted, or does not fit ``model`` (one line).
    """
    if not isinstance(model, CFVisionTransformer) or getattr(model, 'return_dense', False) \
            or getattr(model, 'skip_lam', 1.0) != 1.0:
        raise ConversionError(
            f'a plain ViT converts into a CF-DeiT/ViT (CFVisionTransformer), not into {type(model).__name__}')
    state_dict = _unwrap(state_dict)
    geometry = plain_vit_geometry(state_dict, states_no_embed_class(model) if no_embed_class is None
                                  else no_embed_class)
    if geometry.patch_size != model.patch_size:
        raise ConversionError(
            f'the ViT has {geometry.patch_size} px patches but the CF model {model.patch_size} px ones: build the CF '
            f'model with patch_size={geometry.patch_size} (its grids hold patch-sized tokens only)')
    pos = _with_class_slot(state_dict['pos_embed'], geometry)
    out = {k: v for k, v in state_dict.items() if k != 'pos_embed'}
    out['pos_embed_list.1'] = resample_abs_pos_embed(pos, new_size=list(model.fine_grid), num_prefix_tokens=1)
    out['pos_embed_list.0'] = resample_abs_pos_embed(pos, new_size=list(model.coarse_grid), num_prefix_tokens=1)
    out.update(_reuse_state(model))

    own = model.state_dict()
    extra = [k for k in out if k not in own]
    if extra:
        raise ConversionError(
            f'the ViT has weights the CF model has no place for ({len(extra)}: {", ".join(extra[:4])}'
            f'{", ..." if len(extra) > 4 else ""}): another block type, depth, qk-norm, layer scale or pre-norm')
    missing = [k for k in own if k not in out]
    if missing:
        raise ConversionError(
            f'the ViT lacks weights of the CF model ({len(missing)}: {", ".join(missing[:4])}'
            f'{", ..." if len(missing) > 4 else ""}): another depth, bias or layer-scale setting')
    shapes = [f'{k} {list(out[k].shape)} vs {list(v.shape)}' for k, v in own.items()
              if not k.startswith('head.') and tuple(out[k].shape) != tuple(v.shape)]
    if shapes:
        raise ConversionError(f'the ViT does not fit the CF model (width or MLP size): {"; ".join(shapes[:3])}')
    return out


def load_plain_vit(model: CFVisionTransformer, state_dict: Mapping[str, Any]) -> None:
    """Load a plain ViT's weights into ``model`` (:func:`convert_state_dict`, strict) and turn on
    :data:`CONVERTED_SWITCHES`. A head of another class count raises (the caller decides)."""
    model.load_state_dict(convert_state_dict(state_dict, model), strict=True)
    for name, value in CONVERTED_SWITCHES.items():
        setattr(model, name, value)


def pretrained_filter_fn(state_dict: Dict[str, Any], model: nn.Module) -> Dict[str, Any]:
    """timm's ``pretrained_filter_fn`` of the CF-DeiT/ViT models: CF weights (released, trained here,
    saved by ``save_for_hf``) pass as they are (:func:`~models.cf_vit.checkpoint_filter_fn`); a plain
    ViT's are converted (:func:`convert_state_dict`) and the model's :data:`CONVERTED_SWITCHES` turned on."""
    bare = checkpoint_filter_fn(state_dict, model)
    if is_cf_state_dict(bare):
        return bare
    out = convert_state_dict(bare, model)  # type: ignore[arg-type]
    for name, value in CONVERTED_SWITCHES.items():
        setattr(model, name, value)
    _logger.info('converted plain ViT weights into %s (new feature-reuse block, output layer zero)',
                 type(model).__name__)
    return out


# ---------------------------------------------------------------------------------------------- models
def cf_kwargs_from_vit(vit: nn.Module) -> Dict[str, Any]:
    """The :class:`CFVisionTransformer` arguments that reproduce ``vit`` (a timm ``VisionTransformer``).

    Raises:
        ConversionError: the model is no plain class-token ViT (one line).
    """
    name = type(vit).__name__
    if hasattr(vit, 'dist_token') or hasattr(vit, 'head_dist'):
        raise ConversionError(
            f'{name} is a distilled two-token ViT (dist_token, head_dist: deit_*_distilled) and cannot be '
            'converted: the CF stages classify from the class token alone; use the non-distilled model')
    if getattr(vit, 'rope', None) is not None or any('rope' in n for n, _ in vit.named_modules()):
        raise ConversionError(
            f'{name} has rotary position embeddings and cannot be converted: CF-ViT needs absolute ones')
    if getattr(vit, 'reg_token', None) is not None:
        raise ConversionError(
            f'{name} has register tokens (reg_token) and cannot be converted: the CF stages carry the class '
            'token only')
    blocks = getattr(vit, 'blocks', None)
    patch_embed = getattr(vit, 'patch_embed', None)
    proj = getattr(patch_embed, 'proj', None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks) or not isinstance(proj, nn.Conv2d):
        raise ConversionError(f'{name} is not a plain timm VisionTransformer (blocks and patch_embed.proj)')
    if getattr(vit, 'cls_token', None) is None:
        raise ConversionError(
            f'{name} has no class token (class_token=False) and cannot be converted: CF-ViT ranks patches by '
            "the class token's attention and classifies from it")
    if getattr(vit, 'global_pool', 'token') != 'token':
        raise ConversionError(
            f"{name} pools by {vit.global_pool!r}, not by the class token: CF-ViT classifies from the class token")
    if getattr(vit, 'pos_embed', None) is None:
        raise ConversionError(f'{name} has no absolute position embedding (pos_embed) and cannot be converted')
    kinds = {type(b) for b in blocks}
    if kinds != {Block}:
        raise ConversionError(
            f'{name} has {", ".join(sorted(k.__name__ for k in kinds))} blocks; CF-ViT holds timm\'s pre-norm Block')
    patch = tuple(patch_embed.patch_size)
    if patch[0] != patch[1] or tuple(proj.stride) != tuple(proj.kernel_size) or tuple(proj.kernel_size) != patch:
        raise ConversionError(f'{name} has {patch} patches at stride {tuple(proj.stride)}: CF grids need '
                              'square, non-overlapping patches')
    blk = blocks[0]
    act = blk.mlp.act
    if type(act) is not nn.GELU or act.approximate != 'none':
        raise ConversionError(f'{name} has the MLP activation {act!r}; CF-ViT uses nn.GELU()')
    norm = vit.norm
    if not isinstance(norm, nn.LayerNorm):
        raise ConversionError(f'{name} ends with {type(norm).__name__}, not a LayerNorm')
    embed_dim = int(vit.embed_dim)
    return dict(
        patch_size=patch[0], in_chans=proj.in_channels, num_classes=int(vit.num_classes),
        embed_dim=embed_dim, depth=len(blocks), num_heads=int(blk.attn.num_heads),
        mlp_ratio=blk.mlp.fc1.out_features / embed_dim, qkv_bias=blk.attn.qkv.bias is not None,
        norm_layer=partial(nn.LayerNorm, eps=norm.eps),
        init_values=(1e-5 if isinstance(blk.ls1, LayerScale) else None),  # values are copied
    )


def convert_vit(vit: nn.Module, coarse_stage_size: Optional[int] = None, **kwargs: Any) -> CFVisionTransformer:
    """A new CF model holding ``vit``'s weights (``vit`` itself is left unchanged).

    Args:
        vit: a timm ``VisionTransformer`` with a class token (DeiT, ViT, DeiT-III; any class count).
        coarse_stage_size: coarse grid side ``g``; default half the ViT's own grid (7 for 224 px at
            patch 16), so the fine stage sees the ViT's input size and position embedding unchanged.
        **kwargs: further :class:`CFVisionTransformer` arguments (``drop_path_rate``, ``exit_threshold``,
            ``informative_selection``, ...); they cannot change the ViT's shape.

    Returns:
        The CF model in ``vit``'s training mode, with :data:`CONVERTED_SWITCHES` on and
        ``pretrained_cfg`` from ``vit``'s (normalization, crop) at the fine input size.

    Raises:
        ConversionError: what cannot be converted (one line).
    """
    cf_kwargs = cf_kwargs_from_vit(vit)
    clash = sorted(k for k in kwargs if k in cf_kwargs)
    if clash:
        raise ConversionError(f'{", ".join(clash)} come from the ViT and cannot be overridden')
    if coarse_stage_size is None and not any(k in kwargs for k in ('img_size_list', 'img_size')):
        grid = tuple(vit.patch_embed.grid_size)
        if grid[0] != grid[1] or grid[0] % 2:
            raise ConversionError(
                f'the ViT\'s {grid[0]}x{grid[1]} grid has no coarse half: pass coarse_stage_size '
                '(the position embedding is then resampled)')
        coarse_stage_size = grid[0] // 2
    cf_kwargs.update(kwargs, coarse_stage_size=coarse_stage_size, weight_init='skip', **CONVERTED_SWITCHES)
    with torch.device('meta'):  # no random initialization of weights that are overwritten anyway
        model = CFVisionTransformer(**cf_kwargs)
    # the new reuse block gets real (fresh) weights; everything else comes from the ViT
    model.reuse_block.to_empty(device=vit.cls_token.device)
    for module in model.reuse_block.modules():
        if isinstance(module, nn.LayerNorm):
            module.reset_parameters()
    named_apply(init_weights_vit_timm, model.reuse_block)
    state_dict = convert_state_dict(vit.state_dict(), model, no_embed_class=bool(getattr(vit, 'no_embed_class', False)))
    # copies: the CF model never shares storage with the ViT (the reuse block is its own already)
    state_dict = {k: (v if k.startswith('reuse_block.') else v.clone()) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.train(vit.training)
    fine = model.img_size_list[1]
    model.pretrained_cfg = dict(getattr(vit, 'pretrained_cfg', None) or {}, input_size=(3, fine, fine),
                                num_classes=model.num_classes)
    model.default_cfg = model.pretrained_cfg
    return model


def pretrained_overlay(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """``pretrained_cfg_overlay`` that makes timm's pretrained loader take the weights of ``checkpoint`` (a
    file's contents, CF or plain ViT, read by the caller): ``timm.create_model(name, pretrained=True,
    pretrained_cfg_overlay=pretrained_overlay(ckpt))``. Its ``num_classes`` is the checkpoint head's, so a
    model of that class count keeps the head and one of another count gets a fresh one (timm's rule)."""
    state_dict = _unwrap(checkpoint)
    head = state_dict.get('head.weight')
    if not is_cf_state_dict(state_dict):  # not a ViT, or no square grid in either layout: say so before timm does
        try:
            plain_vit_geometry(state_dict, no_embed_class=True)
        except ConversionError:
            plain_vit_geometry(state_dict)  # the model's filter decides the layout (convert_state_dict)
    return dict(state_dict=state_dict, num_classes=int(head.shape[0]) if head is not None and head.dim() == 2 else 0)
