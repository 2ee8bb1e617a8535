"""Checkpoint input/output shared by every script.

- Loading never runs code: ``torch.load(..., weights_only=True)`` with an allow-list of the plain
  types that released and training checkpoints hold. Anything else is refused with a message
  naming the type, unless the caller opts in with ``unsafe=True`` (``--unsafe-load``).
- Saving is atomic: a temporary file in the target folder, flushed and fsynced, then renamed, so
  an interruption leaves the previous file intact. A user's file is never modified in place.
- Model weights are matched against the model before loading, and every mismatch is reported in
  one message.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    'CheckpointError', 'SAFE_GLOBALS', 'load_checkpoint_file', 'extract_state_dict', 'check_state_dict',
    'load_model_weights', 'save_atomic', 'atomic_file', 'write_json_atomic', 'remove_stale_temp_files',
]

PathLike = Union[str, os.PathLike]

#: Types besides tensors and plain containers that our and the released checkpoints contain.
SAFE_GLOBALS: List[Any] = [argparse.Namespace]


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, with a message meant for a person."""


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
        raise CheckpointError(f'checkpoint not found: {path}')
    if path.suffix == '.safetensors':
        from safetensors.torch import load_file
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
            raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint: {_first_line(e)}') from e
        name = found.group(1) or found.group(2)
        raise CheckpointError(
            f'{path} holds an object of type {name}, which is not plain data: loading it would run code '
            f'from the file. If you trust the file, pass --unsafe-load.') from e
    except Exception as e:  # truncated zip, garbage bytes: torch raises many types here
        raise CheckpointError(f'{path} is truncated or not a PyTorch checkpoint: {_first_line(e)}') from e
    if isinstance(obj, Mapping):  # a checkpoint (label maps are bare tensors): types and shapes, before any use
        from .validation import check_checkpoint
        check_checkpoint(obj, str(path))
    return obj


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__


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
    hint = ''
    heads = [(a, b) for k, a, b in shapes if k in ('head.weight', 'aux_head.weight')]
    widths = [(a[-1], b[-1]) for k, a, b in shapes if k in ('head.weight', 'aux_head.weight', 'cls_token', 'norm.weight')
              and a and b and a[-1] != b[-1]]
    if widths:  # another embedding width: the class count may well be the same
        hint = (f' The model width differs (checkpoint {widths[0][0]}, model {widths[0][1]}): build the model the '
                'checkpoint was trained as (--model, or --model-kwargs embed_dim=... depth=... num_heads=...).')
        heads = []
    if heads:
        hint = (f' The classifier differs in class count (checkpoint {heads[0][0][0]}, model {heads[0][1][0]}): '
                'evaluating needs a checkpoint trained on these classes (a new head would be random); to train '
                'from these weights on these classes, --finetune loads all but the head.')
    elif widths:
        pass
    elif any(k.startswith(('head.', 'aux_head.')) for k, _, _ in shapes):
        hint = ' The classifier differs in class count: --finetune (training) loads all but the head.'
    elif any(k.startswith('pos_embed_list') for k, _, _ in shapes):
        hint = ' The position embeddings differ: check --coarse-stage-size (7 or 9 for the released models).'
    return '; '.join(parts) + '.' + hint


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
    model.load_state_dict(state_dict, strict=True)
    return checkpoint


# the process umask, read once (os.umask can only be read by setting it, which is not thread-safe later)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = 'wb') -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the permissions open() would
        except OSError:  # file systems without modes (vfat, some network mounts): keep what it has
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: PathLike, names: Sequence[str],
                            keep: Sequence[Optional[PathLike]] = ()) -> List[Path]:
    """Delete the temporary files that :func:`atomic_file` left beside ``folder/<name>`` when its
    process was killed mid-write (``.<name>.*.tmp``; never loaded by anything), except the files in
    ``keep`` (those the user named, e.g. ``--resume``). Call it only where no other process is writing
    these files (the run lock). Returns the deleted paths."""
    kept = {os.path.realpath(k) for k in keep if k}
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f'.{name}.*.tmp'):
            if os.path.realpath(tmp) in kept:
                continue
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
            removed.append(tmp)
    return removed


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` (or safetensors for ``.safetensors``) to ``path`` atomically."""
    path = Path(path)
    with atomic_file(path) as f:
        if path.suffix == '.safetensors':
            from safetensors.torch import save
            f.write(save({k: v.contiguous() for k, v in obj.items()}))
        else:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) this way
                if 'inline_container' not in str(e) and 'PytorchStreamWriter' not in str(e):
                    raise
                raise _write_error(path, e) from e


def _write_error(path: Path, error: BaseException) -> OSError:
    """An OSError for a write that torch reported as a RuntimeError: ENOSPC when the disk is (nearly) full."""
    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f'the write failed ({_first_line(error)})', str(path))


def write_json_atomic(obj: Any, path: PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_file(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')
