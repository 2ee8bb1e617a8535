"""What a newcomer meets in the first hour (issue 27): messages that say what is true, output folders with real
names, the runner for timm's own scripts, quiet export, titles that fit, warm-up and data-set log lines.

One tiny CF-DeiT (D=48, 2 blocks, 3x3 coarse grid, 6 classes) saved as a training checkpoint (with the ``args``
main_deit.py records) stands in for the user's checkpoint; the data are tiny PNG folders.
"""
from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dynamic_inference
import main_deit
import run_timm_script
import visualize
from helpers import make_image_folder, script_env
from utils.common.atomic import save_atomic
from utils.common.checkpoint import check_state_dict
from utils.train.args import flags_given, get_args_parser
from utils.train.setup import build_scheduler
from utils.vis.figures import Details

ROOT = Path(__file__).resolve().parents[1]
CLASSES = 6
TINY = ['--model', 'cf_deit_tiny', '--coarse-stage-size', '3', '--embed-dim', '48', '--depth', '2', '--num-heads', '3']


def _tiny(**kwargs) -> torch.nn.Module:
    sizes = dict(embed_dim=48, depth=2, num_heads=3, coarse_stage_size=3, num_classes=CLASSES)
    return timm.create_model('cf_deit_tiny', **{**sizes, **kwargs})


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp('data'), {'train': 1, 'val': 2}, num_classes=CLASSES)


@pytest.fixture(scope='module')
def training_checkpoint(tmp_path_factory, data) -> Path:
    """A checkpoint in main_deit.py's layout: weights and the run's flags (model, grid, sizes, data path)."""
    torch.manual_seed(0)
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(TINY + ['--data-path', str(data)])
    path = tmp_path_factory.mktemp('run') / 'checkpoint.pth'
    save_atomic({'model': _tiny().state_dict(), 'args': args, 'epoch': 0}, path)
    return path


# ------------------------------------------------------------------ defect 2: the mismatch message
def test_a_checkpoint_of_another_width_is_named_so_not_a_class_count():
    problem = check_state_dict(_tiny(embed_dim=96), _tiny().state_dict())
    assert 'another size (embed_dim 48, depth 2; this model: embed_dim 96, depth 2)' in problem
    assert 'embed_dim=48 depth=2' in problem
    assert 'class count' not in problem and '--finetune' not in problem


def test_another_class_count_still_gets_the_finetune_hint():
    problem = check_state_dict(_tiny(num_classes=10), _tiny().state_dict())
    assert 'class count (checkpoint 6, model 10)' in problem and '--finetune' in problem
    assert 'another size' not in problem


# ------------------------------------------------------------------ defect 3: --eval --resume reads the architecture
def test_flags_given_tells_set_flags_from_defaults():
    parser = argparse.ArgumentParser(parents=[get_args_parser()])
    given = flags_given(parser, ['--eval', '--model=cf_deit_tiny', '--embed-dim', '48'])
    assert given == {'eval', 'model', 'embed_dim'}
    assert parser.parse_args([]).model == 'cf_deit_small'  # the defaults are restored


def test_eval_resume_builds_the_architecture_the_checkpoint_records(training_checkpoint, data, caplog):
    caplog.set_level(logging.INFO)
    common = ['--eval', '--resume', str(training_checkpoint), '--data-path', str(data), '--device', 'cpu',
              '--num_workers', '0', '--batch-size', '8']
    assert main_deit.main(common) == 0
    assert '--model cf_deit_tiny --coarse-stage-size 3 --embed-dim 48 --depth 2 --num-heads 3' in caplog.text
    assert 'cf_deit_tiny, 6 classes, input [48, 96]' in caplog.text
    assert '12 images' in caplog.text  # evaluated: 2 validation images x 6 classes
    caplog.clear()
    assert main_deit.main(common + ['--model', 'cf_deit_small']) == 2  # a model named on the command line wins
    assert 'another size (embed_dim 48, depth 2; this model: embed_dim 384, depth 12)' in caplog.text


