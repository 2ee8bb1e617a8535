"""The flags of every training run, with the released DeiT recipe's defaults (:func:`get_args_parser`,
reused by the training scripts with ``parents=[...]``)."""
from __future__ import annotations

import argparse
import logging
from typing import List, Optional, Sequence

from datasets.build import DATA_SETS
from utils.common.checkpoint import load_checkpoint_file
from utils.common.checkpoint_schema import architecture_from_checkpoint
from utils.common.errors import ConfigError
from utils.common.flags import (
    MAX_LR, default_device, default_workers, device_name, finite_float, float_in, grid_side, int_at_least,
    parse_model_kwargs, positive_int, worker_count,
)
from utils.common.model_builder import check_against_record

__all__ = ['LR_REFERENCE_BATCH', 'SCHED_STEPS', 'get_args_parser', 'flags_given', 'adopt_recorded_architecture',
           'timm_optimizer', 'timm_scheduler', 'auto_augment', 'dist_url', 'OrderedPair', 'NoiseRange']

_logger = logging.getLogger(__name__)

#: The DeiT rule: the base ``--lr`` is for this many images per step over all processes.
LR_REFERENCE_BATCH = 512.0
#: --sched-step choices: what is added to the finished epoch's index when the scheduler is stepped after it.
SCHED_STEPS = {'epoch': 0, 'next-epoch': 1}


#: Random-erasing modes timm's ``RandomErasing`` knows, and the training interpolations its transforms take.
ERASE_MODES = ('pixel', 'rand', 'const')
TRAIN_INTERPOLATIONS = ('random', 'bilinear', 'bicubic', 'nearest', 'box', 'hamming', 'lanczos')
#: Rendezvous schemes of torch.distributed's ``init_method``.
DIST_URL_SCHEMES = ('env://', 'tcp://', 'file://')
#: Longest collective timeout a flag takes, in minutes (a week): longer ones overflow torch's timer.
MAX_DIST_TIMEOUT_MINUTES = 7 * 24 * 60.0


def timm_optimizer(text: str) -> str:
    """argparse type: an optimizer name timm's ``create_optimizer_v2`` builds (``lookahead_`` prefix allowed)."""
    from timm.optim import get_optimizer_class, list_optimizers
    parts = text.lower().split('_')
    try:
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != 'lookahead'):
            raise ValueError('only a lookahead_ prefix')
        get_optimizer_class(parts[-1], bind_defaults=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f'timm has no optimizer {text!r} (e.g. adamw, sgd, lamb; '
                                         f'timm.optim.list_optimizers() names all {len(list_optimizers())}; '
                                         'lookahead_NAME wraps one)') from None
    except ImportError as e:
        raise argparse.ArgumentTypeError(f'optimizer {text!r} needs a package that is not installed: {e}') from None
    return text


def timm_scheduler(text: str) -> str:
    """argparse type: a scheduler name timm's ``create_scheduler_v2`` builds."""
    import torch
    from timm.scheduler import create_scheduler_v2
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        create_scheduler_v2(probe, sched=text, num_epochs=2)
    except (ValueError, AssertionError, TypeError, KeyError):
        raise argparse.ArgumentTypeError(
            f'timm has no scheduler {text!r}: cosine, tanh, step, multistep, plateau, poly, constant, wsd, rsqrt '
            'or none') from None
    return text


def auto_augment(text: str) -> str:
    """argparse type: a policy timm's training transform builds (``rand-m9-mstd0.5-inc1``, ``augmix-m5-w4-d2``,
    ``original``, ``v0``, ``3a``...), or ``none``."""
    if text.lower() == 'none' or not text:
        return text
    from timm.data import create_transform
    try:
        create_transform(32, is_training=True, auto_augment=text)
    except Exception as e:  # timm's parsers raise assertions, KeyErrors and ValueErrors on a bad policy
        raise argparse.ArgumentTypeError(f'timm cannot build the augmentation policy {text!r} '
                                         f'({type(e).__name__}: {str(e).strip() or "bad policy"}); e.g. '
                                         'rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, original, v0, 3a, none') from None
    return text


