"""The one way to build the model a checkpoint holds (evaluation, export, visualization, label maps,
the quick start).

A training checkpoint records its architecture (``args``: model name, grid, size overrides; read
through the allow-list of :mod:`utils.common.checkpoint_schema`, so a checkpoint never names files to
open); a released checkpoint does not, and the caller's flags (or the released defaults:
cf_deit_small, 7x7) say what it is. :func:`resolve_architecture` decides the name, grid and
``create_model`` arguments; :func:`build_model_from_name` creates the model (one line for an impossible
configuration) and loads the weights with ``strict=True`` (every mismatch in one message);
:func:`build_from_checkpoint` does both for a CF classification checkpoint, the class count read from
its head.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn

from utils.common.checkpoint import extract_state_dict, load_model_weights
from utils.common.checkpoint_schema import architecture_from_checkpoint
from utils.common.errors import BadInputError, CheckpointError, ConfigError, ModelBuildError
from utils.common.flags import parse_model_kwargs

__all__ = ['ModelBuildError', 'resolve_architecture', 'build_model_from_name', 'build_from_checkpoint',
           'create_model_checked', 'EVALUATION_OVERRIDES', 'check_against_record', 'with_recorded_switches', 'adopt_recorded_switches',
           'check_flag_switches', 'without_fixed_kwargs']

_logger = logging.getLogger(__name__)

#: Recorded model arguments that a flag may change when a checkpoint is only evaluated: the paper's
#: ablations of a trained model (issue 30) and the rates that act in training only. Any other flag that
#: contradicts what a checkpoint records is refused; in training (resume, fine-tuning) every one is.
EVALUATION_OVERRIDES = frozenset({
    'informative_ratio', 'selection_policy', 'selection_seed', 'feature_reuse', 'drop_rate', 'drop_path_rate',
    'attn_drop_rate', 'proj_drop_rate', 'pos_drop_rate', 'mix_token'})


#: ``create_model`` arguments that load weights: the builders of a checkpoint's model refuse them in flags.
WEIGHT_SOURCES = frozenset({'pretrained', 'pretrained_cfg', 'pretrained_cfg_overlay', 'checkpoint_path', 'cache_dir',
                            'pretrained_strict'})


def check_against_record(recorded: Mapping[str, Any], given: Mapping[str, Any], source: str, evaluation: bool,
                         error: type = ModelBuildError) -> None:
    """Refuse (``error``, one line naming both values) a flag value ``given`` that contradicts a model argument
    ``recorded`` by ``source``; when ``evaluation``, :data:`EVALUATION_OVERRIDES` are allowed, with a log line."""
    for key in sorted(set(recorded) & set(given)):
        if recorded[key] == given[key]:
            continue
        if evaluation and key in EVALUATION_OVERRIDES:
            _logger.info('%s records %s=%r; the flags override it with %s=%r', source, key, recorded[key], key,
                         given[key])
            continue
        raise error(f'{source} records {key}={recorded[key]!r}, but the flags give {key}={given[key]!r}: the model '
                    f'would not be the one the checkpoint holds; drop the flag (the record is used)')


def with_recorded_switches(args: argparse.Namespace, model: nn.Module) -> argparse.Namespace:
    """A copy of ``args`` whose ``model_kwargs`` also name the switches ``model`` holds now (its
    ``switches()``: e.g. ``fine_pos_embed_without_selection`` that a conversion turned on in memory), so the
    checkpoint that saves it records every argument the model computes with. ``args`` itself is unchanged."""
    switches = getattr(model, 'switches', None)
    if switches is None:  # a plain baseline: its flags say everything
        return args
    own = switches()
    try:
        given = parse_model_kwargs(getattr(args, 'model_kwargs', None) or [])
    except ValueError:
        given = {}
    items = [f'{k}={v!r}' for k, v in given.items() if k not in own] + [f'{k}={v!r}' for k, v in own.items()]
    return argparse.Namespace(**{**vars(args), 'model_kwargs': items})


def check_flag_switches(model: nn.Module, explicit: Mapping[str, Any], why: str) -> None:
    """Refuse (:class:`ConfigError`) ``--model-kwargs`` switches that ``model`` does not hold after ``why``
    (e.g. a conversion that needs ``fine_pos_embed_without_selection=True``)."""
    own = model.switches() if hasattr(model, 'switches') else {}
    for key in sorted(set(own) & set(explicit)):
        if own[key] != explicit[key]:
            raise ConfigError(f'--model-kwargs {key}={explicit[key]!r} contradicts {why}, which gives {key}='
                              f'{own[key]!r}: drop it from --model-kwargs')


def adopt_recorded_switches(targets: Iterable[Optional[nn.Module]], checkpoint: Any, explicit: Mapping[str, Any],
                            source: str, evaluation: bool = False) -> Dict[str, Any]:
    """Set on each model of ``targets`` (the model and its EMA) the switches ``checkpoint`` records where they
    differ; a flag (``explicit``: the parsed ``--model-kwargs``) that contradicts the record is refused
    (:func:`check_against_record`). Returns what was set (also logged).

    Raises:
        ConfigError: a flag that contradicts the record. CheckpointError: a recorded value the model refuses.
    """
    models_ = [m for m in targets if m is not None and hasattr(m, 'switches')]
    if not models_ or not isinstance(checkpoint, Mapping):
        return {}
    own = models_[0].switches()
    recorded = {k: v for k, v in architecture_from_checkpoint(checkpoint).get('kwargs', {}).items() if k in own}
    check_against_record(recorded, explicit, source, evaluation, ConfigError)
    changes = {k: v for k, v in recorded.items() if k not in explicit and own[k] != v}
    if changes:
        try:
            for m in models_:
                m.set_switches(**changes)
        except ValueError as e:
            raise CheckpointError(f'{source}: the recorded model arguments cannot be used: {e}') from e
        _logger.info('%s records %s: the model uses them', source, ', '.join(f'{k}={v!r}' for k, v in changes.items()))
    return changes


def resolve_architecture(checkpoint: Any, model_name: Optional[str] = None, coarse_stage_size: Optional[int] = None,
                         model_kwargs: Union[Sequence[str], Mapping[str, Any]] = (),
                         sizes: Optional[Mapping[str, Any]] = None, default_model: Optional[str] = 'cf_deit_small',
                         default_grid: int = 7) -> Tuple[Optional[str], int, Dict[str, Any]]:
    """``(model name, coarse grid side, create_model arguments)`` of the model ``checkpoint`` holds.

    Args:
        checkpoint: a loaded checkpoint (or None); a training checkpoint's ``args`` say what it holds.
        model_name, coarse_stage_size: the flags (default: what the checkpoint records, else
            ``default_model`` and ``default_grid``).
        model_kwargs: more ``create_model`` arguments: ``KEY=VALUE`` items (or one JSON object), or a dict.
        sizes: flag overrides applied before ``model_kwargs`` (``--embed-dim`` and the like).

    The checkpoint's recorded size overrides are used when it records the same model.

    Raises:
        ModelBuildError: ``model_kwargs`` that are not ``KEY=VALUE``.
        utils.common.errors.CheckpointError: recorded overrides outside the allow-list.
    """
    recorded = architecture_from_checkpoint(checkpoint) if isinstance(checkpoint, Mapping) else {}
    name = model_name or recorded.get('model', default_model)
    g = coarse_stage_size or recorded.get('coarse_stage_size', default_grid)
    same = _base_name(recorded.get('model', name)) == _base_name(name)  # a pretrained tag names the same model
    kwargs: Dict[str, Any] = dict(recorded.get('kwargs', {})) if same else {}
    given = dict(sizes or {})
    if isinstance(model_kwargs, Mapping):
        given.update(model_kwargs)
    else:
        try:
            given.update(parse_model_kwargs(model_kwargs))
        except ValueError as e:
            raise ModelBuildError(str(e)) from None
    loading = sorted(k for k in given if k in WEIGHT_SOURCES)
    if loading:  # the weights come from the checkpoint (or the script's own --pretrained), never a model argument
        raise ModelBuildError(f'--model-kwargs {", ".join(loading)}: a model argument may not choose the weights; '
                              'they come from the checkpoint (or the script\'s --pretrained)')
    check_against_record(kwargs, given, 'the checkpoint', evaluation=True)
    kwargs.update(given)
    return name, g, kwargs


def without_fixed_kwargs(kwargs: Mapping[str, Any], fixed: Mapping[str, Any], origin: str,
                         error: type = ConfigError, recorded: bool = False) -> Dict[str, Any]:
    """``kwargs`` (``--model-kwargs``) without the model arguments the run fixes itself (``fixed``:
    ``num_classes``, ``coarse_stage_size``), which they may repeat but never contradict: never a silent other
    head or grid, and never create_model's "multiple values for keyword argument" TypeError.

    Args:
        origin: where the fixed values come from, for the message (``'the data set and --coarse-stage-size'``).
        recorded: ``kwargs`` may also come from a checkpoint's record (``build_from_checkpoint``): the message
            says so.

    Raises:
        error: ``--model-kwargs num_classes=7 contradicts the run (num_classes=5, coarse_stage_size=3 from
            ...): drop it from --model-kwargs``.
    """
    clash = [f'{k}={kwargs[k]!r}' for k in fixed if k in kwargs and kwargs[k] != fixed[k]]
    if clash:
        run = ', '.join(f'{k}={v}' for k, v in fixed.items())
        said, also = (' (given, or recorded in the checkpoint)', ", or from the checkpoint's args.model_kwargs") \
            if recorded else ('', '')
        raise error(f'--model-kwargs {", ".join(clash)}{said} contradicts the run ({run} from {origin}): drop it from '
                    f'--model-kwargs{also}')
    return {k: v for k, v in kwargs.items() if k not in fixed}


def _base_name(name: Optional[str]) -> Optional[str]:
    """A model name without its pretrained tag (``cf_deit_small_patch16_224.fb_in1k`` -> ``cf_deit_small_patch16_224``)."""
    return name.split('.', 1)[0] if isinstance(name, str) else name


def create_model_checked(name: str, error: type = BadInputError, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; an impossible configuration (width not divisible by the heads,
    an unknown argument, ...) raises ``error`` with one line instead of timm's traceback."""
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError) as e:
        shown = {k: v for k, v in kwargs.items() if k != 'pretrained'}
        raise error(f'cannot build {name} with {shown}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
                    .rstrip(': ')) from e


