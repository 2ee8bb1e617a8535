"""Benchmark 9: does coarse-to-fine pay? CF-DeiT against plain DeiTs at 224, 160 and 128 px.

The pre-registered protocol is ``benchmarks/results/tradeoff/PROTOCOL.md`` (committed before any run).
Four models are trained from scratch on imagenette224 with ONE recipe and the same epochs:

    cf        CF-DeiT, D=96, 6 blocks, 3 heads, patch 16, 7x7 coarse on 112 px -> 14x14 fine on 224 px
    plain224  plain DeiT of the same width and depth at 224 px (14x14 patches)
    plain160  the same at 160 px (10x10)
    plain128  the same at 128 px (8x8)

    python benchmarks/bench_tradeoff.py train cf          # one run; resumes (--resume auto) when cut
    python benchmarks/bench_tradeoff.py train plain224    # ... one per run, one torch thread each
    python benchmarks/bench_tradeoff.py evaluate          # per-image outputs of the final checkpoints
    python benchmarks/bench_tradeoff.py report            # budgets, intervals, verdicts, figures, JSON

Checkpoints stay in --work-dir (``output/tradeoff``, not in git); the training logs, per-image outputs,
final weights (weights only), figures and ``tradeoff.json`` go to ``benchmarks/results/tradeoff/``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch

from common import RESULTS, ROOT, epoch_seconds, machine, portable_args

from datasets.build import build_dataset  # noqa: E402
from datasets.transforms import eval_transform  # noqa: E402
import models  # noqa: E402,F401  (registers the CF models; common put the repository on sys.path)
from models.baseline import create_baseline  # noqa: E402
from utils.common.atomic import write_json_atomic  # noqa: E402
from utils.common.checkpoint import extract_state_dict, load_checkpoint_file, load_model_weights  # noqa: E402
from utils.common.model_builder import build_from_checkpoint  # noqa: E402
from utils.inference.compare import accuracy_interval, bootstrap_weights, compare_paired  # noqa: E402
from utils.inference.early_exit import threshold_for_budget  # noqa: E402
from utils.inference.flops import count_gflops, stage_gflops  # noqa: E402

OUT = RESULTS / 'tradeoff'
EPOCHS = 40
#: selection on for the last half: epochs SELECTION_START+1 .. EPOCHS-1 (0-based)
SELECTION_START = 19
MODEL = ['--embed-dim', '96', '--depth', '6', '--num-heads', '3']
#: the one recipe, for all four runs (PROTOCOL.md, "Recipe")
RECIPE = ['--epochs', str(EPOCHS), '--batch-size', '64', '--lr', '1e-3', '--unscale-lr',
          '--sched-step', 'next-epoch', '--warmup-epochs', '2', '--warmup-lr', '1e-4', '--min-lr', '1e-5',
          '--weight-decay', '0.05', '--exempt-pos-embed-from-wd', '--smoothing', '0.1', '--aa', 'none',
          '--reprob', '0', '--mixup', '0', '--cutmix', '0', '--no-repeated-aug', '--no-model-ema',
          '--drop-path', '0.0', '--crop-scale', '0.35', '1', '--device', 'cpu', '--seed', '0', '--print-freq', '20']
#: run -> (model flags, coarse grid side g: the input is 2*g*16 px)
RUNS: Dict[str, List[str]] = {
    'cf': ['--model', 'cf_deit_tiny', '--coarse-stage-size', '7', '--model-kwargs', 'patch_size=16',
           'fine_pos_embed_without_selection=True', '--selection-start-epoch', str(SELECTION_START)],
    'plain224': ['--model', 'deit_tiny_patch16_224', '--coarse-stage-size', '7', '--model-kwargs', 'patch_size=16'],
    'plain160': ['--model', 'deit_tiny_patch16_224', '--coarse-stage-size', '5', '--model-kwargs', 'patch_size=16'],
    'plain128': ['--model', 'deit_tiny_patch16_224', '--coarse-stage-size', '4', '--model-kwargs', 'patch_size=16'],
}
GRID = {'cf': 7, 'plain224': 7, 'plain160': 5, 'plain128': 4}
PLAIN = ('plain224', 'plain160', 'plain128')
#: budget name -> (plain model it is compared with, GFLOPs as a function of the plain models' GFLOPs)
BUDGETS = {'B60': 'plain224', 'B160': 'plain160', 'B128': 'plain128'}
#: CF evaluations saved per image: name -> (informative_ratio, selection_policy, feature_reuse)
CF_SETTINGS = {
    'fine': (0.5, 'attention', True),           # the inference path (alpha = 0.5, attention selection)
    'fine_random': (0.5, 'random', True),       # ablation: the same count of patches at random
    'fine_all': (1.0, 'attention', True),       # ablation: every coarse patch re-split (alpha = 1)
    'fine_no_reuse': (0.5, 'attention', False),  # diagnostic: the trained model with reuse removed
}
BOOTSTRAP_REPS = 10_000
CURVE_THRESHOLDS = [round(0.01 * i, 2) for i in range(101)]


def default_data() -> str:
    return str(ROOT.parent / 'shared' / 'data' / 'imagenette224')


def train_command(run: str, data: str, work: Path, num_workers: int, extra: List[str]) -> List[str]:
    return [sys.executable, 'main_deit.py', *MODEL, *RUNS[run], *RECIPE, '--data-path', data,
            '--num_workers', str(num_workers), '--resume', 'auto', '--output', str(work / run), *extra]


#: Where an unfinished run's resume state is committed, so that a run cut by the end of a session goes on in
#: the next (``snapshot``); ``train`` starts from it when its work folder holds no checkpoint.
IN_PROGRESS = OUT / 'in_progress'


def cmd_snapshot(args: argparse.Namespace) -> None:
    """Copy each unfinished run's checkpoint.pth, log.txt and console log into benchmarks/results/tradeoff/in_progress/."""
    work = (ROOT / args.work_dir).resolve()
    for run in RUNS:
        src = work / run
        if not (src / 'checkpoint.pth').is_file():
            continue
        dst = IN_PROGRESS / run
        dst.mkdir(parents=True, exist_ok=True)
        for name, source in (('checkpoint.pth', src / 'checkpoint.pth'), ('log.txt', src / 'log.txt'),
                             ('train.out', work / f'{run}_train.out')):
            if source.is_file():
                shutil.copyfile(source, dst / f'{name}.tmp')
                os.replace(dst / f'{name}.tmp', dst / name)
        epochs = len((src / 'log.txt').read_text().splitlines()) if (src / 'log.txt').is_file() else 0
        print(f'{run}: {epochs} of {EPOCHS} epochs saved in {dst}')


