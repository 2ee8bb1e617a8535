"""Datasets and transforms: every image a script reads comes through here (``folder``: image folders,
lists of given image files, listing; ``build``: the training and evaluation sets; ``transforms``;
``token_labels``: token labeling's label maps, augmentation and targets; ``synthetic``)."""
from .build import DATA_SETS, attach_transform, build_dataset, build_transform, check_same_classes
from .folder import DatasetError, RobustImageFolder, collate_skipping, open_image_folder, unreadable_images
from .transforms import data_config, eval_resize_size, eval_transform

__all__ = [
    'data_config', 'eval_transform', 'eval_resize_size',
    'DatasetError', 'RobustImageFolder', 'collate_skipping', 'open_image_folder', 'unreadable_images',
    'DATA_SETS', 'attach_transform', 'build_dataset', 'build_transform', 'check_same_classes',
]
