"""The project's layout: scripts are entry points over the library and never import one another.

Parsed with ``ast`` (nothing is imported): every top-level script and every ``benchmarks/*.py``, and
the library packages, must not import a top-level script's module. A script runs another only
through :func:`utils.misc.run_script`.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import List, Set

import pytest

from utils.misc import SCRIPTS

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FILES = sorted(ROOT.glob('*.py'))
SCRIPT_MODULES = {p.stem for p in SCRIPT_FILES}
LIBRARY_FILES = sorted(p for pkg in ('models', 'utils', 'datasets') for p in (ROOT / pkg).rglob('*.py'))


def imported_modules(path: Path) -> Set[str]:
    """Top-level names of every module ``path`` imports (``import a.b`` and ``from a.b import c`` give ``a``)."""
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names


def test_the_scripts_are_found():
    assert {'main_deit', 'main_lvvit', 'dynamic_inference', 'visualize', 'make_token_labels',
            'quickstart'} <= SCRIPT_MODULES
    assert set(SCRIPTS) <= SCRIPT_MODULES  # run_script runs real scripts only
    assert len(LIBRARY_FILES) > 10


def test_the_import_parser_sees_scripts(tmp_path):
    sample = tmp_path / 's.py'
    sample.write_text('import os\nimport main_deit\nfrom visualize import main\nfrom . import x\n'
                      'def f():\n    import main_lvvit.sub as m\n')
    assert imported_modules(sample) == {'os', 'main_deit', 'visualize', 'main_lvvit'}


@pytest.mark.parametrize('path', SCRIPT_FILES + sorted((ROOT / 'benchmarks').glob('*.py')) + LIBRARY_FILES,
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_script_imports_a_script(path):
    found: List[str] = sorted((imported_modules(path) & SCRIPT_MODULES) - {path.stem})
    assert found == [], f'{path.relative_to(ROOT)} imports the script module(s) {found}'


@pytest.mark.parametrize('name', ['main_deit', 'main_lvvit'])
def test_training_scripts_hold_only_their_recipe(name):
    assert len((ROOT / f'{name}.py').read_text(encoding='utf-8').splitlines()) < 300


def test_visualization_holds_no_dataset_class():
    tree = ast.parse((ROOT / 'utils' / 'visualization.py').read_text(encoding='utf-8'))
    bases = {ast.unparse(b) for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for b in node.bases}
    assert not {b for b in bases if b.split('.')[-1] in ('Dataset', 'ImageFolder', 'DatasetFolder')}