# ------------------------------------------------------------------ defects 5, 6, 7: dynamic_inference.py
def test_default_output_folder_is_named_after_the_checkpoints_model(training_checkpoint, data, tmp_path,
                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data), '--checkpoint_path',
                                   str(training_checkpoint), '--num-workers', '0']) == 0
    (folder,) = (tmp_path / 'output' / 'dynamic_inference').iterdir()
    assert folder.name.startswith('cf_deit_tiny_g3_anytime_'), folder.name
    assert 'ckpt' not in folder.name and 'model_g' not in folder.name
    assert (folder / 'anytime.json').is_file()


def test_mode3_prints_stored_results_as_modes_0_and_1_do(tmp_path, capsys):
    ckpt = tmp_path / 'with_results.pth'
    gflops = [0.0009 + i * 1e-5 for i in range(100)]
    acc = [56.49999999999999 + i * 0.17 for i in range(100)]
    save_atomic({'model': _tiny().state_dict(), 'flop': [0.000916734, 0.0039452],
                 'anytime_classification': [56.49999999999999, 73.83333333333333],
                 'budgeted_batch_classification': [gflops, acc]}, ckpt)
    assert dynamic_inference.main(['--eval-mode', '3', '--checkpoint_path', str(ckpt),
                                   '--output-dir', str(tmp_path / 'out')]) == 0
    out = capsys.readouterr().out
    assert 'anytime_classification : [56.50, 73.83]' in out
    assert 'flop : [0.0009167, 0.003945]' in out
    assert '[56.50, 56.67, 56.84, ... (100 values) ...' in out
    assert '56.49999' not in out and '73.8333' not in out
    stored = json.loads((tmp_path / 'out' / 'checkpoint_results.json').read_text())
    assert stored['anytime_classification'] == [56.49999999999999, 73.83333333333333]  # the JSON keeps every digit


def test_mode3_without_results_names_the_file_mode1_writes(training_checkpoint, tmp_path, capsys):
    assert dynamic_inference.main(['--eval-mode', '3', '--checkpoint_path', str(training_checkpoint),
                                   '--output-dir', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'stores no evaluation results' in err[0]
    assert 'checkpoint_with_results.pth' in err[0] and '--write-checkpoint' in err[0]


def test_dynamic_inference_reads_a_class_folder_tree_as_visualize_does(training_checkpoint, data, tmp_path, capsys):
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data / 'val'), '--checkpoint_path',
                                   str(training_checkpoint), '--num-workers', '0',
                                   '--output-dir', str(tmp_path / 'out')]) == 0
    assert json.loads((tmp_path / 'out' / 'anytime.json').read_text())['images'] == 12


# ------------------------------------------------------------------ the runner for timm's scripts
FAKE_VALIDATE = '''
import sys
import timm
assert __name__ == '__main__'
name = sys.argv[sys.argv.index('--model') + 1]
model = timm.create_model(name, num_classes=6, embed_dim=48, depth=2, num_heads=3)
print('CREATED', type(model).__name__, model.img_size_list, sys.argv[0].endswith('validate.py'), sys.argv[1:])
sys.exit(int(sys.argv[sys.argv.index('--exit') + 1]))
'''


def _runner(argv, cwd, monkeypatch, capsys):
    """run_timm_script.main(argv) in this process, as from ``cwd``: (exit status, stdout, stderr)."""
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))
    monkeypatch.setattr(sys, 'path', list(sys.path))
    try:
        code = run_timm_script.main(argv)
    except SystemExit as e:  # the script's own exit
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


