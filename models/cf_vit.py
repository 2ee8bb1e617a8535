"""The coarse-to-fine Vision Transformer (CF-ViT, Chen et al., AAAI 2023) and CF-DeiT.

One transformer classifies an image twice with shared weights:

1. Coarse stage: a ``g x g`` split of an image downsampled to ``patch * g`` pixels. The class-token
   attention of blocks ``selection_start_block..depth-1``, accumulated with an exponential moving
   average, scores every coarse patch.
2. Fine stage: the ``k = ceil(ratio * g * g)`` best-scored coarse patches are re-split into 2x2
   fine patches of the full-resolution image; the other patches keep their coarse embeddings. The
   coarse stage's final features are reused (a LayerNorm + MLP, upsampled to the fine grid) in the
   fine embeddings.

Early exit stops after stage 1 for images whose top softmax probability reaches a threshold.

Every caller (training, evaluation, early exit, visualization) composes the same two methods,
:meth:`CFVisionTransformer.forward_coarse` and :meth:`CFVisionTransformer.forward_fine`; the
model keeps no per-call state on itself.

State-dict names follow the released checkpoints (``pos_embed_list.{0,1}``, ``reuse_block``,...),
which therefore load with ``strict=True``.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils.checkpoint import checkpoint
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, PatchEmbed, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from timm.models._manipulate import named_apply
from timm.models.vision_transformer import init_weights_vit_timm

from .layers import CFBlock
from .token_ops import (
    FINE_SCALE, coarse_from_fine, fine_children, gather_tokens, num_informative,
    rank_coarse_patches, upsample_tokens,
)

__all__ = [
    'CFVisionTransformer', 'CoarseState', 'FineState', 'CFOutput', 'TokenLayout',
    'checkpoint_filter_fn', 'resolve_img_size_list', 'exit_mask',
]

#: Share of the coarse patches re-split into fine ones (the paper's alpha).
INFORMATIVE_RATIO = 0.5
#: Decay of the moving average of class attention over blocks (the paper's beta).
ATTN_EMA_BETA = 0.99
#: First block (0-based) whose class attention enters the moving average.
SELECTION_START_BLOCK = 3
#: Default early-exit threshold of the eval-mode ``forward``: above any softmax probability (a
#: float32 softmax can reach exactly 1.0, so 1.0 would still let some images exit): no image exits.
NEVER_EXIT = math.inf
#: What the released ``no_weight_decay()`` returned; ``'pos_embed_list'`` matches no parameter name, so the
#: released training decayed the position embeddings (``no_weight_decay()`` here leaves the dead entry out).
RELEASED_NO_WEIGHT_DECAY = frozenset({'pos_embed_list', 'cls_token'})
#: How the fine stage picks its informative patches (``selection_policy``): the release's, and the paper's ablation.
SELECTION_POLICIES = ('attention', 'random')

Box = Tuple[int, int, int, int]  # (row0, col0, row1, col1) on a token grid, end-exclusive
NO_BOX: Box = (0, 0, 0, 0)

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


# ---------------------------------------------------------------------- MixToken boxes
# Leaves of torch.fx graphs (timm's notrace registry and torch.fx.wrap): a traced training graph
# draws a new box at every call and mixes with it, as the eager model does.
def draw_mix_box(grid: Tuple[int, int], beta: float = 1.0) -> Box:
    """A random box covering about ``1 - lambda`` of an (h, w) grid, lambda ~ Beta(beta, beta)."""
    h, w = grid
    lam = float(torch.distributions.Beta(beta, beta).sample())
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(h * cut), int(w * cut)
    cy = int(torch.randint(h, ()).item())
    cx = int(torch.randint(w, ()).item())
    clip = lambda v, hi: min(max(v, 0), hi)  # noqa: E731
    return (clip(cy - cut_h // 2, h), clip(cx - cut_w // 2, w),
            clip(cy + cut_h // 2, h), clip(cx + cut_w // 2, w))


@register_notrace_function
def draw_mix_box_for(x: torch.Tensor, grid: Tuple[int, int], beta: float = 1.0) -> Box:
    """:func:`draw_mix_box` as a graph node: ``x`` (any tensor of the batch) only ties it to the graph."""
    return draw_mix_box(grid, beta)


@register_notrace_function
def mix_maps(x: torch.Tensor, box: Box) -> torch.Tensor:
    """Replace the box of each (B, D, h, w) map with that of the batch flipped."""
    r0, c0, r1, c1 = box
    out = x.clone()
    out[:, :, r0:r1, c0:c1] = x.flip(0)[:, :, r0:r1, c0:c1]
    return out


@register_notrace_function
def scale_box(box: Box, scale: int) -> Box:
    """The box on a grid ``scale`` times finer."""
    return tuple(scale * v for v in box)  # type: ignore[return-value]


for _leaf in ('draw_mix_box_for', 'mix_maps', 'scale_box'):
    torch.fx.wrap(_leaf)


class CoarseState(NamedTuple):
    """What the coarse stage hands to the fine stage (and to callers).

    Attributes:
        tokens: (B, 1+N_c, D) final normed tokens ``z_c`` (class token first).
        embeddings: (B, 1+N_c, D) input embeddings ``e_c`` (patch embedding + position embedding).
        cls_attn: (B, N_c) float32 class-token attention per coarse patch (moving average over
            the selection blocks, mean over heads).
        output: the stage's head output (logits, or the dense training tuple of LV-ViT).
        grid: coarse token grid (h, w).
        mix_box: MixToken box on the coarse grid, or None.
        scores: (B, N_c) scores that rank the coarse patches when they are not ``cls_attn`` (the
            ``'random'`` selection policy's draws), else None.
    """
    tokens: torch.Tensor
    embeddings: torch.Tensor
    cls_attn: torch.Tensor
    output: Any
    grid: Tuple[int, int]
    mix_box: Optional[Box] = None
    scores: Optional[torch.Tensor] = None

    @property
    def ranking(self) -> torch.Tensor:
        """(B, N_c) what the informative patches are chosen by: ``scores``, or the class attention."""
        return self.cls_attn if self.scores is None else self.scores

    def take(self, rows: torch.Tensor) -> 'CoarseState':
        """The state of the samples ``rows`` (a 1-D index tensor) only."""
        return self._replace(
            tokens=self.tokens[rows], embeddings=self.embeddings[rows], cls_attn=self.cls_attn[rows],
            output=None, scores=None if self.scores is None else self.scores[rows])


class FineState(NamedTuple):
    """Result of the fine stage.

    Attributes:
        tokens: (B, 1+M, D) final normed tokens (M = N_f without selection, 4k + N_c - k with).
        output: the stage's head output.
        important_coarse_index: (B, k) coarse patches re-split (None without selection).
        unimportant_coarse_index: (B, N_c-k) coarse patches kept coarse (None without selection).
        important_fine_index: (B, 4k) fine patches used (None without selection).
    """
    tokens: torch.Tensor
    output: Any
    important_coarse_index: Optional[torch.Tensor] = None
    unimportant_coarse_index: Optional[torch.Tensor] = None
    important_fine_index: Optional[torch.Tensor] = None


class CFOutput(NamedTuple):
    """Everything one coarse-to-fine inference decided, for evaluation and visualization.

    Attributes:
        coarse_logits: (B, C) coarse-stage logits.
        fine_logits: (B, C) fine-stage logits; rows that exited early hold their coarse logits,
            so this is the final prediction of early-exit inference.
        exited: (B,) bool, True where the sample stopped after the coarse stage.
        confidence: (B,) float32 max softmax probability of the coarse logits.
        cls_attn: (B, N_c) float32 class-attention map of the coarse stage.
        important_coarse_index: (B, k) informative coarse patches (what selection picks, also
            for rows that exited).
        important_fine_index: (B, 4k) their fine children.
    """
    coarse_logits: torch.Tensor
    fine_logits: torch.Tensor
    exited: torch.Tensor
    confidence: torch.Tensor
    cls_attn: torch.Tensor
    important_coarse_index: torch.Tensor
    important_fine_index: torch.Tensor

    @property
    def logits(self) -> torch.Tensor:
        """(B, C) final prediction: coarse logits where the sample exited, fine elsewhere."""
        return self.fine_logits


class TokenLayout(NamedTuple):
    """Where a stage's tokens sit, for heads that emit one output per token (LV-ViT).

    Attributes:
        grid: the stage's full token grid (h, w): coarse grid, or the fine grid (2h, 2w).
        coarse_grid: the coarse grid.
        important_coarse_index: (B, k) or None (coarse stage, or fine stage without selection).
        unimportant_coarse_index: (B, N_c-k) or None.
        mix_box: MixToken box on ``grid``, or None.
    """
    grid: Tuple[int, int]
    coarse_grid: Tuple[int, int]
    important_coarse_index: Optional[torch.Tensor] = None
    unimportant_coarse_index: Optional[torch.Tensor] = None
    mix_box: Optional[Box] = None


def exit_mask(confidence: torch.Tensor, threshold: Optional[float]) -> torch.Tensor:
    """The early-exit rule, for the model and every runtime of its stages: (B,) bool, True where the coarse
    max-softmax ``confidence`` (B,) is ``>= threshold``; all False for None (the fine stage for every row).

    Raises:
        ValueError: a NaN threshold (no comparison would hold: silently no exit at all).
    """
    if threshold is None:
        return torch.zeros_like(confidence, dtype=torch.bool)
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError('the early-exit threshold is NaN')
    return confidence >= threshold


def resolve_img_size_list(
        img_size_list: Optional[Sequence[int]] = None,
        coarse_stage_size: Optional[int] = None,
        img_size: Optional[int] = None,
        patch_size: int = 16,
) -> List[int]:
    """The ``[coarse, fine]`` input sides from whichever of the three spellings was given.

    ``coarse_stage_size=g`` means ``[patch * g, 2 * patch * g]``; ``img_size`` (timm's name) is the
    fine side. Without any, the released default ``[112, 224]`` (g = 7 at patch 16) is used.
    """
    candidates = []
    if img_size_list is not None:
        candidates.append(('img_size_list', [int(s) for s in img_size_list]))
    if coarse_stage_size is not None:
        g = int(coarse_stage_size)
        candidates.append(('coarse_stage_size', [patch_size * g, FINE_SCALE * patch_size * g]))
    if img_size is not None:
        s = to_2tuple(img_size)
        if s[0] != s[1]:
            raise ValueError(f'only square inputs are supported, got img_size={img_size}')
        candidates.append(('img_size', [s[0] // FINE_SCALE, s[0]]))
    if not candidates:
        return [7 * patch_size, 7 * FINE_SCALE * patch_size]
    name, sizes = candidates[0]
    for other, other_sizes in candidates[1:]:
        if other_sizes != sizes:
            raise ValueError(f'{name} gives input sizes {sizes} but {other} gives {other_sizes}')
    if len(sizes) != 2:
        raise ValueError(f'img_size_list needs two sizes [coarse, fine], got {sizes}')
    coarse, fine = sizes
    if fine != FINE_SCALE * coarse:
        raise ValueError(f'the fine input must be {FINE_SCALE}x the coarse one, got {sizes}')
    if coarse < patch_size:
        raise ValueError(f'the coarse input must hold at least one {patch_size} px patch, got {sizes} from {name}'
                         + (f'={coarse_stage_size}' if name == 'coarse_stage_size' else ''))
    if coarse % patch_size:
        raise ValueError(f'input size {coarse} is not a multiple of the patch size {patch_size}')
    return sizes


def _selection_start_block(block: Optional[int], depth: int) -> int:
    """The first block whose class attention the selection averages: the paper's block 3, or the last block
    of shallower models, unless given."""
    if block is None:
        block = min(SELECTION_START_BLOCK, depth - 1)
    if not 0 <= block < depth:
        raise ValueError(f'selection_start_block must be in [0, depth={depth}), got {block}')
    return block


class CFVisionTransformer(nn.Module):
    """Coarse-to-fine ViT with DeiT blocks (the released ``CFVisionTransformer``).

    Args:
        img_size_list: ``[coarse, fine]`` input sides; the fine one is twice the coarse one.
        coarse_stage_size: shorthand ``g`` for ``img_size_list = [patch*g, 2*patch*g]``.
        img_size: timm's spelling of the fine side.
        patch_size: pixels per token side at both stages.
        in_chans: input channels.
        num_classes: classes of the head (0 for none).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: transformer shape.
        drop_rate: dropout after the position embedding and in the MLPs.
        attn_drop_rate: attention dropout.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        norm_layer: normalization constructor (LayerNorm with eps 1e-6 by default).
        act_layer: MLP activation.
        skip_lam: residual scaling of the blocks (1 for DeiT).
        informative_ratio: share of coarse patches re-split (alpha); settable on a built model
            (``model.informative_ratio = 1.0``), e.g. to evaluate a trained model at another alpha.
        selection_policy: how the fine stage picks its informative patches: ``'attention'`` (the
            release: the most attended coarse patches) or ``'random'`` (the paper's ablation: the
            same number of patches, drawn per image from a generator seeded with ``selection_seed``).
        selection_seed: seed of the ``'random'`` policy's generator (re-seeded by
            :meth:`reset_selection_generator`).
        feature_reuse: add the coarse stage's reused features to the fine embeddings (the release).
            False is the paper's ablation without feature reuse: the fine stage starts from the patch
            embeddings alone (``reuse_block`` stays in the model, unused, so checkpoints still load).
        device, dtype: where and in which dtype the parameters are made (timm's ``create_model(...,
            device=, dtype=)``); default: the CPU in torch's default dtype.
        attn_ema_beta: decay of the class-attention moving average (beta).
        selection_start_block: first block whose attention enters the average (default 3, the
            paper's; the last block for models of depth 3 or less).
        informative_selection: start with informative selection on (the default: the inference
            path, and fine-tuning as the released fine stage after epoch 200). The training
            scripts switch it per epoch as released (off until ``--selection-start-epoch``).
        fine_pos_embed_without_selection: add ``pos_embed_list.1`` in the fine stage also when
            selection is off. False reproduces the released CF-DeiT, whose non-selective fine
            stage omitted it; the paper's DeiT results were trained that way.
        mix_token: MixToken augmentation of the patch embeddings in training (LV-ViT).
        embed_layer: patch-embedding constructor ``(patch_size, in_chans, embed_dim) -> module``
            returning (B, D, h, w) maps; timm's ``PatchEmbed`` by default.
        exit_threshold: early-exit threshold of the eval-mode ``forward`` (one (B, C) tensor, as
            timm's tools expect): an image whose coarse max-softmax is ``>=`` it exits. The default
            :data:`NEVER_EXIT` lets none exit: the fine stage's prediction for every image.
        forward_returns_both_stages: True reproduces the released ``forward``, which returned the
            list ``[coarse, fine]`` in eval mode too. False (default): eval mode returns the
            early-exit prediction, training mode the tuple ``(coarse, fine)``.
        init_values: layer scale of the blocks' residual branches (timm's ``LayerScale``, keys
            ``blocks.i.ls1.gamma`` / ``ls2.gamma``; DeiT-III); None (the released models): none.
        weight_init: ``''``: timm's ViT initialization; ``'skip'`` (timm's spelling): none, for weights
            that are loaded right after (``models.convert`` builds on the meta device so).
        half_precision_cls_attn: under ``torch.autocast``, compute the class-token attention row
            that ranks the patches in the autocast dtype, as the release's AMP training did
            (training parity). False (default): the row is float32 as documented, also under
            autocast. Without autocast both are the same.
    """

    #: The model has dense (per-token) stage outputs for token labeling (LV-ViT).
    return_dense: bool = False
    #: Training-mode ``forward`` returns the dense tuples (LV-ViT; main_lvvit.py switches it on).
    dense_train_outputs: bool = False

    def __init__(
            self,
            img_size_list: Optional[Sequence[int]] = None,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.0,
            qkv_bias: bool = True,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            norm_layer: Optional[Any] = None,
            act_layer: Optional[Any] = None,
            skip_lam: float = 1.0,
            informative_ratio: float = INFORMATIVE_RATIO,
            attn_ema_beta: float = ATTN_EMA_BETA,
            selection_start_block: Optional[int] = None,
            informative_selection: bool = True,
            fine_pos_embed_without_selection: bool = False,
            mix_token: bool = False,
            embed_layer: Optional[Any] = None,
            coarse_stage_size: Optional[int] = None,
            img_size: Optional[int] = None,
            exit_threshold: float = NEVER_EXIT,
            forward_returns_both_stages: bool = False,
            init_values: Optional[float] = None,
            weight_init: str = '',
            half_precision_cls_attn: bool = False,
            selection_policy: str = 'attention',
            selection_seed: int = 0,
            feature_reuse: bool = True,
            device: Optional[Any] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        self.img_size_list = resolve_img_size_list(img_size_list, coarse_stage_size, img_size, patch_size)
        selection_start_block = _selection_start_block(selection_start_block, depth)
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        act_layer = act_layer or nn.GELU

        self.num_classes, self.in_chans = num_classes, in_chans
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.exit_threshold = float(exit_threshold)
        self.forward_returns_both_stages = forward_returns_both_stages
        self.grad_checkpointing = False
        self.patch_size = patch_size
        self.coarse_grid = (self.img_size_list[0] // patch_size,) * 2
        self.fine_grid = (self.img_size_list[1] // patch_size,) * 2
        self.informative_ratio = informative_ratio  # also sets num_informative
        if selection_policy not in SELECTION_POLICIES:
            raise ValueError(f'selection_policy must be one of {", ".join(map(repr, SELECTION_POLICIES))}, '
                             f'got {selection_policy!r}')
        self.selection_policy = selection_policy
        self.selection_seed = int(selection_seed)
        self._selection_generator: Optional[torch.Generator] = None
        self.feature_reuse = bool(feature_reuse)
        self.attn_ema_beta = attn_ema_beta
        self.selection_start_block = selection_start_block
        self.informative_selection = informative_selection
        self.fine_pos_embed_without_selection = fine_pos_embed_without_selection
        self.mix_token = mix_token
        self.mix_beta = 1.0  # MixToken's lambda ~ Beta(1, 1)

        self._build_layers(embed_layer, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
                           qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, norm_layer, act_layer, skip_lam,
                           init_values, half_precision_cls_attn)
        # timm's feature metadata: every block's tokens as a map of the coarse grid (reduction
        # relative to the fine input, the model's input size)
        self.feature_info = [
            dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=FINE_SCALE * patch_size) for i in range(depth)]
        if weight_init not in ('', 'skip'):
            raise ValueError(f"weight_init must be '' or 'skip', got {weight_init!r}")
        if weight_init != 'skip':
            self.init_weights()
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def _build_layers(self, embed_layer: Optional[Any], patch_size: int, in_chans: int, num_classes: int,
                      embed_dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                      drop_rate: float, attn_drop_rate: float, drop_path_rate: float, norm_layer: Any,
                      act_layer: Any, skip_lam: float, init_values: Optional[float],
                      half_precision_cls_attn: bool) -> None:
        """The layers, registered in the released order (the checkpoint's and the optimizer's order)."""
        if embed_layer is None:
            embed_layer = partial(PatchEmbed, img_size=self.img_size_list[1], flatten=False,
                                  strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = embed_layer(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.pos_embed_list = nn.ParameterList([
            nn.Parameter(torch.zeros(1, 1 + h * w, embed_dim)) for h, w in (self.coarse_grid, self.fine_grid)
        ])
        self.pos_drop = nn.Dropout(p=drop_rate)
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]  # also under a meta device
        self.blocks = nn.ModuleList([
            CFBlock(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                proj_drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
                norm_layer=norm_layer, act_layer=act_layer, skip_lam=skip_lam, init_values=init_values)
            for i in range(depth)])
        for blk in self.blocks:
            blk.attn.half_precision_cls_attn = bool(half_precision_cls_attn)
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_extra_heads()
        self.reuse_block = nn.Sequential(
            norm_layer(embed_dim),
            Mlp(in_features=embed_dim, hidden_features=int(mlp_ratio * embed_dim), out_features=embed_dim,
                act_layer=act_layer, drop=drop_rate),
        )

    @property
    def informative_ratio(self) -> float:
        """Share alpha of the coarse patches the fine stage re-splits; setting it sets ``num_informative``."""
        return self._informative_ratio

    @informative_ratio.setter
    def informative_ratio(self, ratio: float) -> None:
        k = num_informative(self.coarse_grid[0] * self.coarse_grid[1], ratio)  # ValueError outside (0, 1]
        self._informative_ratio = float(ratio)
        self.num_informative = k

    def reset_selection_generator(self) -> None:
        """Restart the ``'random'`` selection policy's draws from ``selection_seed``."""
        self._selection_generator = None

    #: Constructor arguments that change what a built model computes but not its weights' shapes. They are
    #: attributes, which code may change on a built model (conversion turns on
    #: ``fine_pos_embed_without_selection``; ablations set the selection ones), so a training checkpoint
    #: records their values (:meth:`switches`) and builders set them back (:meth:`set_switches`).
    RECORDED_SWITCHES: Tuple[str, ...] = (
        'fine_pos_embed_without_selection', 'informative_ratio', 'attn_ema_beta', 'selection_start_block',
        'selection_policy', 'selection_seed', 'feature_reuse', 'mix_token')

    def switches(self) -> Dict[str, Any]:
        """``{name: value}`` of :attr:`RECORDED_SWITCHES` as the model is now (plain numbers, text, booleans)."""
        return {name: getattr(self, name) for name in self.RECORDED_SWITCHES}

    def set_switches(self, **values: Any) -> None:
        """Set switches of :attr:`RECORDED_SWITCHES` on the built model, checked as the constructor checks
        them; nothing is set when one is refused.

        Raises:
            ValueError: an unknown name or a value of the wrong type or range (one line).
        """
        checks = {
            'fine_pos_embed_without_selection': lambda v: isinstance(v, bool),
            'feature_reuse': lambda v: isinstance(v, bool),
            'mix_token': lambda v: isinstance(v, bool),
            'normalize_coarse_logits': lambda v: isinstance(v, bool),
            'normalize_fine_logits': lambda v: isinstance(v, bool),
            'selection_policy': lambda v: v in SELECTION_POLICIES,
            'selection_seed': lambda v: isinstance(v, int) and not isinstance(v, bool),
            'selection_start_block': lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(
                self.blocks),
            'attn_ema_beta': lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
            'aux_weight': lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
            'informative_ratio': lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1,
        }
        for name, value in values.items():
            if name not in self.RECORDED_SWITCHES:
                raise ValueError(f'{name} is not a switch of {type(self).__name__} '
                                 f'(its switches: {", ".join(self.RECORDED_SWITCHES)})')
            if not checks[name](value):
                raise ValueError(f'{name}={value!r} is not a valid value')
        for name, value in values.items():
            setattr(self, name, value)
        if {'selection_policy', 'selection_seed'} & set(values):
            self.reset_selection_generator()

    # ------------------------------------------------------------------ construction helpers
    def _init_extra_heads(self) -> None:
        """Hook for variants with more heads (LV-ViT's ``aux_head``)."""

    def init_weights(self) -> None:
        """timm's ViT initialization: truncated normal (std .02) for embeddings and Linear layers."""
        for pos_embed in self.pos_embed_list:
            trunc_normal_(pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        named_apply(init_weights_vit_timm, self)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names exempt from weight decay: the parameters the release exempted.

        Released-training quirk: the release listed :data:`RELEASED_NO_WEIGHT_DECAY`, whose
        ``'pos_embed_list'`` matches no parameter name (they are ``pos_embed_list.0`` / ``.1``), so the
        position embeddings were decayed. The dead entry is left out (timm's contract: every entry names a
        parameter); the optimizer's groups are the same. ``--exempt-pos-embed-from-wd`` exempts them.
        """
        return {'cls_token'}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the classifier head(s) with fresh ones for ``num_classes`` (0 removes them).

        ``global_pool`` is accepted for timm's signature; the class token is always the pooled feature. The new
        head is built on the model's device and dtype and in its training mode.
        """
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes, **self._head_factory()) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            init_weights_vit_timm(self.head)
        self.head.train(self.training)

    def _head_factory(self) -> Dict[str, Any]:
        """``device`` and ``dtype`` for a new head: the model's own (timm's contract for ``reset_classifier``)."""
        return dict(device=self.cls_token.device, dtype=self.cls_token.dtype)

    def set_informative_selection(self, enabled: bool = True) -> None:
        """Switch informative selection of the fine stage on (late training, inference) or off."""
        self.informative_selection = bool(enabled)

    # ------------------------------------------------------------------ inputs
    def split_inputs(self, x: Inputs) -> Tuple[torch.Tensor, torch.Tensor]:
        """``[x_coarse, x_fine]``, or ``x_fine`` alone (the coarse image is then derived from it).

        Returns:
            (B, C, S_c, S_c) and (B, C, S_f, S_f), checked against the model's input sizes.
        """
        if isinstance(x, (list, tuple)):
            if len(x) != 2:
                raise TypeError('expected a fine image batch or a pair [x_coarse, x_fine]')
            x_c, x_f = x
            self._check_size(x_c, 0)
            self._check_size(x_f, 1)
            if x_c.shape[0] != x_f.shape[0]:
                raise ValueError(f'coarse and fine batches differ: {x_c.shape[0]} vs {x_f.shape[0]}')
            return x_c, x_f
        if not (isinstance(x, torch.Tensor) or is_fx_symbolic_tracing()):  # FX traces a Proxy here
            raise TypeError('expected a fine image batch or a pair [x_coarse, x_fine]')
        self._check_size(x, 1)
        return coarse_from_fine(x, (self.img_size_list[0],) * 2), x

    def _check_size(self, x: torch.Tensor, stage: int) -> None:
        if is_fx_symbolic_tracing():  # symbolic shapes: the traced graph keeps the model's fixed sizes
            return
        side = self.img_size_list[stage]
        if x.dim() != 4 or tuple(x.shape[-2:]) != (side, side):
            name = ('coarse', 'fine')[stage]
            raise ValueError(
                f'expected the {name} images as (B, C, {side}, {side}) for img_size_list='
                f'{self.img_size_list}, got {tuple(x.shape)}')
        self._check_dtype(x)

    def _check_dtype(self, x: torch.Tensor) -> None:
        """Images are normalized floats in the weights' dtype (any float under autocast): a uint8 or float64
        batch is one line naming the conversion, not a convolution's dtype error."""
        weight = self.cls_token
        if weight.device.type == 'meta' or torch.jit.is_tracing():
            return
        if not x.is_floating_point():
            raise ValueError(f'expected normalized floating-point images, got {x.dtype} (convert and normalize '
                             'them: timm.data.create_transform(**timm.data.resolve_data_config({}, model=model)))')
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f'expected {weight.dtype} images like the weights, got {x.dtype}: pass '
                             f'x.to({weight.dtype}) (or convert the model)')

    # ------------------------------------------------------------------ MixToken
    def _draw_mix_box(self, grid: Tuple[int, int]) -> Box:
        """A random box covering about ``1 - lambda`` of the grid, lambda ~ Beta(1, 1)."""
        return draw_mix_box(grid, self.mix_beta)

    @staticmethod
    def _mix_maps(x: torch.Tensor, box: Box) -> torch.Tensor:
        """Replace the box of each (B, D, h, w) map with that of the batch flipped."""
        return mix_maps(x, box)

    # ------------------------------------------------------------------ the two stages
    def _run_block(self, blk: nn.Module, x: torch.Tensor,
                   return_cls_attn: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One block, through ``torch.utils.checkpoint`` (non-reentrant) when grad checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            return checkpoint(blk, x, return_cls_attn=return_cls_attn, use_reentrant=False)
        return blk(x, return_cls_attn=return_cls_attn)

    def _embed(self, x: torch.Tensor, grid: Tuple[int, int], box: Optional[Box]) -> torch.Tensor:
        """Patch-embed (B, C, H, W) to (B, h*w, D), MixToken applied when a box is given."""
        t = self.patch_embed(x)  # (B, D, h, w)
        if not is_fx_symbolic_tracing() and tuple(t.shape[-2:]) != tuple(grid):
            raise ValueError(f'patch embedding gave a {tuple(t.shape[-2:])} grid, expected {grid}')
        if box is not None:
            t = self._mix_maps(t, box)
        return t.flatten(2).transpose(1, 2)

    def forward_coarse(self, x_c: torch.Tensor, dense: bool = False) -> CoarseState:
        """Coarse stage on (B, C, S_c, S_c) images.

        Args:
            x_c: coarse images.
            dense: return the head's dense training output (LV-ViT) instead of logits.
        """
        grid = self.coarse_grid
        box = None
        if self.mix_token and self.training:  # a traced graph draws its box at run time
            box = draw_mix_box_for(x_c, grid, self.mix_beta) if is_fx_symbolic_tracing() else self._draw_mix_box(grid)
        t = self._embed(x_c, grid, box)  # (B, N_c, D)
        x = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)
        x = x + self.pos_embed_list[0]  # (B, 1+N_c, D)
        embeddings = x
        x = self.pos_drop(x)
        attn = None  # running average of the class-token attention row, (B, heads, 1+N_c)
        beta = self.attn_ema_beta
        for i, blk in enumerate(self.blocks):
            x, a = self._run_block(blk, x, i >= self.selection_start_block)
            if a is not None:
                attn = (1 - beta) * a if attn is None else beta * attn + (1 - beta) * a
        z = self.norm(x)
        cls_attn = attn.mean(dim=1)[:, 1:]  # (B, N_c)
        layout = TokenLayout(grid=grid, coarse_grid=grid, mix_box=box)
        output = self.forward_stage_head(z, stage=0, dense=dense, layout=layout)
        return CoarseState(z, embeddings, cls_attn, output, grid, box, self.selection_scores(cls_attn))

    def selection_scores(self, cls_attn: torch.Tensor) -> Optional[torch.Tensor]:
        """The (B, N_c) scores the fine stage ranks coarse patches by, when they are not the class
        attention itself: seeded uniform numbers under the ``'random'`` policy, else None."""
        if self.selection_policy == 'attention':
            return None
        if self._selection_generator is None:
            self._selection_generator = torch.Generator(device='cpu').manual_seed(self.selection_seed)
        scores = torch.rand(cls_attn.shape, generator=self._selection_generator, dtype=torch.float32)
        return scores.to(cls_attn.device)

    def select_patches(self, cls_attn: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N_c) scores (the class attention) -> informative (B, k) and other (B, N_c-k) coarse indices."""
        return rank_coarse_patches(cls_attn, self.num_informative)

    def forward_fine(
            self,
            x_f: torch.Tensor,
            state: CoarseState,
            selection: Optional[bool] = None,
            rows: Optional[torch.Tensor] = None,
            dense: bool = False,
    ) -> FineState:
        """Fine stage on (B, C, S_f, S_f) images, reusing the coarse stage's ``state``.

        Args:
            x_f: fine images of the whole batch.
            state: the coarse stage of the same batch.
            selection: informative selection on/off (default: the model's setting).
            rows: 1-D indices of the samples to run (default: all); outputs have ``len(rows)`` rows.
            dense: return the head's dense training output (LV-ViT) instead of logits.
        """
        if selection is None:
            selection = self.informative_selection
        if rows is not None:
            x_f, state = x_f[rows], state.take(rows)
        grid = state.grid
        fine_grid = (FINE_SCALE * grid[0], FINE_SCALE * grid[1])
        box = None
        if state.mix_box is not None:
            box = scale_box(state.mix_box, FINE_SCALE)
        t = self._embed(x_f, fine_grid, box)  # (B, N_f, D)
        if self.feature_reuse:
            t = t + upsample_tokens(self.reuse_block(state.tokens[:, 1:]), grid)  # (B, N_f, D)
        x = torch.cat((self.cls_token.expand(t.shape[0], -1, -1), t), dim=1)  # (B, 1+N_f, D)
        if selection or self.fine_pos_embed_without_selection:
            x = x + self.pos_embed_list[1]
        important = unimportant = important_fine = None
        if selection:
            important, unimportant = self.select_patches(state.ranking)
            important_fine = fine_children(important, grid)  # (B, 4k)
            x = torch.cat((
                x[:, :1],
                gather_tokens(x[:, 1:], important_fine),
                gather_tokens(state.embeddings[:, 1:], unimportant),
            ), dim=1)  # (B, 1 + 4k + N_c - k, D)
        x = self.pos_drop(x)
        for blk in self.blocks:
            x, _ = self._run_block(blk, x)
        z = self.norm(x)
        layout = TokenLayout(grid=fine_grid, coarse_grid=grid, important_coarse_index=important,
                             unimportant_coarse_index=unimportant, mix_box=box)
        output = self.forward_stage_head(z, stage=1, dense=dense, layout=layout)
        return FineState(z, output, important, unimportant, important_fine)

    def forward_stage_head(self, z: torch.Tensor, stage: int, dense: bool = False,
                           layout: Optional[TokenLayout] = None) -> Any:
        """Classify from the normed tokens (B, 1+M, D) of a stage: ``head`` of the class token."""
        return self.head(z[:, 0])

    # ------------------------------------------------------------------ timm's model contract
    def forward_features(self, x: Inputs) -> torch.Tensor:
        """(B, 1+M, D) normed tokens of the fine stage (after the coarse one, no exit; the model's
        selection setting). ``forward_head`` of them is the eval-mode ``forward`` at the default
        threshold. The stages' own outputs: :meth:`forward_coarse` / :meth:`forward_fine`."""
        x_c, x_f = self.split_inputs(x)
        return self.forward_fine(x_f, self.forward_coarse(x_c)).tokens

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """timm's head: (B, 1+M, D) fine-stage tokens -> (B, C) logits, or the (B, D) class token
        with ``pre_logits``."""
        if pre_logits:
            return x[:, 0]
        return self.forward_stage_head(x, stage=1)

    def forward_stages(self, x: Inputs) -> Tuple[Any, Any]:
        """Both stages on the whole batch, in either mode: ``(coarse_output, fine_output)``.

        Each is (B, C) logits; an LV-ViT in training mode with ``dense_train_outputs`` on returns
        ``(cls_logits, dense_logits, box)`` tuples for token labeling instead.
        """
        x_c, x_f = self.split_inputs(x)
        dense = self.return_dense and self.training and self.dense_train_outputs
        state = self.forward_coarse(x_c, dense=dense)
        fine = self.forward_fine(x_f, state, dense=dense)
        return state.output, fine.output

    def forward(self, x):  # no annotations: torch.fx copies them into traced code, TorchScript reads it
        """timm's forward.

        Args:
            x: ``x_fine`` (B, C, S_f, S_f), or the pair ``[x_coarse, x_fine]`` (as released).

        Returns:
            Eval mode: (B, C) early-exit logits at ``self.exit_threshold`` (by default no image
            exits: the fine stage's logits). Training mode: the tuple ``(coarse, fine)`` of
            :meth:`forward_stages`, which the loss needs. With ``forward_returns_both_stages``
            (the released behaviour), the list ``[coarse, fine]`` in both modes.
        """
        if self.forward_returns_both_stages:
            return list(self.forward_stages(x))
        if self.training:
            return self.forward_stages(x)
        if self.exit_threshold > 1.0:  # no softmax probability reaches it: the fine stage for all
            return self.forward_head(self.forward_features(x))
        return self.forward_early_exit(x, self.exit_threshold)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every block of both stages in the backward pass (``torch.utils.checkpoint``,
        non-reentrant): less activation memory, the same gradients, about one more forward."""
        self.grad_checkpointing = bool(enable)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for timm's layer-wise lr decay: embeddings, then one group per block."""
        return dict(stem=r'^cls_token|^pos_embed_list|^patch_embed',
                    blocks=[(r'^blocks\.(\d+)', None), (r'^norm|^reuse_block', (99999,))])

    def __prepare_scriptable__(self) -> nn.Module:
        """What ``torch.jit.script(model)`` compiles: the model's torch.fx graph in eval mode.

        The eager model is not scriptable (NamedTuple stage states holding any head output, a
        data-dependent early exit), but its eval forward without exit is a fixed tensor graph:
        that graph is traced and scripted. Training mode, an ``exit_threshold`` that lets images
        exit and the released list output are refused with one line.
        """
        if self.training or self.exit_threshold <= 1.0 or self.forward_returns_both_stages:
            raise RuntimeError(
                f'{type(self).__name__} can be scripted in eval mode without early exit only (exit_threshold > 1, '
                'forward_returns_both_stages=False): early exit routes each image by data; use forward_early_exit '
                'eagerly, model.compile_stages(), or torch.export of forward_coarse / forward_fine')
        return torch.fx.GraphModule(self, torch.fx.Tracer().trace(self), class_name=type(self).__name__)

    def forward_intermediates(
            self,
            x: Inputs,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
            stage: str = 'coarse',
    ) -> Union[List[Any], Tuple[torch.Tensor, List[Any]]]:
        """timm's intermediate features: the outputs of blocks ``indices``, as maps.

        Args:
            x: ``x_fine`` or ``[x_coarse, x_fine]``.
            indices: the last n blocks if an int, all if None, else the listed blocks.
            return_prefix_tokens: pair each map with its (B, 1, D) class token.
            norm: apply the final norm to the intermediates.
            stop_early: with ``intermediates_only`` on the coarse stage, stop after the last block asked for.
            output_fmt: ``'NCHW'`` (B, D, h, w) maps or ``'NLC'`` (B, h*w, D) tokens.
            intermediates_only: return the intermediates only.
            stage: ``'coarse'``: the coarse stage's blocks (g x g maps); ``'fine'``: the fine
                stage's blocks without informative selection, where every fine patch exists (2g x 2g).

        Returns:
            ``(final, intermediates)``, ``final`` being ``forward_features(x)`` for ``stage='coarse'``
            and the non-selective fine stage's normed tokens for ``stage='fine'``; or the intermediates.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        if stage not in ('coarse', 'fine'):
            raise ValueError(f"stage must be 'coarse' or 'fine', got {stage!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        x_c, x_f = self.split_inputs(x)
        taken: List[torch.Tensor] = []
        final: Optional[torch.Tensor] = None
        if stage == 'coarse':
            grid = self.coarse_grid
            h = torch.cat((self.cls_token.expand(x_c.shape[0], -1, -1), self._embed(x_c, grid, None)), dim=1)
            h = self.pos_drop(h + self.pos_embed_list[0])
            blocks = self.blocks[:max_index + 1] if (stop_early and intermediates_only) else self.blocks
            for i, blk in enumerate(blocks):
                h, _ = self._run_block(blk, h)
                if i in take_indices:
                    taken.append(self.norm(h) if norm else h)
        else:
            grid = self.fine_grid
            state = self.forward_coarse(x_c)
            hooks = [self.blocks[i].register_forward_hook(
                lambda _m, _inp, out: taken.append(self.norm(out[0]) if norm else out[0]))
                for i in take_indices]
            try:
                final = self.forward_fine(x_f, state, selection=False).tokens
            finally:
                for hook in hooks:
                    hook.remove()
            taken = taken[:len(take_indices)]  # recomputations under grad checkpointing come later
        maps: List[Any] = []
        for y in taken:
            tokens = y[:, 1:]
            if output_fmt == 'NCHW':
                tokens = tokens.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
            maps.append((tokens, y[:, :1]) if return_prefix_tokens else tokens)
        if intermediates_only:
            return maps
        return (self.forward_features(x) if final is None else final), maps

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Keep the blocks up to the last of ``indices`` (timm's ``features_only`` calls this);
        afterwards the coarse-stage intermediates are what the model is for. Returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        self.selection_start_block = min(self.selection_start_block, max_index)
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take_indices

    def forward_details(self, x: Inputs, threshold: Optional[float] = None) -> CFOutput:
        """Coarse-to-fine inference that reports every decision it made.

        Args:
            x: ``[x_coarse, x_fine]`` or ``x_fine`` alone.
            threshold: early-exit threshold. None runs the fine stage for every sample (with the
                model's selection setting); a number exits samples whose coarse max-softmax is
                ``>= threshold`` and runs the fine stage, with informative selection, only for the
                others (none at all if every sample exits).

        Returns:
            A :class:`CFOutput`.
        """
        x_c, x_f = self.split_inputs(x)
        state = self.forward_coarse(x_c)
        coarse_logits = state.output
        confidence = coarse_logits.float().softmax(dim=-1).max(dim=-1).values  # (B,)
        important, _ = self.select_patches(state.ranking)
        important_fine = fine_children(important, state.grid)
        exited = exit_mask(confidence, threshold)
        selection = None if threshold is None else True
        go_on = torch.nonzero(~exited).squeeze(1)  # (B',)
        if go_on.numel() == 0:
            fine_logits = coarse_logits
        elif go_on.numel() == exited.numel():
            fine_logits = self.forward_fine(x_f, state, selection=selection).output
        else:
            fine_rows = self.forward_fine(x_f, state, selection=selection, rows=go_on).output
            fine_logits = coarse_logits.index_copy(0, go_on, fine_rows.to(coarse_logits.dtype))
        return CFOutput(coarse_logits, fine_logits, exited, confidence, state.cls_attn,
                        important, important_fine)

    def compile_stages(self, **compile_kwargs: Any) -> 'CFVisionTransformer':
        """``torch.compile`` the two stages (``forward_coarse``, ``forward_fine``) of this instance.

        Every path goes through them, so ``forward``, ``forward_details`` and early exit all use the
        compiled code, while the data-dependent exit decision stays in eager Python. Useful at small
        batches, where per-operation overhead dominates (see BENCHMARKS.md, benchmark 1); the fine
        stage recompiles for each new number of rows that go on, so prefer it for fixed batch sizes
        or pass ``dynamic=True``. Keyword arguments go to ``torch.compile``. Returns ``self``.
        """
        self.forward_coarse = torch.compile(self.forward_coarse, **compile_kwargs)  # type: ignore[method-assign]
        self.forward_fine = torch.compile(self.forward_fine, **compile_kwargs)  # type: ignore[method-assign]
        return self

    def forward_early_exit(self, x: Inputs, threshold: float) -> torch.Tensor:
        """Early-exit inference: (B, C) coarse logits where confident enough, fine elsewhere."""
        return self.forward_details(x, threshold).fine_logits


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: Optional[nn.Module] = None) -> Dict[str, Any]:
    """Adapt a released or training checkpoint to a plain state_dict of this model.

    Accepts the released layout (``{'model': state_dict, 'flop': ..., ...}``), a training
    checkpoint (``model`` plus optimizer etc.), ``{'state_dict': ...}``, or a bare state_dict,
    and strips the ``module.`` prefix that DistributedDataParallel adds.
    """
    for key in ('model', 'state_dict'):
        if isinstance(state_dict.get(key), dict):
            state_dict = state_dict[key]
            break
    prefix = 'module.'
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'patch_embed.proj', 'classifier': 'head',
        'paper_ids': 'arXiv:2203.03821', 'paper_name': 'CF-ViT: A General Coarse-to-Fine Method for Vision Transformer',
        'license': 'apache-2.0', **kwargs,
    }


#: The released checkpoints (README "Released checkpoints"): Google Drive files a user downloads; the
#: tags carry no download address, the file comes with ``pretrained_cfg_overlay=dict(file=PATH)``.
RELEASE_URL = 'https://github.com/ChenMnZ/CF-ViT'


def release_cfgs(name: str, **kwargs: Any) -> Dict[str, Dict[str, Any]]:
    """Tags ``release_g7_in1k`` (224 px) and ``release_g9_in1k`` (288 px) of a released model."""
    return {f'{name}.release_g{g}_in1k': _cfg(**dict(dict(
        input_size=(3, 32 * g, 32 * g), origin_url=RELEASE_URL,
        description=f'released ImageNet-1k weights, {g}x{g} coarse grid: a local file '
                    '(pretrained_cfg_overlay=dict(file=PATH))'), **kwargs)) for g in (7, 9)}


class WeightsNotFoundError(ValueError):
    """Pretrained weights that are not on this machine; the message is one line for a person."""
