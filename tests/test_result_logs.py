"""Committed run logs carry no path of the machine that made them and no progress-bar frames (issue 32 item 10).

The console logs under ``benchmarks/results/`` (``*.out``, ``*.txt``) are read as files, so a carriage return
(a progress bar redrawn in place) is noise and an absolute path names a machine nobody else has. The writers
(``benchmarks/bench_reproduction.py``, ``benchmarks/bench_finetune.py``) clean their logs with
``benchmarks/common.py``'s :func:`clean_logs` before they finish; the tests hold both.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))

from common import clean_log_text, clean_logs, portable_args  # noqa: E402

import argparse  # noqa: E402

from utils.common.checkpoint import load_checkpoint_file  # noqa: E402

RESULTS = ROOT / 'benchmarks' / 'results'
#: Benchmark 9's folder is written by its own driver (bench_tradeoff.py), under its pre-registered protocol.
OTHERS = ('tradeoff',)
LOGS = sorted(p for p in RESULTS.rglob('*') if p.suffix in ('.out', '.txt') and not set(OTHERS) & set(p.parts))
ABSOLUTE = re.compile(r'(?<![\w.$])/(?:work|home|tmp|root|mnt|data|scratch|Users)/')


def test_there_are_committed_logs():
    assert len(LOGS) >= 10, LOGS


@pytest.mark.parametrize('path', LOGS, ids=lambda p: p.relative_to(RESULTS).as_posix())
def test_a_committed_log_has_no_machine_paths_and_no_carriage_returns(path):
    with open(path, encoding='utf-8', newline='') as f:
        text = f.read()
    assert '\r' not in text, f'{path.relative_to(ROOT)}: progress-bar frames (carriage returns)'
    found = ABSOLUTE.search(text)
    assert found is None, f'{path.relative_to(ROOT)}: absolute path {text[found.start():found.start() + 60]!r}'


def test_clean_log_text_keeps_what_a_terminal_shows_and_makes_paths_relative():
    raw = ('output folder: /x/clone/output/ft/eval\n'
           'both stages:   0%|   | 0/2\rboth stages: 100%|###| 2/2\r            \ranytime : [1.0, 2.0]\n'
           'bar only\r 50%\r\n'
           'data in /x/data/imagenette224/val\n')
    clean = clean_log_text(raw, {'/x/clone/': '', '/x/data/': '$DATA/'})
    assert clean == ('output folder: output/ft/eval\nanytime : [1.0, 2.0]\n 50%\n'
                     'data in $DATA/imagenette224/val\n')


def test_clean_logs_rewrites_a_writers_logs(tmp_path):
    log = tmp_path / 'cf_eval.out'
    data = tmp_path / 'shared' / 'imagenette224'
    with open(log, 'w', newline='') as f:
        f.write(f'output folder: {ROOT}/output/ft\r\nvalidation set in {data}/val\nx\r  \rdone\n')
    assert clean_logs(tmp_path, [data]) == [log]
    with open(log, newline='') as f:
        assert f.read() == 'output folder: output/ft\nvalidation set in $DATA/imagenette224/val\ndone\n'
    assert clean_logs(tmp_path, [data]) == []  # clean already


CHECKPOINTS = sorted(RESULTS.rglob('*.pth'))


def test_there_are_committed_checkpoints():
    assert len(CHECKPOINTS) >= 4, CHECKPOINTS


@pytest.mark.parametrize('path', CHECKPOINTS, ids=lambda p: p.relative_to(RESULTS).as_posix())
def test_a_committed_checkpoint_records_no_machine_paths(path):
    args = load_checkpoint_file(path).get('args')
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    found = {k: v for k, v in values.items() if isinstance(v, str) and ABSOLUTE.search(v)}
    assert not found, f'{path.relative_to(ROOT)}: {found}'


def test_portable_args_rewrites_paths_and_keeps_the_rest(tmp_path):
    data = tmp_path / 'shared' / 'imagenette224'
    args = argparse.Namespace(data_path=str(data), output_dir=f'{ROOT}/output/run', lr=1e-3, dist_url='env://')
    clean = portable_args(args, [data])
    assert vars(clean) == {'data_path': '$DATA/imagenette224', 'output_dir': 'output/run', 'lr': 1e-3,
                           'dist_url': 'env://'}
    assert args.output_dir == f'{ROOT}/output/run'  # the original is left alone
    assert portable_args({'output_dir': str(ROOT)}) == {'output_dir': '.'}


DOCS = sorted([ROOT / 'README.md', ROOT / 'BENCHMARKS.md', ROOT / 'tests' / 'README.md', *(ROOT / 'docs').glob('*.md'),
               *(p for p in RESULTS.rglob('*') if p.suffix in ('.md', '.json'))])


@pytest.mark.parametrize('path', DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_and_results_carry_no_machine_paths(path):
    """Paths in the docs and committed results are relative to the repository (a user has no /tmp/qs of ours)."""
    text = path.read_text(encoding='utf-8')
    found = [text[m.start():m.start() + 60] for m in ABSOLUTE.finditer(text)]
    assert found == [], f'{path.relative_to(ROOT)}: {found[:3]}'
