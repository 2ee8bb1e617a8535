"""Precision, in one place: the autocast dtype the flags ask for, its context, TF32, and what a GPU runs natively.

- inference (``dynamic_inference.py --amp-dtype``): :data:`AMP_CHOICES`, :func:`resolve_amp_dtype`;
- training (``--amp``, ``--amp-dtype``): :func:`training_amp` gives an :class:`AmpConfig` (dtype and, for
  float16, a gradient scaler);
- both: :func:`autocast_context`, :func:`check_amp_dtype` (bfloat16 refused on GPUs without it), and
  ``--tf32`` / ``--no-tf32`` (:func:`set_tf32`, :func:`tf32_state`, :func:`describe_float32`).

PyTorch 1.10, which the release ran on, computed float32 matmuls and cuDNN convolutions in TF32 on
Ampere and newer GPUs. Current PyTorch computes matmuls in IEEE float32 by default and only cuDNN
convolutions in TF32, so float32 throughput is not comparable to the paper's without ``--tf32``.

Whether bfloat16 pays on a CPU is measured by :mod:`utils.inference.cpu` (``bf16_pays``), which the inference
script hands to :func:`resolve_amp_dtype` for ``--amp-dtype auto``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, Optional

import torch

from utils.common.errors import BadInputError, ConfigError

__all__ = ['AMP_CHOICES', 'AmpConfig', 'autocast_context', 'check_amp_dtype', 'describe_float32', 'resolve_amp_dtype',
           'set_tf32', 'tf32_state', 'training_amp']

_logger = logging.getLogger(__name__)

#: ``--amp-dtype`` values of the inference scripts.
AMP_CHOICES = ('none', 'float32', 'bfloat16', 'float16', 'auto')


def autocast_context(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager:
    """``torch.autocast`` on ``device`` with ``dtype``, or a no-op for full precision."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class AmpConfig:
    """Mixed precision of a training run.

    Attributes:
        dtype: autocast dtype (``torch.bfloat16``/``torch.float16``), or None for full precision.
        scaler: gradient scaler (float16 only), or None.
    """
    dtype: Optional[torch.dtype] = None
    scaler: Optional[torch.amp.GradScaler] = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self, device: torch.device) -> ContextManager:
        """The autocast context for ``device`` (a no-op context in full precision)."""
        return autocast_context(device, self.dtype)


def resolve_amp_dtype(name: Optional[str], device: torch.device, *,
                      cpu_bf16_pays: Callable[[], bool]) -> Optional[torch.dtype]:
    """An inference ``--amp-dtype`` value to an autocast dtype (None: float32).

    ``auto``: float16 on CUDA; on a CPU, bfloat16 where ``cpu_bf16_pays()`` (asked only then:
    :func:`utils.inference.cpu.bf16_pays` measures), else float32.
    """
    if name in (None, 'none', 'float32'):
        return None
    if name == 'auto':
        if device.type == 'cuda':
            return torch.float16
        if device.type == 'cpu' and cpu_bf16_pays():
            return torch.bfloat16
        return None
    if name not in AMP_CHOICES:
        raise ValueError(f'unknown autocast dtype {name!r}: one of {", ".join(AMP_CHOICES)}')
    return getattr(torch, name)


def training_amp(enabled: Optional[bool], dtype_name: Optional[str], device: torch.device) -> AmpConfig:
    """The training flags ``--amp`` (None: on for CUDA only) and ``--amp-dtype`` (None: float16 on CUDA,
    bfloat16 elsewhere) as an :class:`AmpConfig`, a gradient scaler with float16; the log says which precision.

    Raises:
        ConfigError: bfloat16 on a GPU without native bfloat16 (:func:`check_amp_dtype`).
    """
    enabled = enabled if enabled is not None else device.type == 'cuda'
    amp = AmpConfig()
    if enabled:
        dtype = getattr(torch, dtype_name or ('float16' if device.type == 'cuda' else 'bfloat16'))
        try:
            check_amp_dtype(dtype, device)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        amp = AmpConfig(dtype=dtype, scaler=torch.amp.GradScaler(device.type) if dtype == torch.float16 else None)
    _logger.info('precision: %s', f'autocast {str(amp.dtype).replace("torch.", "")}' + (
        ' with a gradient scaler' if amp.scaler is not None else '') if amp.enabled else 'float32')
    return amp


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
