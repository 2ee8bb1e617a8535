"""What a checkpoint may hold: checked before any of it is used.

- :func:`check_checkpoint` checks the types and shapes of everything a script reads from a
  checkpoint (``model``, ``model_ema``, ``epoch``, ``args`` and its fields, ``flop`` and the stored
  results, optimizer / scheduler / scaler states) before any of it is used, raising
  :class:`utils.common.errors.CheckpointError` with one line.
- :data:`CHECKPOINT_MODEL_KWARGS` is the allow-list of ``args.model_kwargs`` entries a checkpoint
  may pass to ``timm.create_model``: architecture hyperparameters only, so a checkpoint never
  chooses what else gets opened (``checkpoint_path``, ``pretrained_cfg_overlay=dict(file=...)``);
  :func:`architecture_from_checkpoint` reads a training checkpoint's model through it.
- :func:`check_optimizer_state` refuses an optimizer state made by another optimizer.
"""
from __future__ import annotations

import argparse
import math
import numbers
import re
from typing import Any, Dict, Mapping, Optional

import torch

from datasets.safe_read import MAX_DEPTH, bounded_depth
from utils.common.errors import CheckpointError
from utils.common.flags import MAX_COARSE_STAGE_SIZE, parse_model_kwargs

__all__ = [
    'CHECKPOINT_MODEL_KWARGS', 'check_checkpoint', 'checkpoint_model_kwargs', 'check_optimizer_state',
    'architecture_from_checkpoint',
]

#: ``timm.create_model`` arguments a checkpoint's recorded ``args`` may set: architecture only.
#: Anything else (``checkpoint_path``, ``pretrained``, ``pretrained_cfg``, ``pretrained_cfg_overlay``,
#: ``cache_dir``, ...) could make timm open or download a file the checkpoint names.
CHECKPOINT_MODEL_KWARGS = frozenset({
    'embed_dim', 'depth', 'num_heads', 'mlp_ratio', 'patch_size', 'qkv_bias', 'qk_norm', 'img_size',
    'img_size_list', 'coarse_stage_size', 'in_chans', 'class_token', 'global_pool', 'drop_rate',
    'drop_path_rate', 'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate', 'informative_ratio',
    'attn_ema_beta', 'selection_start_block', 'fine_pos_embed_without_selection', 'normalize_coarse_logits',
    'normalize_fine_logits', 'mix_token', 'skip_lam', 'return_dense', 'init_values', 'layer_scale_init_value',
    'informative_selection', 'aux_weight', 'stem_chans', 'num_classes', 'selection_policy', 'selection_seed',
    'feature_reuse',
})
_PLAIN = (bool, int, float, str, type(None))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def _numbers(v: Any) -> Optional[list]:
    """``v`` as a list of finite floats (a list, tuple or 0/1-d tensor), else None."""
    if isinstance(v, torch.Tensor):
        if v.dim() > 1 or not v.dtype.is_floating_point and v.dtype not in (torch.int32, torch.int64):
            return None
        v = v.tolist() if v.dim() == 1 else [v.item()]
    if not isinstance(v, (list, tuple)) or not all(_is_number(x) for x in v):
        return None
    return [float(x) for x in v]


def _plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    return isinstance(v, _PLAIN)


def _state_dict_problem(value: Any) -> Optional[str]:
    if not isinstance(value, Mapping):
        return f'is a {type(value).__name__}, not a state_dict'
    bad = [k for k, v in value.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)][:3]
    if bad:
        return f'has entries that are not named tensors: {bad}'
    head = value.get('head.weight', value.get('module.head.weight'))
    if head is not None and head.dim() != 2:
        return f'has a classifier head.weight of shape {list(head.shape)}, expected (classes, width)'
    return None