def test_runner_registers_the_cf_models_inside_a_timm_script(tmp_path, training_checkpoint, monkeypatch, capsys):
    (tmp_path / 'validate.py').write_text(FAKE_VALIDATE)
    # as a user runs it: a process of its own, from another folder
    proc = subprocess.run([sys.executable, str(ROOT / 'run_timm_script.py'), 'validate.py', 'DATA', '--model',
                           'cf_deit_tiny', '--exit', '0'], cwd=tmp_path, env=script_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "CREATED CFVisionTransformer [112, 224] True ['DATA', '--model', 'cf_deit_tiny', '--exit', '0']" \
        in proc.stdout
    code, out, _ = _runner(['validate.py', '--model', 'cf_deit_tiny', '--exit', '3'], tmp_path, monkeypatch, capsys)
    assert code == 3 and 'CREATED' in out
    # a checkpoint of another architecture: one line before the script starts (the rest: the tests below)
    code, out, err = _runner(['validate.py', '--model', 'cf_deit_tiny', '--checkpoint', str(training_checkpoint),
                              '--exit', '0'], tmp_path, monkeypatch, capsys)
    assert code == 2 and 'CREATED' not in out and len(err.strip().splitlines()) == 1
    code, _, err = _runner(['benchmark.py', '--model', 'cf_deit_tiny'], tmp_path, monkeypatch, capsys)
    assert code == 2 and 'pytorch-image-models/tree/v1.0.31' in err and 'docs/timm.md' in err
    assert _runner([], tmp_path, monkeypatch, capsys)[0] == 2


# issue 32 item 1: a stand-in for timm's validate.py as far as the runner's check goes: its argparse flags (with
# --checkpoint-key beside --checkpoint, as timm's scripts), timm's ParseKwargs, create_model and a strict load_checkpoint
TIMM_LIKE_VALIDATE = '''
import argparse, ast
import timm
from timm.models import load_checkpoint


class ParseKwargs(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        kw = {}
        for value in values:
            key, value = value.split('=')
            try:
                kw[key] = ast.literal_eval(value)
            except ValueError:
                kw[key] = str(value)
        setattr(namespace, self.dest, kw)


parser = argparse.ArgumentParser()
parser.add_argument('data', nargs='?')
parser.add_argument('--model', '-m', default='dpn92')
parser.add_argument('--checkpoint', default='', type=str)
parser.add_argument('--checkpoint-key', default='', type=str)
parser.add_argument('--initial-seed', default=0, type=int)
parser.add_argument('--num-classes', type=int, default=None)
parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
parser.add_argument('--amp', action='store_true', default=False)


if __name__ == '__main__':
    args = parser.parse_args()
    model = timm.create_model(args.model, num_classes=args.num_classes, **args.model_kwargs)
    load_checkpoint(model, args.checkpoint)  # strict
    print('LOADED', args.checkpoint, model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads)
'''


def _advice(err: str) -> list:
    """The flags the runner's one-line error says to run with."""
    (line,) = err.strip().splitlines()
    return line.split('run it with ', 1)[1].split(' (')[0].split()


def test_runner_names_every_flag_a_recorded_checkpoint_needs_and_following_it_works(tmp_path, training_checkpoint,
                                                                                    monkeypatch, capsys):
    (tmp_path / 'validate.py').write_text(TIMM_LIKE_VALIDATE)
    command = ['validate.py', 'DATA', '--model', 'cf_deit_tiny', '--checkpoint', str(training_checkpoint), '--amp']
    code, out, err = _runner(command, tmp_path, monkeypatch, capsys)
    assert code == 2 and 'LOADED' not in out
    assert err.strip() == (
        f'run_timm_script.py: error: {training_checkpoint} holds cf_deit_tiny (a 3x3 coarse grid, embed_dim 48, '
        'depth 2, num_heads 3, 6 classes; recorded in the checkpoint), which the model this command builds does not '
        'fit: run it with --model-kwargs embed_dim=48 depth=2 num_heads=3 coarse_stage_size=3 --num-classes 6')
    advice = _advice(err)
    code, out, err = _runner(command + advice, tmp_path, monkeypatch, capsys)  # followed as written: it works
    assert code == 0 and f'LOADED {training_checkpoint} 48 2 3' in out, err[-2000:]
    # the grid alone (the old advice) is not enough, nor the right shapes with another number of heads
    for kwargs in (['coarse_stage_size=3'], ['embed_dim=48', 'depth=2', 'num_heads=6', 'coarse_stage_size=3']):
        code, _, err = _runner(command + ['--num-classes', '6', '--model-kwargs', *kwargs], tmp_path, monkeypatch,
                               capsys)
        assert code == 2 and _advice(err) == advice[:-2], err  # --num-classes was right already
        assert "in place of the command's --model-kwargs" in err
    # another model named: the recorded one is named back; the command's other kwargs are kept
    code, _, err = _runner(['validate.py', '-m', 'cf_deit_small', '--checkpoint', str(training_checkpoint),
                            '--model-kwargs', 'exit_threshold=0.5'], tmp_path, monkeypatch, capsys)
    assert code == 2 and _advice(err) == ['--model', 'cf_deit_tiny', '--model-kwargs', 'exit_threshold=0.5',
                                          'embed_dim=48', 'depth=2', 'num_heads=3', 'coarse_stage_size=3',
                                          '--num-classes', '6']


def test_runner_reads_the_checkpoint_flag_as_argparse_does(tmp_path, training_checkpoint, monkeypatch, capsys):
    """The file checked is the file the script loads: abbreviations, ``--flag=value``, the last of a repeated flag."""
    (tmp_path / 'validate.py').write_text(TIMM_LIKE_VALIDATE)
    fits = ['--model', 'cf_deit_tiny', '--num-classes', '6', '--model-kwargs', 'embed_dim=48', 'depth=2',
            'num_heads=3', 'coarse_stage_size=3']
    other = tmp_path / 'other.pth'
    save_atomic({'model': _tiny(embed_dim=96).state_dict()}, other)  # a released layout of another width
    for given in (['--checkpoint', str(other), '--checkpoint', str(training_checkpoint)],
                  [f'--checkpoint={other}', f'--checkpoint={training_checkpoint}'],
                  ['--checkpoint', str(tmp_path / 'missing.pth'), '--checkpoint', str(training_checkpoint)]):
        code, out, err = _runner(['validate.py', *given, *fits], tmp_path, monkeypatch, capsys)
        assert code == 0 and f'LOADED {training_checkpoint}' in out, (given, err)
    code, out, err = _runner(['validate.py', '--checkpoint', str(training_checkpoint), '--checkpoint', str(other),
                              *fits], tmp_path, monkeypatch, capsys)
    assert code == 2 and 'LOADED' not in out
    assert f'{other} holds cf_deit_tiny (a 3x3 coarse grid, embed_dim 96, depth 2, 6 classes; read from its weights)' \
        in err and _advice(err) == ['--model-kwargs', 'embed_dim=96', 'depth=2', 'num_heads=3', 'coarse_stage_size=3']
    code, _, err = _runner(['validate.py', '--checkpoint', str(other), *fits[:5]], tmp_path, monkeypatch, capsys)
    assert _advice(err) == ['--model-kwargs', 'embed_dim=96', 'depth=2', 'num_heads=H', 'coarse_stage_size=3']
    assert "H: its number of heads, which the weights do not show" in err
    # --checkpoin is ambiguous in this script (--checkpoint, --checkpoint-key): its own argparse says so
    code, _, err = _runner(['validate.py', '--checkpoin', str(other), *fits], tmp_path, monkeypatch, capsys)
    assert code == 2 and 'ambiguous option: --checkpoin' in err and 'run_timm_script.py' not in err
    # where an abbreviation is unique, it is the checkpoint flag, checked as such
    (tmp_path / 'no_key.py').write_text(TIMM_LIKE_VALIDATE.replace(
        "parser.add_argument('--checkpoint-key', default='', type=str)\n", ''))
    code, _, err = _runner(['no_key.py', '--checkp', str(other), *fits], tmp_path, monkeypatch, capsys)
    assert code == 2 and err.startswith(f'run_timm_script.py: error: {other} holds cf_deit_tiny'), err
    code, out, _ = _runner(['no_key.py', '--check', str(training_checkpoint), *fits], tmp_path, monkeypatch, capsys)
    assert code == 0 and 'LOADED' in out


# ------------------------------------------------------------------ defect 9: export without the exporter's chatter
def test_export_prints_only_its_own_lines(training_checkpoint, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / 'export_onnx.py'), '--checkpoint_path', str(training_checkpoint),
                           '--output-dir', str(tmp_path / 'export')], cwd=tmp_path, env=script_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ['exporting', 'GFLOPs', 'check', 'wrote'], proc.stdout[-3000:]
    assert proc.stderr.strip() == ''