def dist_url(text: str) -> str:
    """argparse type: a torch.distributed rendezvous URL (``env://``, ``tcp://HOST:PORT``, ``file:///PATH``)."""
    if not text.startswith(DIST_URL_SCHEMES) or text in ('tcp://', 'file://'):
        raise argparse.ArgumentTypeError(f'expected env://, tcp://HOST:PORT or file:///PATH, got {text!r}')
    return text


class OrderedPair(argparse.Action):
    """``nargs=2`` values that must be increasing (``--cutmix-minmax MIN MAX``)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values[0] >= values[1]:
            raise argparse.ArgumentError(self, f'MIN must be below MAX, got {values[0]:g} {values[1]:g}')
        setattr(namespace, self.dest, list(values))


class NoiseRange(argparse.Action):
    """``--lr-noise START [END]``: timm's noise range, one or two increasing non-negative epochs (or
    fractions of the run); a third value was silently ignored."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) > 2:
            raise argparse.ArgumentError(self, f'takes START or START END, got {len(values)} values')
        if any(v < 0 for v in values) or (len(values) == 2 and values[0] >= values[1]):
            raise argparse.ArgumentError(self, 'START [END]: non-negative, END above START, got '
                                         f'{" ".join(f"{v:g}" for v in values)}')
        setattr(namespace, self.dest, list(values))