def cmd_train(args: argparse.Namespace) -> int:
    work = (ROOT / args.work_dir).resolve()
    (work / args.run).mkdir(parents=True, exist_ok=True)
    seed = IN_PROGRESS / args.run
    if not (work / args.run / 'checkpoint.pth').exists() and (seed / 'checkpoint.pth').is_file():
        for name in ('checkpoint.pth', 'log.txt'):
            shutil.copyfile(seed / name, work / args.run / name)
        if (seed / 'train.out').is_file():
            shutil.copyfile(seed / 'train.out', work / f'{args.run}_train.out')
        print(f'continuing from the committed state in {seed}', flush=True)
    cmd = train_command(args.run, args.data_path, work, args.num_workers, args.extra)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE='1', MPLBACKEND='Agg')
    print(' '.join(cmd[1:]), flush=True)
    with open(work / f'{args.run}_train.out', 'a') as log:
        return subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def _plain_model(run: str, checkpoint: Any) -> torch.nn.Module:
    model = create_baseline('deit_tiny_patch16_224', coarse_stage_size=GRID[run], patch_size=16, embed_dim=96,
                            depth=6, num_heads=3, num_classes=extract_state_dict(checkpoint)['model.head.weight'].shape[0])
    load_model_weights(model, checkpoint)
    return model.eval()


def _loader(model: torch.nn.Module, data: str, num_workers: int, subset: int = 0) -> torch.utils.data.DataLoader:
    ns = argparse.Namespace(data_set='IMNET', data_path=data, subset=subset or None)
    dataset, _ = build_dataset(False, ns, eval_transform(model))
    return torch.utils.data.DataLoader(dataset, batch_size=100, shuffle=False, num_workers=num_workers)


@torch.no_grad()
def evaluate_plain(run: str, checkpoint: Any, data: str, num_workers: int, subset: int = 0) -> Dict[str, Any]:
    model = _plain_model(run, checkpoint)
    side = model.img_size_list[1]
    logits, targets = [], []
    for x, y in _loader(model, data, num_workers, subset):
        logits.append(model.model(x).float())
        targets.append(y)
    gflops = count_gflops(model.model, torch.zeros(1, 3, side, side))
    return {'logits': torch.cat(logits).numpy(), 'targets': torch.cat(targets).numpy(), 'gflops': gflops}