# ------------------------------------------------------------------ defect 8 and the exited images' picture
def test_titles_fit_above_their_pair_and_img_path_names_the_trained_classes(training_checkpoint, data, tmp_path,
                                                                             caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / 'vis'
    code = visualize.main(['--resume', str(training_checkpoint), '--img-path', str(data / 'val' / 'class1'),
                           '--output-dir', str(out), '--threshold', '0', '--num-workers', '0', '--no-progress'])
    assert code == 0
    assert f'class names from the class folders of {data / "val"}' in caplog.text
    assert json.loads((out / 'summary.json').read_text())['exited'] == 2  # threshold 0: every image exits
    width = 2 * 96 + 4 + 16 - 10  # the space above one image pair at the default 96 px panels, as visualize.py sets
    names = ['American Staffordshire terrier, Staffordshire bullterrier'] * CLASSES
    details = Details(confidence=torch.tensor([0.6999999]), exited=torch.tensor([False]), coarse_pred=torch.tensor([1]),
                fine_pred=torch.tensor([2]), targets=torch.tensor([2]), important=[torch.tensor([0])],
                indices=torch.tensor([0]), unreadable=[])
    lines = visualize._title(details, 0, names, 0.7, 'some/very_long_file_name_of_a_holiday_photo.jpg', width)
    for text, _ in lines:
        assert visualize._text_px(text, 100) <= width, text
    assert lines[2][0].endswith('\u2713') and '\u2026' in lines[1][0]  # the name is cut, never the mark


# ------------------------------------------------------------------ frictions: warm-up, data-set name in the log
@pytest.mark.parametrize('epochs,sched_step,warns', [(1, 'epoch', True), (6, 'epoch', True), (7, 'epoch', False),
                                                     (5, 'next-epoch', True), (6, 'next-epoch', False)])
def test_a_run_shorter_than_its_warmup_is_warned_about(epochs, sched_step, warns, caplog):
    args = argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(
        ['--epochs', str(epochs), '--sched-step', sched_step])  # default --warmup-epochs 5
    build_scheduler(args, torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))
    assert ('the whole run is learning-rate warm-up' in caplog.text) == warns
    if warns:
        assert '--warmup-epochs 0' in caplog.text and f'the last epoch is {epochs - 1}' in caplog.text


