"""The library beneath the scripts, in four packages; imports flow one way, down this list: each package uses
``common`` and only packages listed before it (``tests/test_layout.py`` checks the order):

- :mod:`utils.common`: what every script has in common: errors and exit codes, atomic files, checkpoints and
  their schema, flags, logging and the entry point, output folders, signals, distributed set-up, precision,
  the model a checkpoint holds (it stands above ``models/`` and ``datasets/``, like the rest of ``utils/``);
- :mod:`utils.inference`: the evaluation loop of the inference scripts, early exit, FLOPs, CPU tuning,
  ONNX export and runtime;
- :mod:`utils.vis`: figures and plots;
- :mod:`utils.train`: training flags, builders, the step engine, the epoch loop, checkpointing, losses.
"""


def __getattr__(name: str):
    """``from utils import load_model_weights``: the name the README's "Using the models" snippet (and code
    written against it) imports; the function lives in :mod:`utils.common.checkpoint`."""
    if name == 'load_model_weights':
        from utils.common.checkpoint import load_model_weights
        return load_model_weights
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
