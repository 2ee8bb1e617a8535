"""Shared utilities: checkpoint input/output, early-exit evaluation (re-exported here), and in the submodules
the training set-up and builders (``train_setup``), the trainers' epoch loop (``train_loop``), one epoch and
one evaluation pass (``engine``), losses, token labeling, FLOPs, inference loops, distributed set-up,
small script helpers (``misc``), plots and the visualization figures."""
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
