"""Run one of timm's own scripts (``validate.py``, ``benchmark.py``, ``train.py``, ...) with the CF models registered.

    python run_timm_script.py SCRIPT.py [the script's arguments ...]

    python run_timm_script.py validate.py DATA --model cf_deit_small --checkpoint CKPT -b 64
    python run_timm_script.py benchmark.py --model cf_deit_tiny --device cpu --bench inference -b 4 --num-bench-iter 10

timm's scripts are not in its wheel: take them from timm's repository at the installed version
(https://github.com/huggingface/pytorch-image-models/tree/v1.0.31 for the pinned timm==1.0.31). This
runner imports ``models`` (which registers cf_deit_tiny, cf_deit_small, cf_lvvit_tiny and
cf_lvvit_small with timm) and then runs SCRIPT unmodified as ``__main__`` with the arguments after
it (``runpy.run_path``), so ``timm.create_model`` inside it knows the CF models. The models' defaults
are the 7x7 coarse grid: a checkpoint of another grid g needs ``--model-kwargs coarse_stage_size=g``,
which this runner checks before the script starts.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import List, Optional, Sequence

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # nothing downloads at run time

EXIT_BAD_INPUT = 2
USAGE = 'usage: run_timm_script.py SCRIPT.py [ARGS ...]  (SCRIPT: one of timm\'s scripts, e.g. validate.py)'
#: --model-kwargs keys that set the grid themselves.
GRID_KWARGS = ('coarse_stage_size=', 'img_size_list=', 'img_size=')


def _flag_values(argv: Sequence[str], flag: str) -> List[str]:
    """The values of ``flag`` in ``argv`` (``--flag V``, ``--flag=V``, and every item of a ``nargs='*'`` flag)."""
    values: List[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith(flag + '='):
            values.append(arg.split('=', 1)[1])
        elif arg == flag:
            for item in argv[i + 1:]:
                if item.startswith('-'):
                    break
                values.append(item)
    return values


def grid_problem(argv: Sequence[str]) -> Optional[str]:
    """A one-line message when ``--checkpoint`` holds a CF model of another coarse grid than the one the
    command builds (7x7 unless ``--model-kwargs coarse_stage_size=g``), else None."""
    checkpoints = _flag_values(argv, '--checkpoint') or _flag_values(argv, '--initial-checkpoint')
    kwargs = _flag_values(argv, '--model-kwargs')
    if not checkpoints or any(k.startswith(GRID_KWARGS) for k in kwargs):
        return None
    from utils.core.checkpoint import extract_state_dict, load_checkpoint_file
    from utils.core.errors import CheckpointError
    try:
        state_dict = extract_state_dict(load_checkpoint_file(checkpoints[0]))
    except CheckpointError as e:
        return str(e)
    pos = state_dict.get('pos_embed_list.0')
    if pos is None or pos.dim() != 3:
        return None  # not a CF checkpoint: the script says what it makes of it
    g = round((pos.shape[1] - 1) ** 0.5)
    if g * g + 1 == pos.shape[1] and g != 7:
        return (f'{checkpoints[0]} holds a {g}x{g} coarse grid, the models default to 7x7: add '
                f'--model-kwargs coarse_stage_size={g}')
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__ if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_BAD_INPUT
    script = Path(argv[0])
    if not script.is_file():
        print(f'run_timm_script.py: error: {script} not found: fetch timm\'s scripts from its repository at the '
              f'installed version (https://github.com/huggingface/pytorch-image-models/tree/v1.0.31)', file=sys.stderr)
        return EXIT_BAD_INPUT
    if script.suffix != '.py':
        print(f'run_timm_script.py: error: {script} is not a Python script', file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = grid_problem(argv[1:])
    if problem:
        print(f'run_timm_script.py: error: {problem}', file=sys.stderr)
        return EXIT_BAD_INPUT
    import models  # noqa: F401  (registers the CF models with timm)
    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as when the script runs by itself
    runpy.run_path(str(script), run_name='__main__')
    return 0


if __name__ == '__main__':
    sys.exit(main())
