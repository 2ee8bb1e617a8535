"""Building the CF model a checkpoint holds, for the scripts that read one (evaluation, export).

A training checkpoint records its architecture (``args``: model name, grid, size overrides); a
released checkpoint does not, and the caller's flags (or the released defaults: cf_deit_small, 7x7)
say what it is. The class count comes from the checkpoint's head. Weights load with ``strict=True``.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch.nn as nn

from .checkpoint import extract_state_dict, load_model_weights
from .misc import architecture_from_checkpoint, parse_model_kwargs
from .validation import create_model_checked

__all__ = ['ModelBuildError', 'build_from_checkpoint']


class ModelBuildError(ValueError):
    """The checkpoint or the flags do not make a CF model (message meant for a person)."""


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
        utils.checkpoint.CheckpointError: weights that do not fit the model.
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