def test_the_log_names_the_image_folder_not_imnet(data, caplog):
    from datasets.build import build_dataset
    caplog.set_level(logging.INFO)
    build_dataset(False, argparse.Namespace(data_path=str(data), data_set='IMNET', subset=None))
    assert f'validation split {data / "val"} (ImageFolder): 12 images, 6 classes' in caplog.text
    assert 'IMNET' not in caplog.text


# ------------------------------------------------------------------ issue 32 item 6: the epoch line says selection on/off
def test_the_epoch_line_says_whether_the_fine_stage_selected(data, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    code = main_deit.main(TINY + ['--data-path', str(data), '--device', 'cpu', '--num_workers', '0', '--batch-size',
                                  '4', '--epochs', '2', '--warmup-epochs', '0', '--selection-start-epoch', '0',
                                  '--output', str(tmp_path / 'run')])
    assert code == 0
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith('epoch 0: selection off | coarse top-1 ') for line in lines), lines
    assert any(line.startswith('epoch 1: selection on | coarse top-1 ') for line in lines), lines
    (note,) = [line for line in lines if line.startswith('informative selection from epoch 1: ')]
    assert '"selection off"' in note and '--eval' in note
    records = [json.loads(line) for line in (tmp_path / 'run' / 'log.txt').read_text().splitlines()]
    assert [r['informative_selection'] for r in records] == [False, True]
    assert "holds an earlier run's checkpoint" not in caplog.text
    caplog.clear()  # a new run into the same folder replaces the checkpoint, and says so
    assert main_deit.main(TINY + ['--data-path', str(data), '--device', 'cpu', '--num_workers', '0', '--batch-size',
                                  '4', '--epochs', '1', '--warmup-epochs', '0', '--output', str(tmp_path / 'run')]) == 0
    assert f"{tmp_path / 'run'} holds an earlier run's checkpoint: this new run starts over and replaces it" \
        in caplog.text


