"""The token-labeling loss of CF-LV-ViT (SPEC 6-7), with MixToken: what the model's outputs are scored by
against the targets :mod:`datasets.token_labels` makes from the label maps.

In training mode CF-LV-ViT returns, for each stage, ``(cls_logits (B, C), dense_logits (B, h*w, C),
box)``: one prediction per token of the stage's full grid, and the MixToken box
``(row0, col0, row1, col1)`` on that grid ((0, 0, 0, 0) when MixToken is off).

Which side is mixed. MixToken replaced the patch embeddings inside the box with those of the batch
flipped (``x.flip(0)``), and the model swaps its dense outputs inside the box back before returning
them, so ``dense_logits[b, p]`` is always the prediction for the content of image ``b`` at ``p``. The
dense targets are therefore used as they are, never mixed (mixing them as well would pair the
token outputs of image ``b`` with the labels of image ``B-1-b`` inside the box). Only the class
token saw a mixed image: its target is ``lam * t + (1 - lam) * t.flip(0)`` with ``lam = 1 -
box_area / grid_area``. ``tests/test_main_lvvit.py`` pins both.

The total loss (:class:`CFTokenLabelingLoss`) is the release's: the token-labeling loss of the fine
stage plus ``KL(coarse || fine.detach())`` on the class logits (:class:`utils.train.losses.CFViTLoss`);
an optional dense term for the coarse stage is off by default (the release had none).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from datasets.token_labels.targets import TokenLabelTargets
from utils.train.losses import CFViTLoss

__all__ = [
    'soft_target_cross_entropy', 'mix_token_lambda', 'mix_class_target', 'pool_dense_target', 'TokenLabelingLoss',
    'CFTokenLabelingLoss',
]

Box = Tuple[int, int, int, int]


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum_c target * log_softmax(logits)``; logits and target (..., C)."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    target = target.float().reshape(-1, target.shape[-1])
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def mix_token_lambda(box: Sequence[int], num_tokens: int) -> float:
    """Share of the tokens NOT replaced by MixToken: ``1 - box_area / num_tokens``.

    Args:
        box: ``(row0, col0, row1, col1)`` on the stage's grid, end-exclusive.
        num_tokens: tokens of that grid (h * w).
    """
    r0, c0, r1, c1 = (int(v) for v in box)
    area = max(r1 - r0, 0) * max(c1 - c0, 0)
    return 1.0 - area / float(num_tokens)


def mix_class_target(target: torch.Tensor, lam: float) -> torch.Tensor:
    """(B, C) class targets of MixToken images: ``lam * t + (1 - lam) * t.flip(0)``."""
    if lam >= 1.0:
        return target
    return lam * target + (1.0 - lam) * target.flip(0)


def pool_dense_target(dense: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Dense targets for a coarser grid: average each block of cells (a distribution again).

    A coarse patch covers exactly its 2x2 fine children, so the coarse stage's target is the mean
    of the 2g x 2g target over each 2x2 block (not a new RoI-align at g; the two agree up to the
    bilinear sampling of RoI-align).

    Args:
        dense: (B, S*S, C) targets on an S x S grid.
        num_tokens: cells of the wanted grid, (S / f)^2 for an integer factor f.

    Returns:
        (B, num_tokens, C).
    """
    B, n, C = dense.shape
    if n == num_tokens:
        return dense
    side, out_side = math.isqrt(n), math.isqrt(num_tokens)
    if side * side != n or out_side * out_side != num_tokens or side % out_side:
        raise ValueError(f'cannot pool a {n}-cell dense target onto {num_tokens} tokens')
    grid = dense.transpose(1, 2).reshape(B, C, side, side)
    pooled = F.avg_pool2d(grid, side // out_side)
    return pooled.flatten(2).transpose(1, 2)


class TokenLabelingLoss(nn.Module):
    """``cls_weight * SoftCE(cls, MixToken-mixed class target) + dense_weight * SoftCE(dense, dense target)``.

    Args:
        cls_weight: weight of the class-token term.
        dense_weight: weight of the per-token term; ignored for targets without a dense part. 1.0
            is what the released CF-LV-ViT run used (its ``args.yaml``: TokenLabeling's code default);
            the TokenLabeling paper's beta is 0.5.
    """

    def __init__(self, cls_weight: float = 1.0, dense_weight: float = 1.0) -> None:
        super().__init__()
        if cls_weight < 0 or dense_weight < 0 or cls_weight + dense_weight <= 0:
            raise ValueError(f'need non-negative weights with a positive sum, got cls {cls_weight}, '
                             f'dense {dense_weight}')
        self.cls_weight = float(cls_weight)
        self.dense_weight = float(dense_weight)

    def class_loss(self, stage_output: Sequence[Any], target: TokenLabelTargets) -> torch.Tensor:
        """Soft cross-entropy of the class logits against the class target mixed by the box."""
        cls_logits, dense_logits, box = stage_output
        lam = mix_token_lambda(box, dense_logits.shape[1])
        return soft_target_cross_entropy(cls_logits, mix_class_target(target.cls, lam))

    def dense_loss(self, stage_output: Sequence[Any], target: TokenLabelTargets) -> torch.Tensor:
        """Soft cross-entropy of the (un-mixed) dense logits against the unmixed dense target.

        The target is pooled to the stage's grid when it is finer (the coarse stage).
        """
        if target.dense is None:
            raise ValueError('the batch has no dense targets')
        _, dense_logits, _ = stage_output
        dense_target = pool_dense_target(target.dense, dense_logits.shape[1])
        return soft_target_cross_entropy(dense_logits, dense_target)

    def forward(self, stage_output: Sequence[Any], target: TokenLabelTargets) -> torch.Tensor:
        """Loss of one stage.

        Args:
            stage_output: ``(cls_logits (B, C), dense_logits (B, N, C), box)`` of CF-LV-ViT in
                training mode, dense logits un-mixed.
            target: the batch's :class:`TokenLabelTargets`; ``dense`` on the same N cells (or a
                finer grid, pooled), or None.

        Returns:
            Scalar float32 loss.
        """
        if not (isinstance(stage_output, (tuple, list)) and len(stage_output) == 3):
            raise TypeError('token labeling needs the (cls_logits, dense_logits, box) training output of '
                            'CF-LV-ViT (is the model in training mode?)')
        loss = self.cls_weight * self.class_loss(stage_output, target)
        if target.dense is not None and self.dense_weight > 0:
            loss = loss + self.dense_weight * self.dense_loss(stage_output, target)
        return loss


class CFTokenLabelingLoss(CFViTLoss):
    """The CF-LV-ViT training loss: token labeling on the fine stage + KL(coarse || fine) (SPEC 6).

    Args:
        token_loss: the per-stage :class:`TokenLabelingLoss`.
        kl_weight: weight of the KL term (1 in the paper).
        coarse_dense_weight: weight of an extra dense term on the coarse stage's tokens, against
            the dense target pooled to the coarse grid (:func:`pool_dense_target`). 0 reproduces
            the release, which supervised the fine stage only.
    """

    def __init__(self, token_loss: TokenLabelingLoss, kl_weight: float = 1.0,
                 coarse_dense_weight: float = 0.0) -> None:
        super().__init__(token_loss, kl_weight=kl_weight)
        self.coarse_dense_weight = float(coarse_dense_weight)

    def forward(self, outputs: Sequence[Any], target: TokenLabelTargets) -> Dict[str, torch.Tensor]:
        """``{'loss', 'loss_fine', 'loss_kl'}`` (plus ``'loss_coarse_dense'`` when that term is on)."""
        out = super().forward(outputs, target)
        if self.coarse_dense_weight > 0 and target.dense is not None:
            coarse_dense = self.base_criterion.dense_loss(outputs[0], target)
            out['loss'] = out['loss'] + self.coarse_dense_weight * coarse_dense
            out['loss_coarse_dense'] = coarse_dense.detach()
        return out