def build_model_from_name(name: str, state_dict: Optional[Mapping[str, torch.Tensor]] = None,
                          error: type = ModelBuildError, **kwargs: Any) -> nn.Module:
    """``name`` built with ``kwargs`` (:func:`create_model_checked`, raising ``error``), with ``state_dict``
    loaded strictly when given (:func:`utils.common.checkpoint.load_model_weights`: every mismatch in one
    :class:`~utils.common.errors.CheckpointError`)."""
    model = create_model_checked(name, error, **kwargs)
    if state_dict is not None:
        load_model_weights(model, state_dict)
    return model


def build_from_checkpoint(checkpoint: Mapping[str, Any], model_name: Optional[str] = None,
                          coarse_stage_size: Optional[int] = None, model_kwargs: Sequence[str] = (),
                          checkpoint_key: Optional[str] = None) -> Tuple[nn.Module, str, int]:
    """The CF model of ``checkpoint`` with its weights loaded (strict), informative selection on.

    Args:
        checkpoint: a loaded checkpoint (released layout or a training checkpoint).
        model_name, coarse_stage_size, model_kwargs: see :func:`resolve_architecture`.
        checkpoint_key: the entry holding the weights (default ``model``, else the whole file).

    Returns:
        ``(model, model_name, coarse_stage_size)``.

    Raises:
        ModelBuildError: no classification head, or a model that cannot be built with these arguments.
        utils.common.errors.CheckpointError: weights that do not fit the model.
    """
    name, g, extra = resolve_architecture(checkpoint, model_name, coarse_stage_size, model_kwargs)
    state_dict = extract_state_dict(checkpoint, checkpoint_key)
    head = state_dict.get('head.weight')
    if head is None:
        raise ModelBuildError('the checkpoint has no head.weight: it is not a classification checkpoint of a CF model')
    fixed = {'num_classes': int(head.shape[0]), 'coarse_stage_size': g}
    extra = without_fixed_kwargs(extra, fixed, "the checkpoint's weights and the flags", ModelBuildError, recorded=True)
    model = build_model_from_name(name, state_dict, **fixed, **extra)
    model.set_informative_selection(True)  # inference always selects
    return model, name, g
