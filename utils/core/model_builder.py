"""Building the CF model a checkpoint holds, for the scripts that read one (evaluation, export).

A training checkpoint records its architecture (``args``: model name, grid, size overrides); a
released checkpoint does not, and the caller's flags (or the released defaults: cf_deit_small, 7x7)
say what it is. The class count comes from the checkpoint's head. Weights load with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from utils.core.checkpoint import extract_state_dict, load_model_weights
from utils.core.checkpoint_schema import architecture_from_checkpoint
from utils.core.cli import parse_model_kwargs
from utils.core.errors import BadInputError, ModelBuildError

__all__ = ['ModelBuildError', 'build_from_checkpoint', 'create_model_checked']


def build_from_checkpoint(checkpoint: Mapping[str, Any], model_name: Optional[str] = None,
                          coarse_stage_size: Optional[int] = None, model_kwargs: Sequence[str] = (),
                          checkpoint_key: Optional[str] = None) -> Tuple[nn.Module, str, int]:
    """The model of ``checkpoint`` with its weights loaded (strict), informative selection on.

    Args:
        checkpoint: a loaded checkpoint (released layout or a training checkpoint).
        model_name, coarse_stage_size: the architecture (default: what the checkpoint records, else
            ``cf_deit_small`` and 7).
        model_kwargs: extra ``timm.create_model`` arguments (``KEY=VALUE`` items or one JSON object); a
            training checkpoint's own size overrides are used when it records the same model.
        checkpoint_key: the entry holding the weights (default ``model``, else the whole file).

    Returns:
        ``(model, model_name, coarse_stage_size)``.

    Raises:
        ModelBuildError: no classification head, or a model that cannot be built with these arguments.
        utils.core.errors.CheckpointError: weights that do not fit the model.
    """
    recorded = architecture_from_checkpoint(checkpoint)
    name = model_name or recorded.get('model', 'cf_deit_small')
    g = coarse_stage_size or recorded.get('coarse_stage_size', 7)
    extra: Dict[str, Any] = dict(recorded.get('kwargs', {})) if recorded.get('model', name) == name else {}
    try:
        extra.update(parse_model_kwargs(model_kwargs))
    except ValueError as e:
        raise ModelBuildError(str(e)) from None
    state_dict = extract_state_dict(checkpoint, checkpoint_key)
    head = state_dict.get('head.weight')
    if head is None:
        raise ModelBuildError('the checkpoint has no head.weight: it is not a classification checkpoint of a CF model')
    for key, value in (('num_classes', head.shape[0]), ('coarse_stage_size', g)):
        given = extra.pop(key, value)  # a model argument the checkpoint or a flag already fixes
        if given != value:
            raise ModelBuildError(f'model_kwargs (from --model-kwargs or recorded in the checkpoint) say {key}={given}, '
                                  f'but the checkpoint\'s weights and the flags give {key}={value}')
    model = create_model_checked(name, ModelBuildError, coarse_stage_size=g, num_classes=head.shape[0], **extra)
    load_model_weights(model, state_dict)
    model.set_informative_selection(True)  # inference always selects
    return model, name, g


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