# ------------------------------------------------------------------ issue 32 item 7: one rule for default output folders
def test_visualize_makes_a_new_folder_per_run_as_dynamic_inference_does(training_checkpoint, data, tmp_path,
                                                                        monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    common = ['--resume', str(training_checkpoint), '--data-path', str(data), '--num-workers', '0', '--no-progress',
              '--num-images', '2']
    assert visualize.main(common) == 0
    assert visualize.main(common) == 0  # the same second, most likely: still a folder of its own
    folders = sorted((tmp_path / 'output' / 'visualize').iterdir())
    assert len(folders) == 2, folders
    for folder in folders:
        assert folder.name.startswith('cf_deit_tiny_g3_'), folder.name
        assert (folder / 'summary.json').is_file() and (folder / 'confidence_histogram.png').is_file()
    caplog.clear()
    caplog.set_level(logging.INFO)
    assert visualize.main(common + ['--output-dir', str(folders[0])]) == 0  # named: used as given, and it says so
    assert "holds an earlier run's pictures: this run replaces them" in caplog.text
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data), '--checkpoint_path',
                                   str(training_checkpoint), '--num-workers', '0']) == 0
    assert dynamic_inference.main(['--eval-mode', '0', '--data_url', str(data), '--checkpoint_path',
                                   str(training_checkpoint), '--num-workers', '0']) == 0
    assert len(list((tmp_path / 'output' / 'dynamic_inference').iterdir())) == 2


def test_new_run_folder_never_returns_an_existing_folder(tmp_path):
    from utils.common.run_folder import new_run_folder
    first = new_run_folder('visualize', 'm_g3', root=tmp_path)
    first.mkdir(parents=True)
    second = new_run_folder('visualize', 'm_g3', root=tmp_path)
    assert second != first and not second.exists() and second.parent == first.parent
    assert second.name.startswith('m_g3_')


# ------------------------------------------------------------------ issue 32 item 11: the small mismatches
def test_img_path_names_classes_as_data_path_does(tmp_path):
    """--img-path takes the names of the data the checkpoint was trained on as --data-path shows them: a
    classes.txt at its root ('ring'), not the folder name ('1_ring')."""
    from datasets.synthetic import SYNTHETIC_CLASSES
    synthetic = visualize._trained_classes({'args': argparse.Namespace(data_set='IMNET', data_path='')})
    assert synthetic[1] == ['circle', 'ring', 'square', 'frame', 'triangle', 'cross']
    root = tmp_path / 'shapes'
    for c in SYNTHETIC_CLASSES:
        (root / 'val' / c).mkdir(parents=True)
    args = argparse.Namespace(data_set='IMNET', data_path=str(root))
    assert visualize._trained_classes({'args': args})[1] == list(SYNTHETIC_CLASSES)  # no classes.txt: the folders
    (root / 'classes.txt').write_text('# folder\tindex\tname\n' + ''.join(
        f'{c}\t{i}\t{c[2:]}\n' for i, c in enumerate(SYNTHETIC_CLASSES)))  # as datasets/synthetic.py writes it
    assert visualize._trained_classes({'args': args})[1][1] == 'ring'


