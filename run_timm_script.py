"""Run one of timm's own scripts (``validate.py``, ``benchmark.py``, ``train.py``, ...) with the CF models registered.

    python run_timm_script.py SCRIPT.py [the script's arguments ...]

    python run_timm_script.py validate.py DATA --model cf_deit_small --checkpoint CKPT -b 64
    python run_timm_script.py benchmark.py --model cf_deit_tiny --device cpu --bench inference -b 4 --num-bench-iter 10

timm's scripts are in neither its wheel nor its sdist: take them from timm's repository at the installed
version (https://github.com/huggingface/pytorch-image-models/tree/v1.0.31 for the pinned timm==1.0.31;
docs/timm.md says how to carry them to a machine without network). This runner imports ``models`` (which
registers cf_deit_tiny, cf_deit_small, cf_lvvit_tiny and cf_lvvit_small with timm) and then runs SCRIPT
unmodified as ``__main__`` with the arguments after it (``runpy.run_path``), so ``timm.create_model``
inside it knows the CF models.

Before the script starts, a CF checkpoint given with ``--checkpoint`` (``--initial-checkpoint``) is
checked against the model the command builds (``--model``, ``--model-kwargs``, ``--num-classes``), the
flags read as the script's own argparse reads them (abbreviations, the last of a repeated flag). When
they do not fit, one line names every flag the checkpoint needs (its model, grid, sizes and class
count: what a training checkpoint records, or what the weights show) instead of timm's traceback.
"""
from __future__ import annotations

import argparse
import ast
import runpy
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import utils.common.startup  # noqa: F401  (first, before timm: HF_HUB_OFFLINE, nothing downloads at run time)

EXIT_BAD_INPUT = 2
USAGE = 'usage: run_timm_script.py SCRIPT.py [ARGS ...]  (SCRIPT: one of timm\'s scripts, e.g. validate.py)'
#: The flags of timm's scripts this runner reads (dest: option strings when the script does not define them).
FLAGS_READ = {
    'checkpoint': ('--checkpoint',),
    'initial_checkpoint': ('--initial-checkpoint',),
    'model': ('--model', '-m'),
    'model_kwargs': ('--model-kwargs',),
    'num_classes': ('--num-classes',),
}
_DEST_OF = {option: dest for dest, options in FLAGS_READ.items() for option in options}
#: argparse actions that take no value.
_NO_VALUE = {'store_true', 'store_false', 'store_const', 'append_const', 'count', 'help', 'version'}


class _ParseError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # never exit: the script reports its own usage errors
        raise _ParseError(message)


def _option_calls(script: Path) -> List[Tuple[List[str], Dict[str, Any]]]:
    """The option strings and the constant keywords of every ``*.add_argument('--x', ...)`` in ``script``."""
    try:
        tree = ast.parse(script.read_text(encoding='utf-8', errors='replace'))
    except (OSError, SyntaxError, ValueError):
        return []
    calls = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'add_argument'):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if not names or not all(n.startswith('-') for n in names):
            continue  # a positional argument: unknown positionals are left aside anyway
        keywords = {}
        for k in node.keywords:
            if isinstance(k.value, ast.Constant):
                keywords[k.arg] = k.value.value
            elif isinstance(k.value, ast.Attribute):  # argparse.REMAINDER, argparse.BooleanOptionalAction
                keywords[k.arg] = k.value.attr
            elif isinstance(k.value, ast.Name):  # a custom action class (timm's ParseKwargs)
                keywords[k.arg] = k.value.id
        calls.append((names, keywords))
    return calls