@torch.no_grad()
def evaluate_cf(checkpoint: Any, data: str, num_workers: int, subset: int = 0) -> Dict[str, Any]:
    model, _, _ = build_from_checkpoint(checkpoint)
    model.eval()
    out: Dict[str, List[torch.Tensor]] = {k: [] for k in ('coarse', 'targets', *CF_SETTINGS)}
    gflops: Dict[str, List[float]] = {}
    for name, (ratio, policy, reuse) in CF_SETTINGS.items():
        model.informative_ratio, model.selection_policy, model.feature_reuse = ratio, policy, reuse
        gflops[name] = stage_gflops(model)
    for name in CF_SETTINGS:  # the random policy's draws restart from its seed
        model.reset_selection_generator()
    for x, y in _loader(model, data, num_workers, subset):
        x_c, x_f = model.split_inputs(x)
        state = model.forward_coarse(x_c)
        out['coarse'].append(state.output.float())
        out['targets'].append(y)
        for name, (ratio, policy, reuse) in CF_SETTINGS.items():
            model.informative_ratio, model.selection_policy, model.feature_reuse = ratio, policy, reuse
            s = state._replace(scores=model.selection_scores(state.cls_attn))
            out[name].append(model.forward_fine(x_f, s, selection=True).output.float())
    result = {k: torch.cat(v).numpy() for k, v in out.items()}
    result['gflops'] = gflops
    return result


def cmd_evaluate(args: argparse.Namespace) -> None:
    """Per-image logits of final checkpoints: benchmarks/results/tradeoff/per_image_RUN.npz, one per run (a run
    can be evaluated as soon as it ends), and what each was measured with in evaluation.json."""
    torch.set_num_threads(args.threads)
    work = (ROOT / args.work_dir).resolve()
    OUT.mkdir(parents=True, exist_ok=True)
    meta_path = OUT / 'evaluation.json'
    meta: Dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    for run in args.runs or ('cf', *PLAIN):
        path = work / run / 'checkpoint.pth'
        checkpoint = load_checkpoint_file(path)
        epoch = int(checkpoint.get('epoch', -1))
        if epoch != args.epochs - 1:
            raise SystemExit(f'{path} holds epoch {epoch}, not the final epoch {args.epochs - 1}: train it to the end first')
        last = json.loads((work / run / 'log.txt').read_text().splitlines()[-1])
        print(f'{run}: evaluating epoch {epoch} ...', flush=True)
        arrays: Dict[str, np.ndarray] = {}
        if run == 'cf':
            r = evaluate_cf(checkpoint, args.data_path, args.num_workers, args.subset)
            for k in ('coarse', *CF_SETTINGS):
                arrays[f'cf_{k}'] = r[k]
        else:
            r = evaluate_plain(run, checkpoint, args.data_path, args.num_workers, args.subset)
            arrays[run] = r['logits']
        arrays['targets'] = r['targets']
        tmp = OUT / f'per_image_{run}.tmp.npz'
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, OUT / f'per_image_{run}.npz')
        # the final weights alone (no optimizer state): what every number here was computed from
        tmp = OUT / f'{run}_final.pth.tmp'
        torch.save({'model': extract_state_dict(checkpoint), 'epoch': epoch,
                    'args': portable_args(checkpoint.get('args'), [args.data_path])}, tmp)
        os.replace(tmp, OUT / f'{run}_final.pth')
        shutil.copyfile(work / run / 'log.txt', OUT / f'{run}_log.txt')
        meta.setdefault('gflops', {})[run] = r['gflops']
        meta.setdefault('final_epoch', {})[run] = epoch
        meta.setdefault('log_top1', {})[run] = [last['test_coarse_acc1'], last['test_fine_acc1']]
        meta.setdefault('epoch_seconds', {})[run] = epoch_seconds(work / f'{run}_train.out')
        here = machine()
        meta.setdefault('evaluated', {})[run] = {'machine': here, 'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
                                                 'load_note': args.load_note}
        meta['machine'], meta['load_note'] = here, args.load_note
        write_json_atomic(meta, meta_path)
        print(f'wrote {OUT / f"per_image_{run}.npz"}', flush=True)


