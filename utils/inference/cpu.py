"""What pays on this CPU: native bfloat16, weights cast once, the allocator.

Three findings of the side-by-side benchmark (BENCHMARKS.md, benchmark 7) live here:

- bfloat16 autocast is only fast where the CPU multiplies bfloat16 natively (Intel AMX or
  AVX512-BF16, through oneDNN); elsewhere torch emulates it and it is several times slower than
  float32. The flags are not the whole story, so :func:`bf16_speedup` measures a ViT MLP and
  :func:`bf16_pays` says yes to ``--amp-dtype auto`` only where it measured faster.
- Autocast casts every weight to bfloat16 on every call (its cast cache lives for one autocast
  region), which at small batches costs more than the products it speeds up.
  :func:`cast_weights_for_autocast` casts the weights of the layers autocast runs in bfloat16 once,
  in place: under autocast the outputs are bit-identical (autocast would have made the same casts),
  but the model is then for inference under autocast only.
- glibc returns freed blocks above its mmap threshold (at most 32 MiB by its own rule) to the
  system, so each new large activation (a batch-64 fine stage's MLP has 49 MB ones) is page-faulted
  in again, zero-filled, at every call. :func:`keep_freed_memory` raises the thresholds so freed
  memory stays in the heap for the next call: the process keeps its peak memory.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import time
from functools import lru_cache
from pathlib import Path
from typing import Tuple

import torch
import torch.nn as nn

__all__ = ['cpu_flags', 'cpu_bf16_native', 'bf16_speedup', 'bf16_pays', 'cast_weights_for_autocast',
           'keep_freed_memory', 'has_mallopt']

#: CPU flags that mean bfloat16 multiply instructions.
BF16_FLAGS = ('amx_bf16', 'avx512_bf16')
#: Layers whose weights autocast runs in the low-precision dtype (its lower-precision op list).
AUTOCAST_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: ``auto`` picks bfloat16 on a CPU only above this measured speed-up.
MIN_BF16_SPEEDUP = 1.2
#: glibc's mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@lru_cache(maxsize=1)
def cpu_flags() -> Tuple[str, ...]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('flags'):
                return tuple(line.split(':', 1)[1].split())
    except OSError:
        pass
    return ()


def cpu_bf16_native() -> bool:
    """The CPU has bfloat16 multiply instructions (AMX-BF16 or AVX512-BF16) and torch's oneDNN
    reports bfloat16 support."""
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn = False
    return onednn and any(f in cpu_flags() for f in BF16_FLAGS)


@lru_cache(maxsize=8)
def bf16_speedup(tokens: int = 197, dim: int = 384, reps: int = 5) -> float:
    """float32 time / bfloat16 time of a ViT MLP on (tokens, dim) inputs, at torch's current thread
    count, bfloat16 as the inference scripts run it (weights cast once, autocast): > 1 where it pays.
    Takes well under a second."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, dim, generator=gen)

    def mlp() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)).eval()

    def best(module: nn.Module, bf16: bool) -> float:
        with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            module(x)  # warm-up: oneDNN builds its kernels on the first call
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                for _ in range(4):
                    module(x)
                times.append(time.perf_counter() - t0)
        return min(times)

    return best(mlp(), False) / best(cast_weights_for_autocast(mlp(), torch.bfloat16), True)


def bf16_pays() -> bool:
    """bfloat16 pays on this CPU: it has native bfloat16 and a measured MLP runs faster in it
    (:func:`bf16_speedup` > MIN_BF16_SPEEDUP). ``--amp-dtype auto`` asks this
    (:func:`utils.common.precision.resolve_amp_dtype`)."""
    return cpu_bf16_native() and bf16_speedup() > MIN_BF16_SPEEDUP


def cast_weights_for_autocast(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast, in place, the weights and biases of the layers that autocast runs in ``dtype``
    (linear and convolution layers); everything else (norms, tokens, position embeddings) stays.

    Under ``torch.autocast(dtype=dtype)`` the model's outputs are unchanged bit for bit (autocast
    casts these weights to ``dtype`` itself, on every call); outside autocast, or for training,
    the cast model is not usable. Returns ``model``.
    """
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f'autocast runs layers in bfloat16 or float16, not {dtype}')
    for module in model.modules():
        if isinstance(module, AUTOCAST_LAYERS):
            module.to(dtype)
    return model


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Keep freed blocks up to ``threshold`` bytes in this process's heap for reuse (glibc only).

    Raises glibc's mmap and trim thresholds, so that the large activations of every forward pass
    reuse the memory of the previous one instead of being page-faulted in again. The setting lasts
    for the process's lifetime (also where a script runs in-process, as the quick start runs
    ``dynamic_inference.py``), and the process keeps its peak memory. Older glibc refuses mmap
    thresholds above 32 MiB: then 32 MiB is used. Returns False where the C library has no
    ``mallopt`` (not glibc) or refuses both values.
    """
    mallopt = _mallopt()
    if mallopt is None:
        return False
    value = int(min(threshold, 2 ** 31 - 1))
    mmap_ok = bool(mallopt(_M_MMAP_THRESHOLD, value)) or bool(mallopt(_M_MMAP_THRESHOLD, min(value, 32 << 20)))
    trim_ok = bool(mallopt(_M_TRIM_THRESHOLD, value))
    return mmap_ok or trim_ok


def has_mallopt() -> bool:
    """The C library has glibc's ``mallopt``."""
    return _mallopt() is not None


def _mallopt():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt
