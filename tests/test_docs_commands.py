"""Every command in README.md and docs/*.md stays true to the code, so the documentation cannot drift.

Each fenced block of shell commands (``bash``, ``sh``, ``console`` transcripts with ``$ `` prompts, or
an unlabelled block holding command lines) must

- either be marked by an HTML comment on the line before it: ``<!-- needs: WHAT -->`` when it needs
  what CI does not have (a GPU, ImageNet, the released files, your own data, a trained checkpoint,
  timm's scripts, a cluster, the network, or a long run), or ``<!-- covered: TEST -->`` when a test
  runs it (the test file must exist and name the command's script);
- or be cheap enough to run here: ``SCRIPT -h``, which this test runs.

For every command, marked or not: the script it names exists in the repository, and every flag it
passes (``--flag``, ``-x``) appears in that script's ``--help``. Python blocks must compile and what
they import from ``models``, ``utils`` and ``datasets`` must exist, and each is run as a saved file from
another folder (a temporary one, nothing of the repository on the path) unless marked ``<!-- needs: WHAT
-->`` (skipped, with that reason): it sets ``REPO = '/path/to/CF-ViT'`` and ``sys.path.insert(0, REPO)``,
and every other upper-case name it assigns at the top (``CHECKPOINT``, ``RELEASED_CHECKPOINT``,
``EXPORT_DIR``) is a file the user fills in, for which this test makes a small stand-in (:data:`STAND_INS`).
Links to files of the repository must resolve.
"""
from __future__ import annotations

import ast
import contextlib
import importlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
NEEDS = {'gpu', 'imagenet', 'released-checkpoint', 'trained-checkpoint', 'your-data', 'timm-scripts', 'cluster',
         'network', 'long-run'}
MARKER = re.compile(r'^<!--\s*(needs|covered):\s*(.*?)\s*-->$')
FENCE = re.compile(r'^```([\w-]*)\n(.*?)^```', flags=re.S | re.M)
SHELL_LANGS = {'bash', 'sh', 'console', ''}
#: Launchers whose own flags precede the script (not the script's flags).
LAUNCHERS = {'python', 'python3', '.venv/bin/python', 'torchrun', 'srun'}
#: This repository's packages: a snippet's imports from them must resolve.
OURS = {'models', 'utils', 'datasets'}


class Block(NamedTuple):
    page: Path
    line: int
    lang: str
    text: str
    marker: Optional[Tuple[str, List[str]]]

    @property
    def where(self) -> str:
        return f'{self.page.relative_to(ROOT)}:{self.line}'


def blocks() -> List[Block]:
    found = []
    for page in PAGES:
        text = page.read_text(encoding='utf-8')
        for m in FENCE.finditer(text):
            before = [line.strip() for line in text[:m.start()].splitlines() if line.strip()]
            marker = MARKER.match(before[-1]) if before else None
            found.append(Block(page, text[:m.start()].count('\n') + 1, m.group(1), m.group(2),
                               (marker.group(1), marker.group(2).split()) if marker else None))
    return found


def command_lines(block: Block) -> List[str]:
    """The block's commands, continuation lines joined; transcripts keep only their ``$ `` lines."""
    joined, current = [], ''
    for raw in block.text.splitlines():
        line = raw.rstrip()
        current = f'{current} {line.strip()}' if current else line
        if current.endswith('\\'):
            current = current[:-1].rstrip()
            continue
        joined.append(current)
        current = ''
    if current:
        joined.append(current)
    if block.lang == 'console':
        return [line[2:] for line in joined if line.startswith('$ ')]
    commands = []
    for line in joined:
        stripped = line.strip()
        if not stripped or stripped.startswith('#'):
            continue
        first = stripped.split()[0]
        if first in LAUNCHERS or re.match(r'^[A-Z_][A-Z0-9_]*=', first) or first in ('cd', 'export'):
            commands.append(stripped)
    return commands


class Command(NamedTuple):
    script: Optional[str]  # repository-relative path of the script it runs, or None (pytest, pip, export ...)
    flags: List[str]
    argv: List[str]
    tests: List[str]  # test files a pytest command names


def parse(line: str) -> Command:
    tokens = shlex.split(line, comments=True)
    script, flags, argv, tests = None, [], [], []
    pytest_run = any(a == '-m' and b == 'pytest' for a, b in zip(tokens, tokens[1:]))
    for i, token in enumerate(tokens):
        if pytest_run:
            if token.startswith('tests/'):
                tests.append(token.split('::')[0])
            continue
        if script is None:
            if token.endswith('.py') and not token.startswith('-'):
                script, argv = token, tokens[i + 1:]
            continue
        if token == '...' or token == '&&':
            continue
        if re.match(r'^--[A-Za-z][\w-]*(=.*)?$', token):
            flags.append(token.split('=', 1)[0])
        elif re.match(r'^-[A-Za-z]$', token):
            flags.append(token)
    return Command(script, flags, argv, tests)


@lru_cache(maxsize=None)
def help_text(script: str) -> str:
    """``python SCRIPT -h`` run in this process (the scripts' imports are shared, so this is fast). Only for
    scripts with an argparse command line: ``-h`` ends them before they do anything."""
    path = ROOT / script
    assert 'ArgumentParser' in path.read_text(encoding='utf-8'), f'{script} has no command line to ask for help'
    out = io.StringIO()
    saved_argv, saved_path = list(sys.argv), list(sys.path)
    sys.argv = [str(path), '-h']
    sys.path.insert(0, str(path.parent))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                runpy.run_path(str(path), run_name='__main__')
            except SystemExit as e:
                assert e.code in (0, None), f'{script} -h exited {e.code}'
    finally:
        sys.argv, sys.path = saved_argv, saved_path
    text = out.getvalue()
    assert text.strip(), f'{script} -h printed nothing'
    return text


def all_commands() -> Iterator[Tuple[Block, str]]:
    for block in blocks():
        if block.lang in SHELL_LANGS:
            for line in command_lines(block):
                yield block, line


COMMANDS = list(all_commands())


def test_the_pages_hold_commands():
    assert len(PAGES) >= 10 and len(COMMANDS) > 30
    scripts = {parse(line).script for _, line in COMMANDS}
    assert {'main_deit.py', 'main_lvvit.py', 'dynamic_inference.py', 'visualize.py', 'export_onnx.py',
            'make_token_labels.py', 'quickstart.py', 'run_timm_script.py'} <= scripts


@pytest.mark.parametrize('block', [b for b in blocks() if b.lang in SHELL_LANGS and command_lines(b)],
                         ids=lambda b: b.where)
def test_every_command_block_runs_here_or_is_marked(block):
    if block.marker is None:
        for line in command_lines(block):  # unmarked: must be cheap enough to run, and it is run
            command = parse(line)
            assert command.script and command.argv in (['-h'], ['--help']), (
                f'{block.where}: `{line}` is neither marked (<!-- needs: ... --> / <!-- covered: TEST -->) '
                'nor a command this test can run (SCRIPT -h)')
            assert 'usage:' in help_text(command.script).lower()
        return
    kind, values = block.marker
    assert values, f'{block.where}: empty marker'
    if kind == 'needs':
        assert set(values) <= NEEDS, f'{block.where}: unknown needs {set(values) - NEEDS}; known: {sorted(NEEDS)}'
        return
    for value in values:  # covered: the test exists and names what it covers
        target = ROOT / value
        assert target.is_file(), f'{block.where}: covered by {value}, which does not exist'
        source = target.read_text(encoding='utf-8')
        for line in command_lines(block):
            command = parse(line)
            if command.script:
                assert Path(command.script).stem in source, f'{block.where}: {value} never runs {command.script}'


@pytest.mark.parametrize('block,line', COMMANDS, ids=[f'{b.where}:{line[:50]}' for b, line in COMMANDS])
def test_scripts_exist_and_take_the_flags_used(block, line):
    command = parse(line)
    for test in command.tests:
        assert (ROOT / test).exists(), f'{block.where}: {test} does not exist'
    if command.script is None:
        return
    assert (ROOT / command.script).is_file(), f'{block.where}: no script {command.script} in the repository'
    if command.script == 'run_timm_script.py':  # the flags after the script are timm's script's
        assert command.argv and command.argv[0] in ('validate.py', 'benchmark.py', '-h', '--help'), line
        assert block.marker and 'timm-scripts' in block.marker[1], f'{block.where}: mark timm-scripts'
        return
    if 'ArgumentParser' not in (ROOT / command.script).read_text(encoding='utf-8'):
        # a script without a command line (benchmarks/report.py) would run, not print help: never run it here
        assert not command.flags and not command.argv, f'{block.where}: {command.script} takes no arguments'
        return
    text = help_text(command.script)
    for flag in command.flags:
        assert re.search(rf'(?<![\w-]){re.escape(flag)}(?![\w-])', text), (
            f'{block.where}: {command.script} has no flag {flag} (not in its --help)')


@pytest.mark.parametrize('block', [b for b in blocks() if b.lang == 'python'], ids=lambda b: b.where)
def test_python_blocks_compile_and_import_what_exists(block):
    tree = compile(block.text, block.where, 'exec', flags=ast.PyCF_ONLY_AST)
    for node in ast.walk(tree):  # the library's names a snippet imports exist (utils/ may move: snippets follow)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in OURS:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name), f'{block.where}: {node.module} has no {alias.name}'
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] in OURS:
                    importlib.import_module(alias.name)


LINK = re.compile(r'\]\(([^)\s]+)\)')