def checkpoint_model_kwargs(args: Any, where: str) -> Dict[str, Any]:
    """The ``create_model`` overrides recorded in a checkpoint's ``args``, through the allow-list.

    Raises:
        CheckpointError: a recorded override outside :data:`CHECKPOINT_MODEL_KWARGS`, or not plain data.
    """
    get = (lambda k: args.get(k)) if isinstance(args, Mapping) else (lambda k: getattr(args, k, None))
    raw = get('model_kwargs')
    if not raw:
        return {}
    if isinstance(raw, Mapping):
        kwargs = dict(raw)
    elif isinstance(raw, str) or (isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw)):
        try:
            kwargs = parse_model_kwargs(raw)
        except ValueError as e:
            raise CheckpointError(f'{where}: args.model_kwargs cannot be read: {e}') from e
    else:
        raise CheckpointError(f'{where}: args.model_kwargs is a {type(raw).__name__}, expected KEY=VALUE strings')
    refused = sorted(k for k in kwargs if k not in CHECKPOINT_MODEL_KWARGS)
    if refused:
        raise CheckpointError(
            f'{where}: args.model_kwargs sets {", ".join(map(str, refused))}, which a checkpoint may not choose '
            f'(only architecture sizes reach create_model); pass --model-kwargs yourself if you mean it')
    bad = sorted(k for k, v in kwargs.items() if not _plain(v))
    if bad:
        raise CheckpointError(f'{where}: args.model_kwargs values of {", ".join(bad)} are not plain numbers or text')
    return kwargs


def _check_args(args: Any, where: str) -> None:
    if not isinstance(args, (argparse.Namespace, Mapping)):
        raise CheckpointError(f'{where}: args is a {type(args).__name__}, expected the training flags')
    get = (lambda k: args.get(k)) if isinstance(args, Mapping) else (lambda k: getattr(args, k, None))
    model = get('model')
    if model is not None and not (isinstance(model, str) and re.fullmatch(r'[A-Za-z0-9_.\-]+', model)):
        raise CheckpointError(f'{where}: args.model is {model!r}, not a model name')
    g = get('coarse_stage_size')
    if g is not None and not (_is_int(g) and 1 <= g <= MAX_COARSE_STAGE_SIZE):
        raise CheckpointError(f'{where}: args.coarse_stage_size is {g!r}, not a grid side')
    for key in ('embed_dim', 'depth', 'num_heads'):
        v = get(key)
        if v is not None and not (_is_int(v) and v >= 1):
            raise CheckpointError(f'{where}: args.{key} is {v!r}, not a positive integer')
    for key in ('opt',):
        v = get(key)
        if v is not None and not isinstance(v, str):
            raise CheckpointError(f'{where}: args.{key} is {v!r}, not a name')
    checkpoint_model_kwargs(args, where)