def flag_parser(script: Path) -> argparse.ArgumentParser:
    """A parser that reads the command line as ``script``'s own argparse parser does: every option string the
    script defines (so an abbreviation means what it means there, or is ambiguous there too), with the same
    number of values; :data:`FLAGS_READ` under their own ``dest``. A script defining none of them (one this
    runner cannot read) gets :data:`FLAGS_READ` alone."""
    parser = _Parser(add_help=False, allow_abbrev=True)
    calls = _option_calls(script)
    defined = set()
    for i, (names, keywords) in enumerate(calls):
        if any(n in defined for n in names):
            continue  # argparse would refuse the script's parser; leave the duplicate aside
        dest = next((_DEST_OF[n] for n in names if n in _DEST_OF), None)
        action, nargs = keywords.get('action'), keywords.get('nargs')
        try:
            if dest == 'model_kwargs':
                parser.add_argument(*names, dest=dest, nargs='*', default=None)
            elif dest is not None:
                parser.add_argument(*names, dest=dest, default=None)
            elif action == 'BooleanOptionalAction':
                parser.add_argument(*names, dest=f'_{i}', action=argparse.BooleanOptionalAction)
            elif action in _NO_VALUE:
                parser.add_argument(*names, dest=f'_{i}', action='count')
            else:
                nargs = '*' if nargs == 'REMAINDER' else nargs
                parser.add_argument(*names, dest=f'_{i}', nargs=nargs if nargs in ('?', '*', '+') or
                                    isinstance(nargs, int) else None)
        except (argparse.ArgumentError, ValueError, TypeError):
            continue
        defined.update(names)
    if not any(d in defined for d in _DEST_OF):
        for dest, options in FLAGS_READ.items():
            parser.add_argument(*options, dest=dest, nargs='*' if dest == 'model_kwargs' else None, default=None)
    for dest in FLAGS_READ:  # flags the script does not have read as None
        parser.set_defaults(**{dest: parser.get_default(dest)})
    return parser


def _timm_kwargs(items: Sequence[str]) -> Optional[Dict[str, Any]]:
    """``--model-kwargs`` as timm's ``ParseKwargs`` reads them (None where timm would fail itself)."""
    kwargs: Dict[str, Any] = {}
    for item in items:
        parts = item.split('=')
        if len(parts) != 2:
            return None
        key, value = parts
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = str(value)
    return kwargs


def _value(v: Any) -> str:
    return repr(v).replace(' ', '') if not isinstance(v, str) else v


def _build_on_meta(name: str, kwargs: Dict[str, Any]):
    """The model ``timm.create_model(name, **kwargs)`` builds, without memory for its weights (None if it cannot)."""
    import timm
    import torch
    try:
        with torch.device('meta'):
            return timm.create_model(name, **{k: v for k, v in kwargs.items() if v is not None})
    except Exception:  # noqa: BLE001  (an unknown name or impossible sizes: the script says so itself)
        return None


