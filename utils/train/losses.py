"""The CF-ViT training objective (SPEC 6).

``loss = base_criterion(fine_output, target) + kl_weight * KL(coarse || fine)``, where the KL term
distils the fine stage's (detached) class distribution into the coarse stage::

    KLDivLoss(reduction='batchmean')(log_softmax(coarse_logits), softmax(fine_logits.detach()))

The base criterion is pluggable: soft-target cross-entropy (mixup/cutmix), label smoothing or
plain cross-entropy for CF-DeiT; the token-labeling criterion for CF-LV-ViT, whose stage outputs
are ``(cls_logits, dense_logits, box)`` tuples; the KL term then uses the class-token logits.
"""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['CFViTLoss', 'class_logits', 'coarse_fine_kl']


def class_logits(stage_output: Any) -> torch.Tensor:
    """The (B, C) class logits of one stage's output.

    Args:
        stage_output: (B, C) logits, or a ``(cls_logits, dense_logits, box)`` tuple (LV-ViT training).
    """
    if isinstance(stage_output, torch.Tensor):
        return stage_output
    if isinstance(stage_output, (tuple, list)) and stage_output and isinstance(stage_output[0], torch.Tensor):
        return stage_output[0]
    raise TypeError(f'cannot find class logits in a stage output of type {type(stage_output).__name__}')


def coarse_fine_kl(coarse_logits: torch.Tensor, fine_logits: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(fine) || softmax(coarse))`` averaged over the batch, no gradient into the fine stage.

    Args:
        coarse_logits: (B, C).
        fine_logits: (B, C); detached here (the fine stage teaches the coarse one).

    Returns:
        Scalar float32 loss.
    """
    log_p_coarse = F.log_softmax(coarse_logits.float(), dim=-1)
    p_fine = F.softmax(fine_logits.detach().float(), dim=-1)
    return F.kl_div(log_p_coarse, p_fine, reduction='batchmean')


class CFViTLoss(nn.Module):
    """Fine-stage criterion plus the coarse-from-fine distillation term.

    Args:
        base_criterion: ``(fine_output, target) -> scalar``; receives the fine stage's output
            unchanged (logits, or the LV-ViT training tuple) in float32 where it is a tensor.
        kl_weight: weight of the KL term (1 in the paper).
    """

    def __init__(self, base_criterion: nn.Module, kl_weight: float = 1.0) -> None:
        super().__init__()
        self.base_criterion = base_criterion
        self.kl_weight = float(kl_weight)

    def forward(self, outputs: Sequence[Any], target: Any) -> Dict[str, torch.Tensor]:
        """Loss of one batch.

        Args:
            outputs: the model's ``[coarse_output, fine_output]``; each (B, C) logits or an LV-ViT
                ``(cls, dense, box)`` tuple.
            target: whatever the base criterion takes: (B,) class indices or (B, C) soft targets.

        Returns:
            ``{'loss': total, 'loss_fine': base term, 'loss_kl': KL term}``, scalars; ``loss`` is
            the one to back-propagate.
        """
        if not isinstance(outputs, (list, tuple)) or len(outputs) != 2:
            raise TypeError('expected the model output [coarse_output, fine_output]')
        coarse_out, fine_out = outputs
        fine_for_base = fine_out.float() if isinstance(fine_out, torch.Tensor) else fine_out
        loss_fine = self.base_criterion(fine_for_base, target)
        loss_kl = coarse_fine_kl(class_logits(coarse_out), class_logits(fine_out))
        loss = loss_fine + self.kl_weight * loss_kl
        return {'loss': loss, 'loss_fine': loss_fine.detach(), 'loss_kl': loss_kl.detach()}
