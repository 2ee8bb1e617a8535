"""The project's layout: imports flow one way, and scripts are entry points that never import one another.

Parsed with ``ast`` (nothing is imported). Rules:

- no import circles among the project's modules (scripts, ``benchmarks/``, ``models/``, ``datasets/``,
  ``utils/``), counting imports inside functions too;
- ``models/`` and ``datasets/`` (the ground floor) import nothing from ``utils/``;
- no file imports a top-level script's module, also not through ``importlib``/``__import__``/``runpy``
  (a script runs another as a program: a subprocess with the same interpreter);
- no function of a script, a benchmark or the library is longer than 80 lines (:data:`MAX_FUNCTION_LINES`);
- ``utils/`` holds packages only (``common``, ``inference``, ``vis``, ``train``), no flat modules, and they
  import one another only down the order ``utils/__init__.py`` states (:data:`UTILS_ORDER`);
- no test file imports another test file (what tests share lives in ``tests/helpers.py`` or
  ``tests/conftest.py``).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT_FILES = sorted(ROOT.glob('*.py'))
SCRIPT_MODULES = {p.stem for p in SCRIPT_FILES}
LIBRARY_FILES = sorted(p for pkg in ('models', 'utils', 'datasets') for p in (ROOT / pkg).rglob('*.py'))
BENCHMARK_FILES = sorted((ROOT / 'benchmarks').glob('*.py'))
PROJECT_FILES = SCRIPT_FILES + BENCHMARK_FILES + LIBRARY_FILES
TEST_FILES = sorted((ROOT / 'tests').glob('*.py'))
TEST_MODULES = {p.stem for p in TEST_FILES if p.stem.startswith('test_')} | {'conftest'}
#: utils' packages in the order ``utils/__init__.py`` lists them: each imports only packages before it
#: (``common`` none of the others; every other package uses ``common``).
UTILS_ORDER = ['common', 'inference', 'vis', 'train']
#: Calls that import a module named by their first argument.
IMPORT_CALLS = {'import_module', '__import__', 'run_module'}
#: Calls that load a file by path.
PATH_IMPORT_CALLS = {'spec_from_file_location', 'run_path', 'SourceFileLoader'}


def module_name(path: Path) -> str:
    """``utils/common/atomic.py`` -> ``utils.common.atomic``; ``utils/common/__init__.py`` -> ``utils.common``."""
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    if parts[-1] == '__init__':
        parts.pop()
    return '.'.join(parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in PROJECT_FILES}


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(encoding='utf-8'), filename=str(path))


def imported_modules(path: Path) -> Set[str]:
    """Top-level names of every module ``path`` imports (``import a.b`` and ``from a.b import c`` give ``a``)."""
    names: Set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split('.')[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split('.')[0])
    return names


def _project_module(name: str) -> Optional[str]:
    """The longest prefix of the dotted ``name`` that is a project module, or None."""
    parts = name.split('.')
    for end in range(len(parts), 0, -1):
        candidate = '.'.join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def project_imports(path: Path) -> Set[str]:
    """The project modules ``path`` imports (absolute and relative; ``from pkg import sub`` gives ``pkg.sub``)."""
    own = module_name(path)
    package = own if path.name == '__init__.py' else own.rpartition('.')[0]
    found: Set[str] = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split('.') if package else []
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = '.'.join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ''
            targets = [f'{base}.{alias.name}' if f'{base}.{alias.name}' in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            module = _project_module(target)
            if module is not None and module != own:
                found.add(module)
    return found


def find_circles() -> List[List[str]]:
    """Every strongly connected group of more than one module in the import graph (Tarjan)."""
    graph = {name: sorted(project_imports(path)) for name, path in MODULES.items()}
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    circles: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return circles


def dynamic_imports(path: Path) -> List[str]:
    """What ``path`` imports by a call: the first argument of ``importlib.import_module``/``__import__``/
    ``runpy.run_module`` (``'?'`` when it is not a constant), and the ``*.py`` file names it mentions
    when it loads files by path (``spec_from_file_location``, ``runpy.run_path``)."""
    tree = _tree(path)
    found: List[str] = []
    loads_paths = False
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ''
        if name in IMPORT_CALLS:
            first = node.args[0] if node.args else None
            found.append(first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else '?')
        elif name in PATH_IMPORT_CALLS:
            loads_paths = True
    if loads_paths:
        found += [Path(n.value).stem for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith('.py')
                  and '/' not in n.value and Path(n.value).stem in SCRIPT_MODULES]
    return found


# ---------------------------------------------------------------------------------------------- the checker
def test_the_scripts_are_found():
    assert {'main_deit', 'main_lvvit', 'dynamic_inference', 'visualize', 'make_token_labels', 'export_onnx',
            'quickstart'} <= SCRIPT_MODULES
    assert len(LIBRARY_FILES) > 10


def test_the_import_parser_sees_scripts(tmp_path):
    sample = tmp_path / 's.py'
    sample.write_text('import os\nimport main_deit\nfrom visualize import main\nfrom . import x\n'
                      'def f():\n    import main_lvvit.sub as m\n')
    assert imported_modules(sample) == {'os', 'main_deit', 'visualize', 'main_lvvit'}


def test_the_parser_sees_imports_through_importlib(tmp_path):
    sample = tmp_path / 's.py'
    sample.write_text('import importlib, runpy\nimportlib.import_module("main_deit")\n__import__(name)\n'
                      'spec = importlib.util.spec_from_file_location("q", "quickstart.py")\n')
    assert dynamic_imports(sample) == ['main_deit', '?', 'quickstart']


def test_the_project_graph_is_read():
    assert project_imports(ROOT / 'utils' / 'common' / 'checkpoint.py') >= {'utils.common.errors', 'utils.common.checkpoint_schema'}
    assert 'models.token_ops' in project_imports(ROOT / 'models' / 'cf_vit.py')  # a relative import


def test_the_circle_finder_finds_a_circle(monkeypatch):
    fake = {'a': ROOT / 'a.py', 'b': ROOT / 'b.py', 'c': ROOT / 'c.py'}
    edges = {'a': {'b'}, 'b': {'a'}, 'c': {'a'}}
    monkeypatch.setattr(__import__(__name__), 'MODULES', fake)
    monkeypatch.setattr(__import__(__name__), 'project_imports', lambda path: edges[path.stem])
    assert find_circles() == [['a', 'b']]


# ---------------------------------------------------------------------------------------------- the rules
def test_no_import_circles():
    assert find_circles() == []


@pytest.mark.parametrize('path', PROJECT_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_script_imports_a_script(path):
    found: List[str] = sorted((imported_modules(path) & SCRIPT_MODULES) - {path.stem})
    assert found == [], f'{path.relative_to(ROOT)} imports the script module(s) {found}'
    dynamic = [name for name in dynamic_imports(path) if name == '?' or name.split('.')[0] in SCRIPT_MODULES]
    assert dynamic == [], f'{path.relative_to(ROOT)} imports {dynamic} through importlib, __import__ or runpy'


@pytest.mark.parametrize('path', sorted(p for pkg in ('models', 'datasets') for p in (ROOT / pkg).rglob('*.py')),
                         ids=lambda p: p.relative_to(ROOT).as_posix())
def test_models_and_datasets_import_nothing_from_utils(path):
    assert 'utils' not in imported_modules(path) | {m.split('.')[0] for m in project_imports(path)}


def test_utils_holds_packages_only():
    flat = sorted(p.name for p in (ROOT / 'utils').glob('*.py') if p.name != '__init__.py')
    assert flat == []
    assert sorted(p.name for p in (ROOT / 'utils').iterdir() if (p / '__init__.py').is_file()) == [
        'common', 'inference', 'train', 'vis']


@pytest.mark.parametrize('name', ['main_deit', 'main_lvvit'])
def test_training_scripts_hold_only_their_recipe(name):
    assert len((ROOT / f'{name}.py').read_text(encoding='utf-8').splitlines()) < 300


def test_visualization_holds_no_dataset_class():
    tree = _tree(ROOT / 'utils' / 'vis' / 'figures.py')
    bases = {ast.unparse(b) for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for b in node.bases}
    assert not {b for b in bases if b.split('.')[-1] in ('Dataset', 'ImageFolder', 'DatasetFolder')}


def utils_package_imports() -> Dict[str, Set[str]]:
    """utils package -> the other utils packages its modules import (``utils.train.engine`` -> ``inference`` ...)."""
    found: Dict[str, Set[str]] = {}
    for package in UTILS_ORDER:
        imports = found.setdefault(package, set())
        for path in (ROOT / 'utils' / package).rglob('*.py'):
            imports.update(m.split('.')[1] for m in project_imports(path) if m.startswith('utils.') and m.count('.'))
        imports.discard(package)
    return found


def test_utils_docstring_lists_its_packages_in_the_order_checked():
    doc = ast.get_docstring(_tree(ROOT / 'utils' / '__init__.py')) or ''
    listed = [line.split('`utils.')[1].split('`')[0] for line in doc.splitlines() if line.startswith('- :mod:`utils.')]
    assert listed == UTILS_ORDER


def test_utils_packages_import_only_packages_before_them():
    imports = utils_package_imports()
    for position, package in enumerate(UTILS_ORDER):
        allowed = set(UTILS_ORDER[:position])
        assert imports[package] <= allowed, f'utils.{package} imports utils.{sorted(imports[package] - allowed)}'
        if package != 'common':
            assert 'common' in imports[package], f'utils.{package} does not use utils.common'


def test_the_package_order_check_sees_a_wrong_way_import(monkeypatch):
    real = project_imports
    monkeypatch.setattr(__import__(__name__), 'project_imports', lambda path: real(path) | (
        {'utils.train.loop'} if path.parent.name == 'common' else set()))
    assert utils_package_imports()['common'] == {'train'}


@pytest.mark.parametrize('path', TEST_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_test_file_imports_another(path):
    found = sorted((imported_modules(path) | set(dynamic_imports(path))) & (TEST_MODULES - {path.stem}))
    assert found == [], (f'{path.relative_to(ROOT)} imports the test module(s) {found}: move what they share to '
                         f'tests/helpers.py or a conftest.py fixture')


def test_the_test_import_check_sees_one(tmp_path):
    sample = tmp_path / 'test_sample.py'
    sample.write_text('from helpers import make_image_folder\ndef f():\n    from test_main_lvvit import TINY\n')
    assert imported_modules(sample) & TEST_MODULES == {'test_main_lvvit'}


#: The longest a function of the library, a script or a benchmark may grow (lines, signature and docstring
#: included): a longer one holds several jobs and is split along its seams.
MAX_FUNCTION_LINES = 80


def long_functions(path: Path, limit: int = MAX_FUNCTION_LINES) -> List[str]:
    """``name (N lines)`` for every function or method of ``path`` longer than ``limit`` lines."""
    return [f'{node.name} ({node.end_lineno - node.lineno + 1} lines)' for node in ast.walk(_tree(path))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_the_length_check_sees_a_long_method(tmp_path):
    sample = tmp_path / 's.py'
    sample.write_text('class A:\n    def f(self):\n' + '        x = 1\n' * 80 + '\ndef g():\n    pass\n')
    assert long_functions(sample) == ['f (81 lines)']
    assert long_functions(sample, limit=81) == []


@pytest.mark.parametrize('path', PROJECT_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_functions_stay_short(path):
    assert long_functions(path) == [], f'{path.relative_to(ROOT)}: split along its seams'
