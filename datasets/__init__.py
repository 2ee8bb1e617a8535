"""Datasets and transforms (the training and token-label datasets land with their issues)."""
from .transforms import data_config, eval_resize_size, eval_transform

__all__ = ['data_config', 'eval_transform', 'eval_resize_size']