def test_quickstart_passes_each_flag_once_and_says_where_the_data_came_from():
    import quickstart
    assert quickstart.RECIPE_ARGS.count('--batch-size') == 0  # the quick start's --batch-size is passed once
    source = (ROOT / 'quickstart.py').read_text()
    assert "'reused: written by an earlier run' if reused else 'written now'" in source


def test_the_synthetic_data_line_is_logged_once_per_run(tmp_path, monkeypatch, caplog):
    from datasets.build import build_dataset
    monkeypatch.setenv('CFVIT_DATA_DIR', str(tmp_path))
    caplog.set_level(logging.INFO)
    args = argparse.Namespace(data_path='', data_set='IMNET', subset=8)
    from datasets.synthetic import make_synthetic_dataset
    monkeypatch.setattr('datasets.synthetic.make_synthetic_dataset',
                        lambda: make_synthetic_dataset(tmp_path / "tiny", n_train=24, n_val=60))
    build_dataset(True, args)
    build_dataset(False, args)
    assert caplog.text.count('no --data-path given: using the built-in synthetic shapes dataset') == 1


def test_dynamic_inference_help_keeps_its_line_break():
    assert '--batch_size N \\\n        --model cf_deit_small' in dynamic_inference.__doc__


# ------------------------------------------------------------------ issue 32 item 12: a clean test summary
PROVOKED = '''
import warnings

import torch


def test_provokes_the_framework_warnings_and_one_of_ours():
    warnings.warn('`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`.',
                  FutureWarning)
    warnings.warn('You are using the legacy TorchScript-based ONNX export. Starting in PyTorch 2.9, ...',
                  DeprecationWarning)
    warnings.warn('Converting a tensor to a Python boolean might cause the trace to be incorrect.',
                  torch.jit.TracerWarning)
    warnings.warn('# The axis name: batch will not be used, since it shares the same shape constraints', UserWarning)
    warnings.warn('NOTE: The nodes obtained by tracing the model in train mode are a subsequence', UserWarning)
    warnings.warn('the whole run is learning-rate warm-up (a warning of this project)', UserWarning)
    warnings.warn('TorchScript is fine here, this one is ours too', FutureWarning)
'''


def test_pytest_filters_framework_warnings_and_keeps_the_projects(tmp_path):
    (tmp_path / 'test_provoked.py').write_text(PROVOKED)
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', '-c',
                           str(ROOT / 'pytest.ini'), '--rootdir', str(tmp_path), str(tmp_path / 'test_provoked.py')],
                          cwd=tmp_path, env=script_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert '1 passed, 2 warnings' in proc.stdout, proc.stdout[-3000:]
    assert 'a warning of this project' in proc.stdout and 'this one is ours too' in proc.stdout
    for framework in ('is deprecated. Please switch', 'legacy TorchScript-based', 'Converting a tensor',
                      'The axis name', 'The nodes obtained'):
        assert framework not in proc.stdout


# ------------------------------------------------------------------ issue 32 item 2: shared cores
def test_a_cpu_run_on_busy_cores_hints_at_fewer_threads(monkeypatch):
    from utils.common import flags
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(flags, 'available_cores', lambda: 2)
    hint = flags.busy_cpu_hint('cpu', threads=2, load=3.0)
    assert hint.startswith('the CPUs are busy with other work (load average 3.0 on 2 cores) and torch runs 2 threads')
    assert 'OMP_NUM_THREADS=1' in hint and 'docs/training.md, "On shared CPUs"' in hint
    assert flags.busy_cpu_hint('cpu', threads=2, load=0.5) is None  # idle cores: nothing to say
    assert flags.busy_cpu_hint('cpu', threads=1, load=3.0) is None  # one thread already
    assert flags.busy_cpu_hint('cuda', threads=2, load=3.0) is None
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    assert flags.busy_cpu_hint('cpu', threads=2, load=3.0) is None  # the user chose
    doc = (ROOT / 'docs' / 'training.md').read_text()
    assert '## On shared CPUs' in doc and 'OMP_NUM_THREADS=1' in doc