def load_per_image() -> Dict[str, np.ndarray]:
    """The four runs' per-image outputs, merged (the same images in the same order, checked)."""
    arrays: Dict[str, np.ndarray] = {}
    for run in ('cf', *PLAIN):
        with np.load(OUT / f'per_image_{run}.npz') as z:
            part = {k: z[k] for k in z.files}
        if 'targets' in arrays and not np.array_equal(arrays['targets'], part['targets']):
            raise SystemExit(f'per_image_{run}.npz holds other images (or another order) than the other runs')
        arrays.update(part)
    return arrays


def _confidence(logits: np.ndarray) -> torch.Tensor:
    """Max softmax of (N, C) logits in float32, as the model's early exit computes it."""
    return torch.from_numpy(logits).float().softmax(dim=-1).max(dim=-1).values


def _early_exit(arrays: Dict[str, np.ndarray], threshold: float) -> Tuple[np.ndarray, np.ndarray]:
    """(correct, exited) per image at ``threshold``: the coarse prediction where it exits, the fine one elsewhere."""
    exited = (_confidence(arrays['cf_coarse']) >= threshold).numpy()
    pred = np.where(exited, arrays['cf_coarse'].argmax(1), arrays['cf_fine'].argmax(1))
    return pred == arrays['targets'], exited


def _correct(arrays: Dict[str, np.ndarray], key: str) -> np.ndarray:
    return arrays[key].argmax(1) == arrays['targets']


def verdicts(comparisons: Dict[str, Dict[str, float]], plain224_top1: float) -> Dict[str, str]:
    """The decision rules of PROTOCOL.md, applied as written."""
    if plain224_top1 < 62.0:
        return {'validity': f'FAILED: plain224 reached {plain224_top1:.2f}% < 62.0%', 'match': 'no verdict',
                'family': 'no verdict'}
    d60 = comparisons['B60']
    match = ('shown at this scale' if d60['ci_low'] > -2.0 else
             'refuted at this scale' if d60['ci_high'] < 0 else 'inconclusive')
    d160, d128 = comparisons['B160'], comparisons['B128']
    if d160['ci_high'] < 0 or d128['ci_high'] < 0:
        family = 'refuted at this scale'
    elif d160['diff'] >= 0 and d128['diff'] >= 0:
        family = 'shown at this scale'
    else:
        family = 'inconclusive'
    return {'validity': f'passed: plain224 reached {plain224_top1:.2f}% >= 62.0%', 'match': match, 'family': family}


def analyse(arrays: Dict[str, np.ndarray], meta: Dict[str, Any], reps: int = BOOTSTRAP_REPS) -> Dict[str, Any]:
    """Budgets, paired comparisons, verdicts, ablations and the curve, from the per-image outputs."""
    g = meta['gflops']
    c, f = g['cf']['fine']
    conf = _confidence(arrays['cf_coarse'])
    budgets = {'B60': 0.6 * g['plain224'], 'B160': g['plain160'], 'B128': g['plain128']}
    comparisons, points = {}, {}
    for name, budget in budgets.items():
        threshold = threshold_for_budget(conf, [c, f], budget)
        correct, exited = _early_exit(arrays, threshold)
        plain = BUDGETS[name]
        comparisons[name] = compare_paired(correct, _correct(arrays, plain), reps)
        points[name] = {'budget_gflops': budget, 'threshold': threshold, 'exit_share': float(exited.mean()),
                        'realised_gflops': float(c * exited.mean() + f * (1 - exited.mean())),
                        'versus': plain, 'versus_gflops': g[plain]}
        comparisons[name].update(points[name])
    accuracy = {k: dict(zip(('top1', 'ci_low', 'ci_high'), accuracy_interval(_correct(arrays, k), reps)))
                for k in ('cf_coarse', *(f'cf_{s}' for s in CF_SETTINGS), *PLAIN)}
    ablations = {
        'random_vs_attention': compare_paired(_correct(arrays, 'cf_fine_random'), _correct(arrays, 'cf_fine'), reps),
        'all_patches_vs_half': compare_paired(_correct(arrays, 'cf_fine_all'), _correct(arrays, 'cf_fine'), reps),
        'no_reuse_vs_reuse': compare_paired(_correct(arrays, 'cf_fine_no_reuse'), _correct(arrays, 'cf_fine'), reps),
        'coarse_vs_plain128': compare_paired(_correct(arrays, 'cf_coarse'), _correct(arrays, 'plain128'), reps),
        'both_stages_vs_plain224': compare_paired(_correct(arrays, 'cf_fine'), _correct(arrays, 'plain224'), reps),
    }
    for name, key in (('random_vs_attention', 'fine_random'), ('all_patches_vs_half', 'fine_all'),
                      ('no_reuse_vs_reuse', 'fine_no_reuse')):
        ablations[name]['gflops_a'], ablations[name]['gflops_b'] = g['cf'][key][1], f
    ablations['coarse_vs_plain128'].update(gflops_a=c, gflops_b=g['plain128'])
    ablations['both_stages_vs_plain224'].update(gflops_a=f, gflops_b=g['plain224'])
    # the curve, with a bootstrap band (fewer resamples: a picture, not a verdict)
    w = bootstrap_weights(arrays['targets'].size, 2000, seed=0)
    curve = []
    for t in CURVE_THRESHOLDS:
        correct, exited = _early_exit(arrays, t)
        accs = (w @ correct.astype(np.int32)) / correct.size * 100.0
        curve.append({'threshold': t, 'gflops': float(c * exited.mean() + f * (1 - exited.mean())),
                      'top1': float(correct.mean() * 100.0), 'ci_low': float(np.percentile(accs, 2.5)),
                      'ci_high': float(np.percentile(accs, 97.5))})
    return {'budgets': comparisons, 'accuracy': accuracy, 'ablations': ablations, 'curve': curve,
            'verdicts': verdicts(comparisons, accuracy['plain224']['top1']),
            'gflops': {'cf_coarse': c, 'cf_both': f, **{k: g[k] for k in PLAIN},
                       **{f'cf_{k}': v[1] for k, v in g['cf'].items()}}}


