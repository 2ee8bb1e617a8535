"""Token labeling's data (SPEC 7): label maps, the augmentation they follow, and the dense targets made
from them. One module per job, in the order a training image meets them:

- :mod:`~datasets.token_labels.maps`: the label-map files (``<label_root>/<class folder>/<image stem>.pt``,
  a tensor (2, K, H, W) of the teacher's top-K scores and their class indices), read, checked, and all
  checked before training starts (:class:`~datasets.token_labels.maps.TokenLabelError`);
- :mod:`~datasets.token_labels.augment`: timm's training augmentation with its geometry recorded: the
  crop box, the flip, the affine map of geometric RandAugment ops (:class:`TokenLabelTransform`);
- :mod:`~datasets.token_labels.dataset`: :class:`TokenLabelDataset`, each image with its label map
  and its records: ``(image, (class index, label map (2, K, H, W), box (4,), flip, theta (2, 3)))``;
  only the small top-K map crosses the loader's process boundary;
- :mod:`~datasets.token_labels.targets`: on the device, the records become soft targets
  (:class:`TokenLabelTargets`): dense score maps RoI-aligned to the crop, flipped and warped as the
  image was, softmaxed and smoothed; the released crop and smoothing are kept behind switches;
- :mod:`~datasets.token_labels.mixup`: timm's mixup/cutmix applied to images and these targets alike
  (:class:`TokenLabelMixup`);
- :mod:`~datasets.token_labels.batch`: the engine's batch transforms of CF-LV-ViT training, with label
  maps (:class:`TokenLabelBatch`: targets, then mixup) and without (:class:`ClassLabelBatch`).

The loss that consumes the targets (with MixToken) is :mod:`utils.train.token_label_loss`;
``make_token_labels.py`` writes the maps.
"""
