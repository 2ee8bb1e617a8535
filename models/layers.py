"""timm layers extended to report the class-token attention row.

The coarse stage ranks patches by how much the class token attends to them. Only that row of each
attention map is needed, so the blocks keep the fused kernel
(``torch.nn.functional.scaled_dot_product_attention``) for the token mixing and compute the
single class-token row beside it; no N x N map is stored.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models._features_fx import register_notrace_function
from timm.models.vision_transformer import Block

__all__ = ['cls_attention_row', 'ClsAttention', 'CFBlock', 'ConvStemPatchEmbed']


def _cls_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for a float64 model
    q_cls = q[:, :, :1].to(dtype) * scale  # (B, heads, 1, hd)
    return (q_cls @ k.to(dtype).transpose(-2, -1)).softmax(dim=-1).squeeze(2)


@register_notrace_function  # a graph leaf: the autocast switch below runs when the graph runs
def cls_attention_row(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, heads, N, hd) queries and keys -> (B, heads, N) float32 softmax of the class-token query.

    Computed in float32 also under ``torch.autocast``: autocast is switched off here (it would
    otherwise run the matmul of the upcast q and k in half precision again).
    """
    if not torch.jit.is_scripting():  # TorchScript (eval graphs only) has no autocast context to leave
        if q.device.type in ('cpu', 'cuda', 'xpu', 'mps', 'hpu') and torch.is_autocast_enabled(q.device.type):
            with torch.autocast(device_type=q.device.type, enabled=False):
                return _cls_row(q, k, scale)
    return _cls_row(q, k, scale)


torch.fx.wrap('cls_attention_row')  # also a leaf of plain torch.fx tracing (TorchScript preparation)


class ClsAttention(Attention):
    """timm's multi-head self-attention that can also return the class-token attention row.

    The row is computed in float32 from the block's queries and keys, also under ``torch.autocast``
    (autocast is switched off for it and q, k are upcast): a half-precision row has many ties among
    the patches and ranks them differently from float32.

    Attributes:
        half_precision_cls_attn: False (default): the documented float32 row. True reproduces the
            release under AMP, whose row was computed by the autocast in force (q @ k^T in float16 /
            bfloat16, softmax as autocast runs it): for training parity with a released AMP run.
            Without autocast both give the same float32 row.
    """

    half_precision_cls_attn: bool = False

    def forward(  # type: ignore[override]
            self,
            x: torch.Tensor,
            return_cls_attn: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Attend over all tokens.

        Args:
            x: (B, N, D) tokens; token 0 is the class token.
            return_cls_attn: also return the softmax attention of the class-token query.

        Returns:
            ``(out, cls_attn)``: (B, N, D) and, if asked, (B, heads, N) in float32 (detached:
            it only feeds an argsort), else None.
        """
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, heads, N, head_dim) each
        q, k = self.q_norm(q), self.k_norm(k)

        cls_attn = None
        if return_cls_attn:
            with torch.no_grad():
                if self.half_precision_cls_attn:  # the release under AMP: the autocast in force decides
                    cls_attn = ((q[:, :, :1] * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
                    cls_attn = cls_attn.squeeze(2).float()
                else:
                    cls_attn = cls_attention_row(q, k, self.scale)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.proj_drop(self.proj(x))
        return x, cls_attn


class CFBlock(Block):
    """timm's pre-norm transformer block with an optional class-attention output.

    Args:
        skip_lam: both residual branches are divided by it (LV-ViT uses 2; 1 is plain ViT).
        *args, **kwargs: as for :class:`timm.models.vision_transformer.Block`.
    """

    def __init__(self, *args, skip_lam: float = 1.0, **kwargs) -> None:
        kwargs.setdefault('attn_layer', ClsAttention)
        super().__init__(*args, **kwargs)
        self.skip_lam = skip_lam

    def forward(  # type: ignore[override]
            self,
            x: torch.Tensor,
            return_cls_attn: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(B, N, D) -> ((B, N, D), (B, heads, N) or None)."""
        y, cls_attn = self.attn(self.norm1(x), return_cls_attn=return_cls_attn)
        y = self.drop_path1(self.ls1(y))
        if self.skip_lam != 1.0:
            y = y / self.skip_lam
        x = x + y
        y = self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        if self.skip_lam != 1.0:
            y = y / self.skip_lam
        return x + y, cls_attn


class ConvStemPatchEmbed(nn.Module):
    """LV-ViT's four-layer convolutional patch embedding ('4_2').

    Three convolutions at stride 2 overall (7x7 s2, 3x3, 3x3, each with BatchNorm and ReLU),
    then a ``patch_size/2`` projection, so one token covers ``patch_size`` pixels.

    Args:
        patch_size: pixels per token side (even).
        in_chans: input channels.
        embed_dim: token width.
        stem_chans: width of the convolutional stem.
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384,
                 stem_chans: int = 64) -> None:
        super().__init__()
        if patch_size % 2:
            raise ValueError(f'the LV-ViT stem needs an even patch size, got {patch_size}')
        self.patch_size = (patch_size, patch_size)
        self.conv1 = nn.Conv2d(in_chans, stem_chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chans)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(stem_chans)
        self.conv3 = nn.Conv2d(stem_chans, stem_chans, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(stem_chans)
        self.proj = nn.Conv2d(stem_chans, embed_dim, kernel_size=patch_size // 2, stride=patch_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D, H / patch, W / patch)."""
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.relu(self.bn3(self.conv3(x)))
        return self.proj(x)