def plot_curve(result: Dict[str, Any], path: Path) -> None:
    from utils.vis.figures import save_figure
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 5))
    curve = result['curve']
    x = [p['gflops'] for p in curve]
    ax.fill_between(x, [p['ci_low'] for p in curve], [p['ci_high'] for p in curve], color='C0', alpha=0.2,
                    label='95% bootstrap band')
    ax.plot(x, [p['top1'] for p in curve], '-', color='C0', label='CF-DeiT early exit (threshold 0..1)')
    for i, run in enumerate(PLAIN):
        a = result['accuracy'][run]
        ax.errorbar([result['gflops'][run]], [a['top1']], yerr=[[a['top1'] - a['ci_low']], [a['ci_high'] - a['top1']]],
                    fmt='s', color=f'C{i + 1}', capsize=4, label=f'plain DeiT {run[5:]} px: {a["top1"]:.1f}%')
    for name, b in result['budgets'].items():
        ax.plot([b['realised_gflops']], [b['top1_a']], 'o', color='k', ms=5)
        ax.annotate(f'{name}: {b["diff"]:+.1f} [{b["ci_low"]:+.1f}, {b["ci_high"]:+.1f}]',
                    (b['realised_gflops'], b['top1_a']), textcoords='offset points', xytext=(6, -14), fontsize=8)
    ax.set_xlabel('GFLOPs per image (multiply-adds)')
    ax.set_ylabel('top-1 on 1,500 imagenette val images (%)')
    ax.set_title('CF-DeiT vs plain DeiTs, same recipe, 40 epochs from scratch\n'
                 '(black dots: label-free budgets; CF minus plain, 95% paired interval)', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='lower right')
    fig.tight_layout()
    save_figure(fig, path, 120)
    plt.close(fig)


def plot_learning_curves(logs: Dict[str, List[Dict[str, Any]]], path: Path) -> None:
    from utils.vis.figures import save_figure
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, run in enumerate(PLAIN):
        ax.plot([r['epoch'] for r in logs[run]], [r['test_fine_acc1'] for r in logs[run]], '.-', ms=3,
                color=f'C{i + 1}', label=f'plain DeiT {run[5:]} px')
    cf = logs['cf']
    ax.plot([r['epoch'] for r in cf], [r['test_coarse_acc1'] for r in cf], '.:', ms=3, color='C0',
            label='CF coarse stage')
    for sel, style, label in ((False, '.--', 'CF fine, no selection (every fine patch)'),
                              (True, '.-', 'CF fine, informative selection')):
        pts = [(r['epoch'], r['test_fine_acc1']) for r in cf if bool(r.get('informative_selection')) == sel]
        if pts:
            ax.plot(*zip(*pts), style, ms=3, color='C0', label=label)
    ax.axvline(SELECTION_START + 0.5, color='grey', lw=0.8)
    ax.set_xlabel('epoch')
    ax.set_ylabel('val top-1 (%)')
    ax.set_title('Learning curves (as main_deit.py evaluates each epoch)', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, 120)
    plt.close(fig)


