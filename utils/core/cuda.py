"""CUDA precision settings the scripts set and report: TF32, and whether a GPU runs bfloat16 natively.

PyTorch 1.10, which the release ran on, computed float32 matmuls and cuDNN convolutions in TF32 on
Ampere and newer GPUs. Current PyTorch computes matmuls in IEEE float32 by default and only cuDNN
convolutions in TF32, so float32 throughput is not comparable to the paper's without ``--tf32``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from utils.core.errors import BadInputError

__all__ = ['set_tf32', 'tf32_state', 'describe_float32', 'check_amp_dtype']


def set_tf32(enabled: Optional[bool]) -> None:
    """``--tf32`` / ``--no-tf32``: TF32 for float32 matmuls and cuDNN convolutions both on or both off;
    None leaves PyTorch's defaults (matmuls IEEE float32, convolutions TF32)."""
    if enabled is None:
        return
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def tf32_state() -> Dict[str, bool]:
    """Whether TF32 is allowed now, for float32 matmuls and for cuDNN convolutions."""
    return {'matmul': bool(torch.backends.cuda.matmul.allow_tf32), 'cudnn_conv': bool(torch.backends.cudnn.allow_tf32)}


def describe_float32(flag: Optional[bool]) -> str:
    """One line for the log: how float32 runs on CUDA now, and which flag said so."""
    state = tf32_state()
    name = lambda on: 'TF32' if on else 'IEEE float32'  # noqa: E731
    source = {None: "PyTorch's defaults; --tf32 for the release's PyTorch 1.10 behaviour", True: '--tf32',
              False: '--no-tf32'}[flag]
    return (f'float32 on CUDA: matmuls in {name(state["matmul"])}, cuDNN convolutions in {name(state["cudnn_conv"])} '
            f'({source})')


def check_amp_dtype(dtype: Optional[torch.dtype], device: torch.device) -> None:
    """Refuse bfloat16 autocast on a GPU without native bfloat16 (before Ampere: V100, T4), where it
    would run emulated and slowly without a word.

    Raises:
        BadInputError: (a ValueError) with a one-line message.
    """
    if dtype is not torch.bfloat16 or device.type != 'cuda' or not torch.cuda.is_available() or torch.version.hip:
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    if major >= 8:  # Ampere and newer
        return
    raise BadInputError(f'bfloat16 autocast: {torch.cuda.get_device_name(index)} (compute capability {major}.{minor}) '
                     f'has no native bfloat16 and would emulate it slowly; use --amp-dtype float16')
