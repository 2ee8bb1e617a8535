"""Shared utilities: checkpoint input/output, early-exit evaluation (more in the submodules)."""
from .checkpoint import (
    SAFE_GLOBALS, CheckpointError, atomic_file, check_state_dict, extract_state_dict, load_checkpoint_file,
    load_model_weights, save_atomic, write_json_atomic,
)
from .early_exit import DEFAULT_THRESHOLDS, budgeted_sweep, dynamic_evaluate, stage_accuracy, sweep_from_predictions

__all__ = [
    'CheckpointError', 'SAFE_GLOBALS', 'check_state_dict', 'extract_state_dict', 'load_checkpoint_file',
    'load_model_weights', 'save_atomic', 'atomic_file', 'write_json_atomic',
    'DEFAULT_THRESHOLDS', 'dynamic_evaluate', 'budgeted_sweep', 'sweep_from_predictions', 'stage_accuracy',
]