def get_args_parser(add_help: bool = False) -> argparse.ArgumentParser:
    """The flags of every training run: the DeiT recipe's, with the released main_deit.py's defaults, plus
    CF-ViT's. ``main_deit.py`` takes them as they are; ``main_lvvit.py`` adds TokenLabeling's spellings and
    LV-ViT defaults. Reusable with ``parents=[get_args_parser()]``."""
    parser = argparse.ArgumentParser('CF-DeiT training and evaluation', add_help=add_help)
    for add_flags in (_add_run_flags, _add_model_flags, _add_optimizer_flags,
                      _add_augmentation_flags, _add_weights_flags, _add_data_flags, _add_distributed_flags):
        add_flags(parser)
    return parser


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The 'run' group: epochs, seed, output folder, device and precision."""
    g = parser.add_argument_group('run')
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument('--batch-size', '--batch_size', type=positive_int, default=64, help='images per process and step')
    g.add_argument('--epochs', type=int_at_least(1), default=300)
    g.add_argument('--start_epoch', '--start-epoch', type=int_at_least(0), default=0,
                   help='first epoch (set by --resume)')
    g.add_argument('--stop-at-epoch', type=int_at_least(0), default=None,
                   help='end this run before this 0-based epoch, as if interrupted (the schedule still spans '
                        '--epochs); continue later with --resume')
    g.add_argument('--eval', action='store_true', help='only evaluate (both stages) and exit')
    g.add_argument('--dist-eval', '--dist_eval', action='store_true',
                   help='split evaluation over the processes (else every process evaluates everything)')
    g.add_argument('--seed', type=int, default=0)
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic algorithms (slower on GPU); CPU runs are deterministic anyway')
    g.add_argument('--output_dir', '--output-dir', '--output', dest='output_dir', default='',
                   help='folder for checkpoints, log.txt and TensorBoard events; empty: write nothing')
    g.add_argument('--device', type=device_name, default=default_device(), help='cuda (default when available) or cpu')
    g.add_argument('--print-freq', type=int_at_least(1), default=50, help='log a line every this many steps')
    g.add_argument('--amp', action=bool_flag, default=None,
                   help='mixed precision through torch.autocast; default on for CUDA (as the release trained), '
                        'off for CPU (bfloat16 is emulated, hence slow, on CPUs without native support)')
    g.add_argument('--apex-amp', '--apex_amp', dest='amp', action='store_true', default=None,
                   help='the released scripts\' flag; means native --amp')
    g.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), default=None,
                   help='autocast dtype; default float16 (with a gradient scaler) on CUDA, bfloat16 on CPU')
    g.add_argument('--tf32', action=bool_flag, default=None,
                   help='CUDA float32: --tf32 runs matmuls and cuDNN convolutions in TF32 (as the release\'s PyTorch '
                        '1.10 did on Ampere and newer), --no-tf32 in IEEE float32; default: PyTorch\'s (matmuls '
                        'IEEE, convolutions TF32). The log says which')


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    """The 'model' group: the model and its EMA."""
    g = parser.add_argument_group('model')
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument('--model', default='cf_deit_small', help='a registered CF-DeiT model (cf_deit_small, cf_deit_tiny)')
    g.add_argument('--coarse-stage-size', '--coarse_stage_size', type=grid_side, default=7,
                   help='coarse grid side g (7 or 9 for the released models); fine images are 32*g pixels')
    g.add_argument('--embed-dim', type=int_at_least(1), default=None, help='override the width (small CPU experiments)')
    g.add_argument('--depth', type=int_at_least(1), default=None, help='override the number of blocks')
    g.add_argument('--num-heads', type=int_at_least(1), default=None, help='override the number of heads')
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='more timm.create_model overrides, values as Python literals '
                        '(e.g. fine_pos_embed_without_selection=True)')
    g.add_argument('--grad-checkpointing', action='store_true',
                   help='recompute the blocks of both stages in the backward pass: less memory, same gradients')
    g.add_argument('--drop', type=float_in(0, 1, high_open=True), default=0.0, help='dropout rate')
    g.add_argument('--drop-path', '--drop_path', type=float_in(0, 1, high_open=True), default=0.1,
                   help='stochastic depth rate')
    g.add_argument('--selection-start-epoch', type=int_at_least(-1), default=200,
                   help='informative selection is off while the 0-based epoch is <= this, on afterwards '
                        '(the paper: 200)')
    g.add_argument('--model-ema', action=bool_flag, default=True, help='keep an EMA of the weights')
    g.add_argument('--model-ema-decay', type=float_in(0, 1), default=0.99996)
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA on the CPU')


def _add_optimizer_flags(parser: argparse.ArgumentParser) -> None:
    """The 'optimizer and schedule' group: the optimizer and the learning-rate schedule."""
    g = parser.add_argument_group('optimizer and schedule')
    g.add_argument('--opt', type=timm_optimizer, default='adamw', help='timm optimizer name')
    g.add_argument('--opt-eps', type=float_in(0, low_open=True), default=1e-8)
    g.add_argument('--opt-betas', type=float_in(0, 1, high_open=True), nargs=2, default=None, metavar=('BETA1', 'BETA2'))
    g.add_argument('--momentum', type=float_in(0, 1), default=0.9)
    g.add_argument('--weight-decay', type=float_in(0), default=0.05)
    g.add_argument('--exempt-pos-embed-from-wd', action='store_true',
                   help='exempt pos_embed_list.0/.1 from weight decay (the release decayed them; see '
                        'CFVisionTransformer.no_weight_decay)')
    g.add_argument('--clip-grad', type=float_in(0, low_open=True), default=None,
                   help='clip gradients to this norm (default: off)')
    g.add_argument('--clip-mode', choices=('norm', 'value'), default='norm')
    g.add_argument('--sched', type=timm_scheduler, default='cosine', help='timm scheduler name')
    g.add_argument('--sched-step', choices=SCHED_STEPS, default='epoch',
                   help="what the per-epoch scheduler is stepped with after epoch E: 'epoch' = step(E), the "
                        "released main_deit.py (epochs 0 and 1 at --warmup-lr, the peak one epoch later); "
                        "'next-epoch' = step(E + 1), timm's train.py and the released main_lvvit.py")
    g.add_argument('--lr', type=float_in(0, MAX_LR, low_open=True), default=5e-4,
                   help=f'learning rate at {int(LR_REFERENCE_BATCH)} images per step')
    g.add_argument('--unscale-lr', action='store_true', help='use --lr as is, without the linear scaling rule')
    g.add_argument('--lr-noise', type=finite_float, nargs='+', default=None, action=NoiseRange,
                   metavar=('START', 'END'), help='epochs (or fractions of the run) of learning-rate noise')
    g.add_argument('--lr-noise-pct', type=float_in(0), default=0.67)
    g.add_argument('--lr-noise-std', type=float_in(0), default=1.0)
    g.add_argument('--warmup-lr', type=float_in(0, MAX_LR), default=1e-6)
    g.add_argument('--min-lr', type=float_in(0, MAX_LR), default=1e-5)
    g.add_argument('--decay-epochs', type=float_in(0, low_open=True), default=30)
    g.add_argument('--warmup-epochs', type=int_at_least(0), default=5)
    g.add_argument('--cooldown-epochs', type=int_at_least(0), default=10)
    g.add_argument('--patience-epochs', type=int_at_least(0), default=10)
    g.add_argument('--decay-rate', '--dr', type=float_in(0), default=0.1)


def _add_augmentation_flags(parser: argparse.ArgumentParser) -> None:
    """The 'augmentation' group: augmentation, label smoothing, mixup and cutmix."""
    g = parser.add_argument_group('augmentation')
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument('--color-jitter', type=float_in(0), default=0.4, help='(unused while --aa is on)')
    g.add_argument('--aa', type=auto_augment, default='rand-m9-mstd0.5-inc1', help='timm auto-augment policy, "none" for none')
    g.add_argument('--smoothing', type=float_in(0, 1, high_open=True), default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', choices=TRAIN_INTERPOLATIONS, default='bicubic')
    g.add_argument('--crop-scale', type=float_in(0, 1, low_open=True), nargs=2, default=(0.08, 1.0),
                   metavar=('MIN', 'MAX'),
                   help='area range of the random-resized crop (timm default 0.08 1.0)')
    g.add_argument('--repeated-aug', action=bool_flag, default=True,
                   help='repeated augmentation (timm RepeatAugSampler, 3 repeats)')
    g.add_argument('--reprob', type=float_in(0, 1), default=0.25, help='random erasing probability')
    g.add_argument('--remode', choices=ERASE_MODES, default='pixel', help='random erasing mode')
    g.add_argument('--recount', type=int_at_least(1), default=1, help='random erasing count')
    g.add_argument('--mixup', type=float_in(0), default=0.8, help='mixup alpha (0: off)')
    g.add_argument('--cutmix', type=float_in(0), default=1.0, help='cutmix alpha (0: off)')
    g.add_argument('--cutmix-minmax', type=float_in(0, 1), nargs=2, default=None, action=OrderedPair,
                   metavar=('MIN', 'MAX'))
    g.add_argument('--mixup-prob', type=float_in(0, 1), default=1.0)
    g.add_argument('--mixup-switch-prob', type=float_in(0, 1), default=0.5)
    g.add_argument('--mixup-mode', choices=('batch', 'pair', 'elem'), default='batch')


def _add_weights_flags(parser: argparse.ArgumentParser) -> None:
    """The 'weights' group: the starting weights, resuming and checkpoints."""
    g = parser.add_argument_group('weights')
    g.add_argument('--finetune', default='', help='start from these weights (head and grids adapted; a plain '
                   'timm ViT checkpoint is converted to the CF model)')
    g.add_argument('--pretrained', nargs='?', const=True, default=None, metavar='FILE',
                   help="start from the weights of --model's pretrained tag (e.g. --model "
                        "cf_deit_small_patch16_224.fb_in1k; timm's cache or the Hub), or from FILE (a plain timm ViT's "
                        'weights, converted, or a CF checkpoint, e.g. a released one); a head of another class '
                        'count is re-initialised')
    g.add_argument('--resume', default='',
                   help="continue from this checkpoint (or evaluate it with --eval); 'auto': from the output "
                        "folder's furthest readable checkpoint (checkpoint_step.pth, checkpoint.pth, "
                        "best_checkpoint.pth), or a new run when it has none: one command to resubmit")
    g.add_argument('--save-interval-steps', type=int, default=0, metavar='N',
                   help='also write checkpoint_step.pth every N optimizer steps (atomically), for an exact '
                        'mid-epoch resume after preemption; 0: only at the end of each epoch')
    g.add_argument('--unsafe-load', action='store_true',
                   help='allow full unpickling of a checkpoint you trust (never needed for ours)')


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    """The 'data' group: the data set and its loader."""
    g = parser.add_argument_group('data')
    bool_flag = argparse.BooleanOptionalAction
    g.add_argument('--data-path', '--data_path', default=None, help='dataset root')
    g.add_argument('--data-set', '--data_set', default='IMNET', type=str.upper, choices=DATA_SETS,
                   help="IMNET (the released name): any ImageFolder tree, --data-path holding train/<class>/ and "
                        "val/<class>/; CIFAR/CIFAR100, INAT/INAT19: those data sets' own layouts")
    g.add_argument('--inat-category', default='name',
                   choices=('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'))
    g.add_argument('--subset', type=int_at_least(1), default=None,
                   help='debug: use at most this many images of each split, evenly spaced')
    g.add_argument('--num_workers', '--num-workers', type=worker_count, default=default_workers(10),
                   help='loader processes per training process (default: 10 as released, capped by the cores)')
    g.add_argument('--pin-mem', action=bool_flag, default=True, help='pin loader memory (CUDA only)')


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
    """The 'distributed' group: the distributed launch, and the tests' hidden flags."""
    g = parser.add_argument_group('distributed')
    g.add_argument('--world_size', '--world-size', type=int_at_least(1), default=1,
                   help='number of processes (read from the launcher when it sets WORLD_SIZE)')
    g.add_argument('--dist_url', '--dist-url', type=dist_url, default='env://')
    g.add_argument('--dist-timeout', type=float_in(0, MAX_DIST_TIMEOUT_MINUTES, low_open=True), default=30.0,
                   metavar='MINUTES',
                   help='process-group timeout of a collective (a process that hangs without failing)')
    g.add_argument('--local_rank', '--local-rank', type=int, default=None,
                   help='set by torch.distributed.launch (LOCAL_RANK in the environment wins)')
    # Tests only: every process writes a digest of its final weights to PATH.rank<r>.json.
    g.add_argument('--debug-weights-digest', default=None, help=argparse.SUPPRESS)
    # Tests only: RANK:EPOCH:STEP:kill|data, a fault on the first attempt (utils.train.loop.FaultInjection).
    g.add_argument('--debug-fault', default=None, help=argparse.SUPPRESS)


