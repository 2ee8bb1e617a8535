"""Pure tensor functions of the coarse-to-fine token bookkeeping.

Nothing here holds parameters or state: every function maps tensors to tensors so that the
model, the token-labeling loss and the visualizer share one definition of the geometry.

Conventions: a grid of ``h x w`` patches is flattened row-major (index ``r * w + c``); the fine
grid of a coarse ``h x w`` grid is ``(FINE_SCALE * h) x (FINE_SCALE * w)``.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F

#: Side of the block of fine patches that re-splits one coarse patch (2x2).
FINE_SCALE = 2


def coarse_from_fine(x_fine: torch.Tensor, coarse_size: Tuple[int, int]) -> torch.Tensor:
    """Derive the coarse image from the fine one, as the released inference did.

    Args:
        x_fine: (B, C, H_f, W_f) images.
        coarse_size: (H_c, W_c) of the coarse image.

    Returns:
        (B, C, H_c, W_c), bilinear with ``align_corners=True``. Unlike the release, the batch
        dimension is never squeezed, so a batch of one stays a batch of one.
    """
    return F.interpolate(x_fine, size=tuple(coarse_size), mode='bilinear', align_corners=True)


def num_informative(num_coarse: int, ratio: float) -> int:
    """Number ``k = ceil(ratio * N_c)`` of coarse patches re-split into fine ones."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f'informative ratio must be in (0, 1], got {ratio}')
    return int(math.ceil(ratio * num_coarse))


def rank_coarse_patches(cls_attn: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Split coarse patches into the ``k`` most attended ones and the rest.

    Args:
        cls_attn: (B, N_c) class-token attention of each coarse patch.
        k: number of informative patches.

    Returns:
        ``(important, unimportant)``: (B, k) and (B, N_c - k) coarse indices, each in order of
        decreasing attention (the release's ``argsort(descending=True)``).
    """
    order = torch.argsort(cls_attn, dim=1, descending=True)  # (B, N_c)
    return order[:, :k], order[:, k:]


def fine_children(coarse_index: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """Fine-grid indices of the FINE_SCALE x FINE_SCALE children of coarse patches.

    Args:
        coarse_index: (B, k) row-major indices on the coarse ``grid = (h, w)``.
        grid: coarse grid size.

    Returns:
        (B, 4k) indices on the fine (2h, 2w) grid, laid out as four blocks of k, as the release
        laid them out: all top-left children, then top-right, bottom-left, bottom-right.
    """
    _, w = grid
    fine_w = FINE_SCALE * w
    row, col = coarse_index // w, coarse_index % w
    top_left = (FINE_SCALE * row) * fine_w + FINE_SCALE * col  # (B, k)
    offsets = [dr * fine_w + dc for dr in range(FINE_SCALE) for dc in range(FINE_SCALE)]
    return torch.cat([top_left + o for o in offsets], dim=1)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick tokens per sample: ``out[b, i] = x[b, index[b, i]]``.

    Args:
        x: (B, N, D) tokens.
        index: (B, M) token indices.

    Returns:
        (B, M, D).
    """
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def upsample_tokens(x: torch.Tensor, grid: Tuple[int, int], scale: int = FINE_SCALE) -> torch.Tensor:
    """Nearest-neighbour upsampling of a token map.

    Args:
        x: (B, h*w, D) tokens of a row-major (h, w) grid.
        grid: (h, w).
        scale: integer upsampling factor.

    Returns:
        (B, (scale*h) * (scale*w), D), row-major on the upsampled grid.
    """
    B, N, D = x.shape
    h, w = grid
    torch._assert(N == h * w, f'the tokens do not form a {h}x{w} grid')  # traceable by torch.fx
    x = x.transpose(1, 2).reshape(B, D, h, w)
    x = F.interpolate(x, size=(scale * h, scale * w), mode='nearest')
    return x.flatten(2).transpose(1, 2)


def scatter_to_fine_grid(
        tokens: torch.Tensor,
        important_coarse: torch.Tensor,
        unimportant_coarse: torch.Tensor,
        grid: Tuple[int, int],
) -> torch.Tensor:
    """Lay the patch outputs of a selected fine stage back onto the full fine grid.

    The fine stage with informative selection sees ``4k`` fine tokens (children of the important
    coarse patches, ordered as :func:`fine_children` orders them) followed by ``N_c - k`` coarse
    tokens. An important patch's children keep their own outputs; a non-informative coarse
    token's output is copied to its four children.

    Args:
        tokens: (B, 4k + N_c - k, C) per-token outputs (without the class token).
        important_coarse: (B, k) coarse indices.
        unimportant_coarse: (B, N_c - k) coarse indices.
        grid: coarse grid (h, w).

    Returns:
        (B, 4 * h * w, C) on the row-major fine grid.
    """
    B, _, C = tokens.shape
    k = important_coarse.shape[1]
    n_children = FINE_SCALE * FINE_SCALE
    fine_index = torch.cat([
        fine_children(important_coarse, grid),
        fine_children(unimportant_coarse, grid),
    ], dim=1)  # (B, N_f)
    src = torch.cat([
        tokens[:, :n_children * k],
        tokens[:, n_children * k:].repeat(1, n_children, 1),
    ], dim=1)  # (B, N_f, C), aligned with fine_index
    out = tokens.new_zeros(B, fine_index.shape[1], C)
    return out.scatter(1, fine_index.unsqueeze(-1).expand(-1, -1, C), src)
