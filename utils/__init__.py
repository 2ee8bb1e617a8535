"""Shared utilities: checkpoint input/output (more land with the training and inference issues)."""
from .checkpoint import (
    SAFE_GLOBALS, CheckpointError, check_state_dict, extract_state_dict, load_checkpoint_file,
    load_model_weights, save_atomic,
)

__all__ = [
    'CheckpointError', 'SAFE_GLOBALS', 'check_state_dict', 'extract_state_dict', 'load_checkpoint_file',
    'load_model_weights', 'save_atomic',
]