def flags_given(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> frozenset:
    """The ``dest`` of every flag the command line ``argv`` sets itself (not left at its default)."""
    saved = [(action, action.default) for action in parser._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action, default in saved:
            action.default = default
    return frozenset(vars(given))


def adopt_recorded_architecture(args: argparse.Namespace, given: Optional[frozenset]) -> None:
    """``--eval --resume FILE``: build the architecture a training checkpoint records (``args``: model, grid,
    size overrides) wherever the command line does not name one itself (``given``: :func:`flags_given`;
    None adopts nothing). Released checkpoints record nothing: the flags and their defaults decide."""
    if given is None or not (args.eval and args.resume and args.resume != 'auto'):
        return
    recorded = architecture_from_checkpoint(load_checkpoint_file(args.resume, unsafe=args.unsafe_load))
    if not recorded.get('model'):
        return
    if 'model' in given and args.model.split('.', 1)[0] != recorded['model'].split('.', 1)[0]:
        return  # another model asked for by name (a pretrained tag names the same one): its sizes are the flags' too
    taken: List[str] = []
    for dest in ('model', 'coarse_stage_size'):
        if dest not in given and recorded.get(dest) is not None and getattr(args, dest) != recorded[dest]:
            setattr(args, dest, recorded[dest])
            taken.append(f'--{dest.replace("_", "-")} {recorded[dest]}')
    kwargs = dict(recorded.get('kwargs', {}))
    for dest in ('embed_dim', 'depth', 'num_heads'):
        value = kwargs.pop(dest, None)
        if value is not None and dest not in given and getattr(args, dest) != value:
            setattr(args, dest, value)
            taken.append(f'--{dest.replace("_", "-")} {value}')
    kwargs = {k: v for k, v in kwargs.items() if k not in ('drop_rate', 'drop_path_rate')}  # training only
    if 'model_kwargs' in given:  # the record, and the flags where they may differ from it (else one line)
        try:
            explicit = parse_model_kwargs(args.model_kwargs)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_against_record(kwargs, explicit, f'--resume {args.resume}', evaluation=True, error=ConfigError)
        kwargs.update(explicit)
    if kwargs and [f'{k}={v!r}' for k, v in kwargs.items()] != list(args.model_kwargs):
        args.model_kwargs = [f'{k}={v!r}' for k, v in kwargs.items()]
        taken.append('--model-kwargs ' + ' '.join(args.model_kwargs))
    if taken:
        _logger.info('--eval: %s records its architecture; using %s', args.resume, ' '.join(taken))
