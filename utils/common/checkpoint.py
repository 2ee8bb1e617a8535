"""Reading checkpoints, shared by every script.

- Loading never runs code: ``torch.load(..., weights_only=True)`` with an allow-list of the plain
  types that released and training checkpoints hold. Anything else is refused with a message
  naming the type, unless the caller opts in with ``unsafe=True`` (``--unsafe-load``).
- What is read is checked before any use (:mod:`utils.common.checkpoint_schema`); files are written
  through :mod:`utils.common.atomic` (atomically).
- Model weights are matched against the model before loading, and every mismatch is reported in
  one message.
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn
from safetensors.torch import load_file

from datasets.safe_read import file_kind
from utils.common.checkpoint_schema import check_checkpoint
from utils.common.errors import CheckpointError, first_line

__all__ = [
    'CheckpointError', 'SAFE_GLOBALS', 'load_checkpoint_file', 'extract_state_dict', 'check_state_dict',
    'load_model_weights',
]

PathLike = Union[str, os.PathLike]

#: Types besides tensors and plain containers that our and the released checkpoints contain.
SAFE_GLOBALS: List[Any] = [argparse.Namespace]


def load_checkpoint_file(path: PathLike, unsafe: bool = False) -> Any:
    """Read a ``.pth``/``.pt`` (or ``.safetensors``) checkpoint onto the CPU without running code.

    Args:
        path: the file.
        unsafe: fall back to full unpickling for files the user trusts (``--unsafe-load``).

    Raises:
        CheckpointError: missing, truncated or corrupt file, or a type outside the allow-list.
    """
    path = Path(path)
    if not path.is_file():
        try:  # a pipe, a device or a folder is there: say so (reading /dev/zero or a FIFO would never end)
            kind = file_kind(path.stat().st_mode)
        except OSError:
            raise CheckpointError(f'checkpoint not found: {path}') from None
        raise CheckpointError(f'checkpoint {path} is {kind}: expected a regular file')
    if path.suffix == '.safetensors':
        try:
            return load_file(str(path), device='cpu')
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f'cannot read {path} as safetensors: {e}') from e
    try:
        if unsafe:
            obj = torch.load(path, map_location='cpu', weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                obj = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)', str(e))
        if found is None:  # garbage that happens to look like a pickle
            raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint: {first_line(e)}') from e
        name = found.group(1) or found.group(2)
        raise CheckpointError(
            f'{path} holds an object of type {name}, which is not plain data: loading it would run code '
            f'from the file. If you trust the file, pass --unsafe-load.') from e
    except Exception as e:  # truncated zip, garbage bytes: torch raises many types here
        raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint: {first_line(e)}') from e
    if isinstance(obj, Mapping):  # a checkpoint (label maps are bare tensors): types and shapes, before any use
        check_checkpoint(obj, str(path))
    return obj


def extract_state_dict(checkpoint: Any, key: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """The model weights inside a checkpoint.

    Args:
        checkpoint: a bare state_dict, the released layout ``{'model': ..., 'flop': ...}``, a
            training checkpoint, or ``{'state_dict': ...}``.
        key: take this entry (e.g. ``'model_ema'``) instead of guessing.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'a checkpoint must be a dict, got {type(checkpoint).__name__}')
    if key is not None:
        if checkpoint.get(key) is None:
            raise CheckpointError(f'checkpoint has no {key!r} weights (its entries: {", ".join(map(str, checkpoint))})')
        checkpoint = checkpoint[key]
    else:
        for k in ('model', 'state_dict'):
            if isinstance(checkpoint.get(k), Mapping):
                checkpoint = checkpoint[k]
                break
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'the checkpoint weights are a {type(checkpoint).__name__}, not a state_dict')
    state_dict = dict(checkpoint)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)][:5]
        raise CheckpointError(f'no state_dict found: entries {bad} are not tensors')
    prefix = 'module.'
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                     max_items: int = 8) -> Optional[str]:
    """None if ``state_dict`` fits ``model`` exactly, else a message listing what differs."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes: List[Tuple[str, tuple, tuple]] = [
        (k, tuple(state_dict[k].shape), tuple(v.shape)) for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or shapes):
        return None

    def listing(items: List[str]) -> str:
        more = f', ... ({len(items) - max_items} more)' if len(items) > max_items else ''
        return ', '.join(items[:max_items]) + more

    parts = []
    if missing:
        parts.append(f'{len(missing)} missing keys: {listing(missing)}')
    if unexpected:
        parts.append(f'{len(unexpected)} unexpected keys: {listing(unexpected)}')
    if shapes:
        parts.append(f'{len(shapes)} shape mismatches: ' + listing(
            [f'{k} (checkpoint {list(a)} vs model {list(b)})' for k, a, b in shapes]))
    return '; '.join(parts) + '.' + _mismatch_hint(own, state_dict, shapes)


def _model_size(state_dict: Mapping[str, Any]) -> Tuple[Optional[int], int]:
    """(embedding width, number of blocks) of a CF/ViT state_dict (width None when it has no ``cls_token``)."""
    width = state_dict['cls_token'].shape[-1] if 'cls_token' in state_dict else None
    blocks = {int(m.group(1)) for m in (re.match(r'blocks\.(\d+)\.', k) for k in state_dict) if m}
    return width, (max(blocks) + 1 if blocks else 0)


def _mismatch_hint(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor],
                   shapes: List[Tuple[str, tuple, tuple]]) -> str:
    """What the mismatch most likely means: another model size, another class count or another grid."""
    (c_width, c_depth), (m_width, m_depth) = _model_size(state_dict), _model_size(own)
    hints = []
    if (c_width, c_depth) != (m_width, m_depth) and c_width is not None and m_width is not None:
        hints.append(f' The checkpoint holds a model of another size (embed_dim {c_width}, depth {c_depth}; this '
                     f'model: embed_dim {m_width}, depth {m_depth}): build the model it was trained as (a training '
                     f'checkpoint records its sizes, which the scripts use when no flag overrides them; otherwise '
                     f'--model and --model-kwargs embed_dim={c_width} depth={c_depth} num_heads=...).')
    heads = [(a, b) for k, a, b in shapes if k in ('head.weight', 'aux_head.weight')]
    if heads and heads[0][0][0] != heads[0][1][0]:
        hints.append(f' The classifier differs in class count (checkpoint {heads[0][0][0]}, model {heads[0][1][0]}): '
                     'evaluating needs a checkpoint trained on these classes (a new head would be random); to train '
                     'from these weights on these classes, --finetune loads all but the head.')
    elif not hints and any(k.startswith(('head.', 'aux_head.')) for k, _, _ in shapes):
        hints.append(' The classifier differs in class count: --finetune (training) loads all but the head.')
    if not hints and any(k.startswith('pos_embed_list') for k, _, _ in shapes):
        hints.append(' The position embeddings differ: check --coarse-stage-size (7 or 9 for the released models).')
    return ''.join(hints)


def load_model_weights(model: nn.Module, source: Union[PathLike, Mapping[str, Any]], key: Optional[str] = None,
                       unsafe: bool = False) -> Any:
    """Load weights into ``model`` with ``strict=True``.

    Args:
        model: the model.
        source: a checkpoint path or an already loaded checkpoint.
        key: checkpoint entry holding the weights (default: ``model``/``state_dict``/bare).
        unsafe: see :func:`load_checkpoint_file`.

    Returns:
        The whole checkpoint (for its other entries, e.g. ``flop``).

    Raises:
        CheckpointError: with every missing/unexpected key and shape mismatch in one message.
    """
    checkpoint = source if isinstance(source, Mapping) else load_checkpoint_file(source, unsafe=unsafe)
    state_dict = extract_state_dict(checkpoint, key)
    problem = check_state_dict(model, state_dict)
    if problem is not None:
        name = getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)
        where = f' {source}' if not isinstance(source, Mapping) else ''
        raise CheckpointError(f'checkpoint{where} does not fit {name}: {problem}')
    bad = _non_finite_parameter(model, state_dict)
    if bad is not None:
        where = f' {source}' if not isinstance(source, Mapping) else ''
        raise CheckpointError(f'checkpoint{where} holds non-finite weights ({bad}): the run that wrote it diverged, '
                              'and every prediction of this model would be meaningless')
    model.load_state_dict(state_dict, strict=True)
    return checkpoint


def _non_finite_parameter(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> Optional[str]:
    """``'NAME: n of N values are NaN or infinite'`` for the first parameter of ``model`` whose weights in
    ``state_dict`` are not all finite, else None (buffers may hold infinities on purpose: not checked)."""
    for name, _ in model.named_parameters():
        t = state_dict.get(name)
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return f'{name}: {int((~torch.isfinite(t)).sum())} of {t.numel()} values are NaN or infinite'
    return None