@pytest.mark.parametrize('page', PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_to_repository_files_resolve(page):
    for target in LINK.findall(page.read_text(encoding='utf-8')):
        if target.startswith(('http://', 'https://', '#', 'mailto:')):
            continue
        path = (page.parent / target.split('#')[0]).resolve()
        assert path.exists(), f'{page.relative_to(ROOT)} links to {target}, which does not exist'


def test_the_marker_parser_and_command_parser():
    block = Block(ROOT / 'README.md', 1, 'bash', 'torchrun --nproc_per_node=4 main_deit.py --model m \\\n'
                  '    --data-path P -b 2 ... --output=o   # note\n# comment\n', ('needs', ['gpu']))
    (line,) = command_lines(block)
    command = parse(line)
    assert command.script == 'main_deit.py' and command.flags == ['--model', '--data-path', '-b', '--output']
    console = Block(ROOT / 'README.md', 1, 'console', '$ python visualize.py -h\nusage: ...\n', None)
    assert command_lines(console) == ['python visualize.py -h']
    assert parse('.venv/bin/python -m pytest -q tests/test_golden.py::test_x').tests == ['tests/test_golden.py']
    assert MARKER.match('<!-- needs: gpu imagenet -->').groups() == ('needs', 'gpu imagenet')


# ------------------------------------------------------------------ Python blocks run as saved files (issue 32 item 5)
#: What each input a Python block names stands for; the test makes a small one of each.
STAND_INS = {
    'CHECKPOINT': 'a training checkpoint (records its architecture): a tiny cf_deit_tiny, 3x3 grid, 6 classes',
    'RELEASED_CHECKPOINT': 'a released-layout file ({"model": weights}) of cf_deit_small 7x7 with 1000 classes',
    'EXPORT_DIR': 'an export_onnx.py folder of the tiny training checkpoint',
}
PLACEHOLDER_REPO = "REPO = '/path/to/CF-ViT'"
INPUT_LINE = re.compile(r'^([A-Z][A-Z0-9_]*) = .*$', flags=re.M)


@pytest.fixture(scope='module')
def stand_ins(tmp_path_factory):
    """name -> path, made on first use."""
    made: Dict[str, Path] = {}
    folder = tmp_path_factory.mktemp('stand_ins')

    def get(name: str) -> Path:
        if name in made:
            return made[name]
        import argparse

        import timm
        import torch

        import models  # noqa: F401
        if name in ('CHECKPOINT', 'EXPORT_DIR'):
            path = folder / 'checkpoint.pth'
            if not path.exists():
                torch.manual_seed(0)
                tiny = timm.create_model('cf_deit_tiny', coarse_stage_size=3, num_classes=6, embed_dim=48, depth=2,
                                         num_heads=3)
                args = argparse.Namespace(model='cf_deit_tiny', coarse_stage_size=3, embed_dim=48, depth=2,
                                          num_heads=3, model_kwargs=[])
                torch.save({'model': tiny.state_dict(), 'args': args}, path)
            if name == 'EXPORT_DIR':
                from utils.common.checkpoint import load_checkpoint_file
                from utils.common.model_builder import build_from_checkpoint
                from utils.inference.onnx_export import export_early_exit
                model, _, _ = build_from_checkpoint(load_checkpoint_file(path))
                path = folder / 'export'
                export_early_exit(model.eval(), path, exporter='torchscript')
        elif name == 'RELEASED_CHECKPOINT':
            path = folder / 'cf-deit-s-224.pth'
            torch.manual_seed(0)
            torch.save({'model': timm.create_model('cf_deit_small', coarse_stage_size=7).state_dict()}, path)
        else:
            raise KeyError(name)
        made[name] = path
        return path
    return get


def _python_blocks() -> List[Block]:
    return [b for b in blocks() if b.lang == 'python']


@pytest.mark.parametrize('block', _python_blocks(), ids=lambda b: b.where)
def test_python_blocks_run_as_saved_files_from_another_folder(block, stand_ins, tmp_path):
    if block.marker is not None and block.marker[0] == 'needs':
        assert set(block.marker[1]) <= NEEDS, f'{block.where}: unknown needs {set(block.marker[1]) - NEEDS}'
        pytest.skip(f'{block.where} needs {" ".join(block.marker[1])}')
    assert PLACEHOLDER_REPO in block.text and 'sys.path.insert(0, REPO)' in block.text, (
        f'{block.where}: a Python block runs as a saved file from any folder: give it the README block\'s lines '
        f'`{PLACEHOLDER_REPO}` and `sys.path.insert(0, REPO)` (or mark it <!-- needs: ... -->)')
    code = block.text.replace(PLACEHOLDER_REPO, f'REPO = {str(ROOT)!r}')
    for m in list(INPUT_LINE.finditer(code)):
        name = m.group(1)
        if name == 'REPO':
            continue
        assert name in STAND_INS, f'{block.where}: no stand-in for {name}; add one to STAND_INS ({sorted(STAND_INS)})'
        code = code.replace(m.group(0), f'{name} = {str(stand_ins(name))!r}  # stand-in: {STAND_INS[name]}')
    (tmp_path / 'block.py').write_text(code)
    env = dict(os.environ, HF_HUB_OFFLINE='1', OMP_NUM_THREADS='1')
    env.pop('PYTHONPATH', None)  # the block sets the path itself
    proc = subprocess.run([sys.executable, 'block.py'], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f'{block.where} as a saved file:\n{proc.stderr[-3000:]}'
    assert proc.stdout.strip(), f'{block.where}: prints nothing to show it ran'


def test_every_python_block_is_run_or_marked():
    """The runner above covers every page: README.md's block and the API blocks of docs/ run; only blocks that
    need what CI lacks are skipped."""
    blocks_ = _python_blocks()
    pages = {b.page.name for b in blocks_}
    assert {'README.md', 'deployment.md', 'timm.md'} <= pages
    needs = [b.where for b in blocks_ if b.marker is not None and b.marker[0] == 'needs']
    assert needs and all('pretrained.md' in w for w in needs), needs  # the released files' tags