def cmd_report(args: argparse.Namespace) -> None:
    meta = json.loads((OUT / 'evaluation.json').read_text())
    arrays = load_per_image()
    result = analyse(arrays, meta)
    logs = {run: [json.loads(line) for line in (OUT / f'{run}_log.txt').read_text().splitlines()]
            for run in ('cf', *PLAIN)}
    result['learning_curves'] = {run: [{k: r.get(k) for k in ('epoch', 'train_loss', 'test_coarse_acc1',
                                                                'test_fine_acc1', 'informative_selection')}
                                       for r in rows] for run, rows in logs.items()}
    # the per-image outputs reproduce what the training log measured at the final epoch (same images, same model)
    recomputed = {'cf': [result['accuracy']['cf_coarse']['top1'], result['accuracy']['cf_fine']['top1']],
                  **{run: [result['accuracy'][run]['top1']] * 2 for run in PLAIN}}
    result['log_vs_recomputed'] = {run: {'log': meta['log_top1'][run], 'recomputed': recomputed[run]}
                                   for run in recomputed}
    result.update(evaluation=meta, protocol='benchmarks/results/tradeoff/PROTOCOL.md', recipe=' '.join(RECIPE),
                  runs={run: ' '.join(RUNS[run]) for run in RUNS},
                  command='python benchmarks/bench_tradeoff.py train RUN (x4); '
                          'python benchmarks/bench_tradeoff.py evaluate; python benchmarks/bench_tradeoff.py report')
    plot_curve(result, OUT / 'curve.png')
    plot_learning_curves(logs, OUT / 'learning_curves.png')
    write_json_atomic(result, RESULTS / 'tradeoff.json')
    print(json.dumps({'verdicts': result['verdicts'], 'log_vs_recomputed': result['log_vs_recomputed'],
                      'budgets': {k: {x: round(v[x], 3) for x in ('diff', 'ci_low', 'ci_high', 'mcnemar_p')}
                                  for k, v in result['budgets'].items()}}, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    t = sub.add_parser('train', help='train (or resume) one of the four runs')
    t.add_argument('run', choices=sorted(RUNS))
    t.add_argument('--data-path', default=default_data())
    t.add_argument('--work-dir', default='output/tradeoff', help='checkpoints and console logs (not in git)')
    t.add_argument('--threads', type=int, default=1, help='torch threads (OMP_NUM_THREADS)')
    t.add_argument('--num-workers', type=int, default=1)
    e = sub.add_parser('evaluate', help='per-image outputs of final checkpoints')
    e.add_argument('runs', nargs='*', choices=[[], *sorted(RUNS)], metavar='RUN',
                   help=f'which runs ({", ".join(RUNS)}; default: all four)')
    e.add_argument('--data-path', default=default_data())
    e.add_argument('--work-dir', default='output/tradeoff')
    e.add_argument('--threads', type=int, default=1)
    e.add_argument('--num-workers', type=int, default=1)
    e.add_argument('--load-note', default='', help='what else ran on the machine (reported)')
    e.add_argument('--epochs', type=int, default=EPOCHS, help=argparse.SUPPRESS)  # dry runs of the pipeline only
    e.add_argument('--subset', type=int, default=0, help=argparse.SUPPRESS)
    sub.add_parser('report', help='budgets, intervals, verdicts and figures from the per-image outputs')
    n = sub.add_parser('snapshot', help="commit-ready copies of unfinished runs' resume state (in_progress/)")
    n.add_argument('--work-dir', default='output/tradeoff')
    argv = sys.argv[1:]
    extra = argv[argv.index('--') + 1:] if '--' in argv else []
    args = p.parse_args(argv[:argv.index('--')] if '--' in argv else argv)
    # after --: more main_deit.py flags, for dry runs only (e.g. -- --epochs 1 --subset 640)
    args.extra = extra
    if args.command == 'train':
        sys.exit(cmd_train(args))
    elif args.command == 'evaluate':
        cmd_evaluate(args)
    elif args.command == 'snapshot':
        cmd_snapshot(args)
    else:
        cmd_report(args)


if __name__ == '__main__':
    main()