def checkpoint_problem(script: Path, argv: Sequence[str]) -> Optional[str]:
    """A one-line message when the CF checkpoint of ``--checkpoint`` (``--initial-checkpoint``) does not fit the
    model the command builds, naming every flag it needs; else None (also for checkpoints that are not CF
    models and commands the script will refuse itself)."""
    try:
        args, _ = flag_parser(script).parse_known_args(list(argv))
    except _ParseError:
        return None  # ambiguous or incomplete flags: the script's own argparse says what is wrong
    path = args.checkpoint or args.initial_checkpoint
    if not path:
        return None
    from utils.common.checkpoint import check_state_dict, extract_state_dict, load_checkpoint_file
    from utils.common.checkpoint_schema import architecture_from_checkpoint
    from utils.common.errors import CheckpointError
    try:
        checkpoint = load_checkpoint_file(path)
        state_dict = extract_state_dict(checkpoint)
        recorded = architecture_from_checkpoint(checkpoint) if isinstance(checkpoint, dict) else {}
    except CheckpointError as e:
        return str(e)
    pos, head = state_dict.get('pos_embed_list.0'), state_dict.get('head.weight')
    if pos is None or pos.dim() != 3 or head is None:
        return None  # not a CF checkpoint: the script says what it makes of it
    g = round((pos.shape[1] - 1) ** 0.5)
    if g * g + 1 != pos.shape[1]:
        return None
    given = _timm_kwargs(args.model_kwargs or [])
    if given is None:
        return None
    import models  # noqa: F401  (registers the CF models with timm)
    num_classes = int(head.shape[0])
    command_name = args.model
    command_model = _build_on_meta(command_name, {'num_classes': _int_or_none(args.num_classes), **given}) \
        if command_name else None
    if command_model is not None and check_state_dict(command_model, state_dict) is None and \
            _heads(command_model) == recorded.get('kwargs', {}).get('num_heads', _heads(command_model)):
        return None  # it fits (and has the recorded number of heads, which the weights' shapes do not show)
    if command_name and command_model is None and not recorded.get('model'):
        return None  # a model timm cannot build: the script's own error says why

    # what the checkpoint needs: its recorded architecture, else what its weights show
    name = recorded.get('model') or command_name
    needed: Dict[str, Any] = {}
    if recorded:
        needed.update(recorded.get('kwargs', {}))
        how = 'recorded in the checkpoint'
    else:
        width, depth = int(pos.shape[2]), len({k.split('.')[1] for k in state_dict if k.startswith('blocks.')})
        default = _build_on_meta(name, {'coarse_stage_size': g}) if name else None
        if default is None or int(default.pos_embed_list[0].shape[2]) != width:
            needed['embed_dim'] = width
        if default is None or len(default.blocks) != depth:
            needed['depth'] = depth
        if 'embed_dim' in needed:
            needed['num_heads'] = given.get('num_heads', 'H')  # not in the weights: the user knows it
        how = 'read from its weights'
    for key in ('num_classes', 'img_size_list', 'img_size'):
        needed.pop(key, None)
    needed['coarse_stage_size'] = g
    kwargs = {**{k: v for k, v in given.items() if k not in needed and k not in ('img_size_list', 'img_size',
                                                                               'num_classes')}, **needed}
    shown = ('embed_dim', 'depth', 'num_heads') if recorded else ('embed_dim', 'depth')  # the weights show no heads
    facts = [f'a {g}x{g} coarse grid'] + [f'{k} {needed[k]}' for k in shown if k in needed] + [f'{num_classes} classes']
    fix = []
    if name != command_name:
        fix.append(f'--model {name}' if name else '--model MODEL (the CF model it was trained as)')
    fix.append('--model-kwargs ' + ' '.join(f'{k}={_value(v)}' for k, v in kwargs.items()))
    if _int_or_none(args.num_classes) != num_classes:
        fix.append(f'--num-classes {num_classes}')
    notes = ''
    if args.model_kwargs:
        notes += ' (in place of the command\'s --model-kwargs: timm keeps only the last)'
    if needed.get('num_heads') == 'H':
        notes += ' (H: its number of heads, which the weights do not show)'
    return (f'{path} holds {name or "a CF model"} ({", ".join(facts)}; {how}), which the model this command '
            f'builds does not fit: run it with {" ".join(fix)}{notes}')


def _heads(model: Any) -> Optional[int]:
    blocks = getattr(model, 'blocks', None)
    return getattr(getattr(blocks[0], 'attn', None), 'num_heads', None) if blocks is not None and len(blocks) else None


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(__doc__ if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else EXIT_BAD_INPUT
    script = Path(argv[0])
    if not script.is_file():
        print(f'run_timm_script.py: error: {script} not found: timm\'s scripts are in neither its wheel nor its '
              f'sdist; take them from its repository at the installed version '
              f'(https://github.com/huggingface/pytorch-image-models/tree/v1.0.31; offline: docs/timm.md)',
              file=sys.stderr)
        return EXIT_BAD_INPUT
    if script.suffix != '.py':
        print(f'run_timm_script.py: error: {script} is not a Python script', file=sys.stderr)
        return EXIT_BAD_INPUT
    problem = checkpoint_problem(script, argv[1:])
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