def check_checkpoint(checkpoint: Any, where: str) -> Any:
    """Check what scripts read from a checkpoint; returns it unchanged.

    A bare state_dict is accepted as is (its tensors are matched against the model later).

    Raises:
        CheckpointError: one line naming the first entry of the wrong type or shape.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f'{where} holds a {type(checkpoint).__name__}, expected a dict checkpoint')
    bounded_depth(checkpoint, MAX_DEPTH, where, CheckpointError, leaves=(torch.Tensor,))
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        problem = _state_dict_problem(checkpoint)
        if problem:
            raise CheckpointError(f'{where} {problem}')
        return checkpoint
    for key in ('model', 'state_dict', 'model_ema'):
        value = checkpoint.get(key)
        if value is not None:
            problem = _state_dict_problem(value)
            if problem:
                raise CheckpointError(f'{where}: {key!r} {problem}')
    epoch = checkpoint.get('epoch')
    if epoch is not None and not (_is_int(epoch) and epoch >= 0):
        raise CheckpointError(f'{where}: epoch is {epoch!r}, expected a non-negative integer')
    for key in ('max_fine_acc1', 'coarse_acc1', 'fine_acc1'):
        v = checkpoint.get(key)
        if v is not None and not _is_number(v):
            raise CheckpointError(f'{where}: {key} is {v!r}, expected a finite number')
    for key in ('flop', 'anytime_classification'):
        v = checkpoint.get(key)
        if v is not None:
            values = _numbers(v)
            if values is None or len(values) != 2:
                raise CheckpointError(f'{where}: {key} is {_short(v)}, expected two finite numbers [coarse, fine]')
    budget = checkpoint.get('budgeted_batch_classification')
    if budget is not None:
        rows = [_numbers(r) for r in budget] if isinstance(budget, (list, tuple)) else None
        if rows is None or len(rows) != 2 or None in rows or len(rows[0]) != len(rows[1]) or not rows[0]:
            raise CheckpointError(f'{where}: budgeted_batch_classification is {_short(budget)}, expected two '
                                  f'equally long lists of finite numbers [GFLOPs, top-1]')
    optimizer = checkpoint.get('optimizer')
    if optimizer is not None:
        groups = optimizer.get('param_groups') if isinstance(optimizer, Mapping) else None
        if not (isinstance(optimizer, Mapping) and isinstance(optimizer.get('state'), Mapping)
                and isinstance(groups, list) and all(isinstance(g, Mapping) for g in groups)):
            raise CheckpointError(f'{where}: optimizer is not an optimizer state_dict (state, param_groups)')
    for key in ('lr_scheduler', 'scaler'):
        v = checkpoint.get(key)
        if v is not None and not isinstance(v, Mapping):
            raise CheckpointError(f'{where}: {key} is a {type(v).__name__}, expected a state_dict')
    if checkpoint.get('args') is not None:
        _check_args(checkpoint['args'], where)
    classes = checkpoint.get('classes')
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise CheckpointError(f'{where}: classes is {_short(classes)}, expected the class folder names')
    return checkpoint


def _short(v: Any, limit: int = 60) -> str:
    text = repr(v.tolist() if isinstance(v, torch.Tensor) and v.numel() < 20 else v)
    return text if len(text) <= limit else text[:limit] + '...'


_FAMILY_HYPERPARAMETERS = frozenset({'betas', 'momentum', 'nesterov', 'dampening', 'alpha', 'rho', 'lr_decay',
                                     'etas', 'step_sizes', 'lambd'})


def check_optimizer_state(saved: Mapping[str, Any], optimizer: torch.optim.Optimizer, where: str,
                          saved_opt: Optional[str] = None, opt: Optional[str] = None) -> None:
    """Refuse an optimizer state made by another optimizer (or for other parameters) before loading it
    (``load_state_dict`` would accept it, and the first step would fail on the foreign state).

    Raises:
        CheckpointError: another ``--opt``, other group sizes, or hyperparameters this optimizer needs.
    """
    if saved_opt is not None and opt is not None and saved_opt.lower() != opt.lower():
        raise CheckpointError(f'{where} holds the state of --opt {saved_opt}, but this run uses --opt {opt}')
    own = optimizer.state_dict()
    groups, own_groups = saved['param_groups'], own['param_groups']
    sizes = [len(g.get('params', [])) for g in groups]
    if sizes != [len(g['params']) for g in own_groups]:
        raise CheckpointError(f'{where}: the optimizer state covers parameter groups of sizes {sizes}, this run has '
                              f'{[len(g["params"]) for g in own_groups]}: check the model flags')
    names = {k for g in groups for k in g if k != 'params'}
    # hyperparameters that tell optimizer families apart and that every torch version stores (newer
    # flags such as 'foreach' or 'decoupled_weight_decay' may be absent from older checkpoints: torch fills them)
    family = {k for g in own_groups for k in g} & _FAMILY_HYPERPARAMETERS
    if not family <= names:
        raise CheckpointError(f'{where}: the optimizer state lacks {sorted(family - names)}: it was made by '
                              f'another optimizer than --opt {opt or "?"}')


def architecture_from_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """Model name, grid and size overrides recorded in a training checkpoint's ``args``.

    Returns:
        ``{'model': ..., 'coarse_stage_size': ..., 'kwargs': {...}}`` with what is known, or ``{}``
        for checkpoints without training arguments (e.g. the released ones).
    """
    args = checkpoint.get('args') if isinstance(checkpoint, Mapping) else None
    if args is None:
        return {}
    get = (lambda k: args.get(k)) if isinstance(args, Mapping) else (lambda k: getattr(args, k, None))
    kwargs = {k: get(k) for k in ('embed_dim', 'depth', 'num_heads') if get(k) is not None}
    kwargs.update(checkpoint_model_kwargs(args, 'the checkpoint'))
    out: Dict[str, Any] = {'kwargs': kwargs}
    if get('model'):
        out['model'] = get('model')
    if get('coarse_stage_size'):
        out['coarse_stage_size'] = int(get('coarse_stage_size'))
    return out
