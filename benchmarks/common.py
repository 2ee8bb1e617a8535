"""Shared pieces of the benchmarks: machine description, interleaved timing, result files."""
from __future__ import annotations

import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
#: Where result files go: benchmarks/results/, or the folder CFVIT_BENCH_RESULTS names (tests use it).
RESULTS = Path(os.environ.get('CFVIT_BENCH_RESULTS') or Path(__file__).resolve().parent / 'results')
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from utils.common.atomic import write_json_atomic  # noqa: E402


def machine() -> Dict[str, object]:
    """What the numbers were measured on."""
    cpu = platform.processor() or ''
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                cpu = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    return {
        'cpu': cpu, 'cores': os.cpu_count(), 'threads': torch.get_num_threads(),
        'torch': torch.__version__, 'python': platform.python_version(),
        'cuda': torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
    }


def interleaved(programs: Dict[str, Callable[[], None]], reps: int, warmup: int = 1) -> Dict[str, List[float]]:
    """Time each program ``reps`` times, round-robin, after ``warmup`` untimed rounds.

    Interleaving spreads any slowdown of a noisy machine over all programs alike.
    """
    for _ in range(warmup):
        for fn in programs.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in programs}
    for _ in range(reps):
        for name, fn in programs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def save(name: str, payload: Dict[str, object]) -> Path:
    path = RESULTS / f'{name}.json'
    write_json_atomic(payload, path)
    return path


def clean_log_text(text: str, replace: Dict[str, str]) -> str:
    """A console log as a file should hold it: of each carriage-return-separated line only what a terminal
    would show last (no progress-bar frames; lines left blank dropped), and every prefix in ``replace``
    (absolute paths of the machine) replaced, longest first (``{'/abs/clone/': ''}`` makes paths relative to
    the repository)."""
    lines = []
    for line in text.split('\n'):
        if '\r' in line:
            line = line.rstrip('\r').split('\r')[-1].rstrip()
            if not line:
                continue
        lines.append(line)
    return replace_prefixes('\n'.join(lines), replace)


def replace_prefixes(text: str, replace: Dict[str, str]) -> str:
    """``text`` with every key of ``replace`` replaced by its value, longest first."""
    for old in sorted(replace, key=len, reverse=True):
        text = text.replace(old, replace[old])
    return text


def path_replacements(data_paths: Sequence[object] = ()) -> Dict[str, str]:
    """The machine's paths a committed file must not carry: this clone's root (made relative) and each of
    ``data_paths``' parent folder (written ``$DATA``)."""
    replace = {f'{ROOT}/': '', str(ROOT): '.'}
    for data in data_paths:
        if data:
            replace[f'{Path(str(data)).expanduser().resolve().parent}/'] = '$DATA/'
    return replace


def clean_logs(folder: Path, data_paths: Sequence[object] = ()) -> List[Path]:
    """Rewrite the console logs (``*.out``) of ``folder`` with :func:`clean_log_text`: this clone's root made
    relative, each of ``data_paths``' parent folder written ``$DATA``. The files a benchmark commits then
    carry no path of the machine that made them and no progress-bar noise. Returns the files changed."""
    replace = path_replacements(data_paths)
    changed = []
    for path in sorted(Path(folder).glob('*.out')):
        with open(path, encoding='utf-8', errors='replace', newline='') as f:  # keep the carriage returns
            text = f.read()
        clean = clean_log_text(text, replace)
        if clean != text:
            with open(path, 'w', encoding='utf-8', newline='') as f:
                f.write(clean)
            changed.append(path)
    return changed


def portable_args(args: object, data_paths: Sequence[object] = ()) -> object:
    """A copy of a checkpoint's ``args`` (Namespace or dict) whose string values carry no path of this machine:
    this clone's root made relative, each of ``data_paths``' parent folder written ``$DATA`` (as
    :func:`clean_logs` does for console logs). Anything else is returned as it is."""
    replace = path_replacements(data_paths)

    def clean(value: object) -> object:
        return replace_prefixes(value, replace) if isinstance(value, str) else value

    if isinstance(args, dict):
        return {k: clean(v) for k, v in args.items()}
    if hasattr(args, '__dict__') and type(args).__name__ == 'Namespace':
        return type(args)(**{k: clean(v) for k, v in vars(args).items()})
    return args


def curve_against_baseline(cf: Dict[str, Any], base_top1: float, g: int, patch: int, out: Path, title: str,
                           label: str) -> Tuple[float, Optional[float]]:
    """``(baseline GFLOPs, CF GFLOPs that match it or None)``: the small DeiT baseline of benchmarks 3 and 5
    (D=96, 6 blocks, 3 heads) at the fine stage's input (``2 * g * patch`` px), the fewest GFLOPs at which the
    CF model's budgeted sweep (``cf``: dynamic_inference.py's ``budgeted.json``) reaches the baseline's top-1;
    draws the curve with the baseline's point labelled ``label`` to ``out/curve.png``."""
    import models  # noqa: F401
    from models.baseline import create_baseline
    from utils.inference.flops import count_gflops
    from utils.vis.plots import plot_budgeted_curve
    size = 2 * g * patch
    base = create_baseline('deit_tiny_patch16_224', coarse_stage_size=g, patch_size=patch, embed_dim=96, depth=6,
                           num_heads=3, num_classes=10).eval()
    with torch.no_grad():
        base_gflops = count_gflops(base.model, torch.zeros(1, 3, size, size))
    gflops, acc = cf['budgeted_batch_classification']
    matching = [x for x, a in zip(gflops, acc) if a >= base_top1]
    plot_budgeted_curve(gflops, acc, out / 'curve.png', list(zip(cf['flop'], cf['anytime_classification'])),
                        title=title, thresholds=cf['thresholds'],
                        operating_point=(base_gflops, base_top1, f'{label}: {base_top1:.2f}%'))
    return base_gflops, (min(matching) if matching else None)


def epoch_seconds(train_out: Path) -> List[float]:
    """Each epoch's wall time (training and its evaluation) from the timestamps of a training's console log."""
    start: Dict[int, int] = {}
    end: Dict[int, int] = {}
    for line in train_out.read_text().splitlines():
        m = re.match(r'(\d\d):(\d\d):(\d\d) INFO epoch (\d+)( \[1/| ?:)', line)
        if not m:
            continue
        t = int(m[1]) * 3600 + int(m[2]) * 60 + int(m[3])
        e = int(m[4])
        if m[5].startswith(' [1/'):
            start.setdefault(e, t)
        else:
            end[e] = t
    return [float((end[e] - start[e]) % 86400) for e in sorted(end) if e in start]
