"""The one way to build the model a checkpoint holds (evaluation, export, visualization, label maps,
the quick start).

A training checkpoint records its architecture (``args``: model name, grid, size overrides; read
through the allow-list of :mod:`utils.core.checkpoint_schema`, so a checkpoint never names files to
open); a released checkpoint does not, and the caller's flags (or the released defaults:
cf_deit_small, 7x7) say what it is. :func:`resolve_architecture` decides the name, grid and
``create_model`` arguments; :func:`build_model` creates the model (one line for an impossible
configuration) and loads the weights with ``strict=True`` (every mismatch in one message);
:func:`build_from_checkpoint` does both for a CF classification checkpoint, the class count read from
its head.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from utils.core.checkpoint import extract_state_dict, load_model_weights
from utils.core.checkpoint_schema import architecture_from_checkpoint
from utils.core.cli import parse_model_kwargs
from utils.core.errors import BadInputError, ModelBuildError

__all__ = ['ModelBuildError', 'resolve_architecture', 'build_model', 'build_from_checkpoint', 'create_model_checked']


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
        utils.core.errors.CheckpointError: recorded overrides outside the allow-list.
    """
    recorded = architecture_from_checkpoint(checkpoint) if isinstance(checkpoint, Mapping) else {}
    name = model_name or recorded.get('model', default_model)
    g = coarse_stage_size or recorded.get('coarse_stage_size', default_grid)
    kwargs: Dict[str, Any] = dict(recorded.get('kwargs', {})) if recorded.get('model', name) == name else {}
    kwargs.update(sizes or {})
    if isinstance(model_kwargs, Mapping):
        kwargs.update(model_kwargs)
    else:
        try:
            kwargs.update(parse_model_kwargs(model_kwargs))
        except ValueError as e:
            raise ModelBuildError(str(e)) from None
    return name, g, kwargs


def create_model_checked(name: str, error: type = BadInputError, **kwargs: Any) -> torch.nn.Module:
    """``timm.create_model(name, **kwargs)``; an impossible configuration (width not divisible by the heads,
    an unknown argument, ...) raises ``error`` with one line instead of timm's traceback."""
    import timm
    try:
        return timm.create_model(name, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, ZeroDivisionError) as e:
        shown = {k: v for k, v in kwargs.items() if k != 'pretrained'}
        raise error(f'cannot build {name} with {shown}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}'
                    .rstrip(': ')) from e


def build_model(name: str, state_dict: Optional[Mapping[str, torch.Tensor]] = None, error: type = ModelBuildError,
                **kwargs: Any) -> nn.Module:
    """``name`` built with ``kwargs`` (:func:`create_model_checked`, raising ``error``), with ``state_dict``
    loaded strictly when given (:func:`utils.core.checkpoint.load_model_weights`: every mismatch in one
    :class:`~utils.core.errors.CheckpointError`)."""
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
        utils.core.errors.CheckpointError: weights that do not fit the model.
    """
    name, g, extra = resolve_architecture(checkpoint, model_name, coarse_stage_size, model_kwargs)
    state_dict = extract_state_dict(checkpoint, checkpoint_key)
    head = state_dict.get('head.weight')
    if head is None:
        raise ModelBuildError('the checkpoint has no head.weight: it is not a classification checkpoint of a CF model')
    for key, value in (('num_classes', head.shape[0]), ('coarse_stage_size', g)):
        given = extra.pop(key, value)  # a model argument the checkpoint or a flag already fixes
        if given != value:
            raise ModelBuildError(f'model_kwargs (from --model-kwargs or recorded in the checkpoint) say {key}={given}, '
                                  f'but the checkpoint\'s weights and the flags give {key}={value}')
    model = build_model(name, state_dict, coarse_stage_size=g, num_classes=head.shape[0], **extra)
    model.set_informative_selection(True)  # inference always selects
    return model, name, g
