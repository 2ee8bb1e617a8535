"""The CUDA risks of issue 25 that can be checked without a GPU (torch.cuda mocked where needed)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from helpers import free_port

from utils.common import dist as cfdist


@pytest.fixture
def launch_env(monkeypatch):
    for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT', 'SLURM_PROCID', 'SLURM_NTASKS',
                'SLURM_LOCALID', 'TORCHELASTIC_RESTART_COUNT'):
        # set, then delete: monkeypatch then restores the variable's absence too, also after the code under
        # test set it itself (the SLURM path exports RANK/WORLD_SIZE/LOCAL_RANK for the process group)
        monkeypatch.setenv(key, '')
        monkeypatch.delenv(key)
    return monkeypatch


def test_a_launchers_single_process_gets_a_process_group(launch_env):
    """torchrun --nproc_per_node=1: RANK=0, WORLD_SIZE=1 and a rendezvous: a (gloo) process group, not none."""
    for key, value in dict(RANK='0', WORLD_SIZE='1', LOCAL_RANK='0', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT=str(free_port())).items():
        launch_env.setenv(key, value)
    info = cfdist.init_distributed('cpu')
    try:
        assert info.distributed and info.world_size == 1 and info.backend == 'gloo'
        assert dist.is_initialized() and dist.get_world_size() == 1
    finally:
        dist.destroy_process_group()


def test_rank_zero_world_one_without_a_launcher_stays_one_process(launch_env):
    launch_env.setenv('RANK', '0')
    launch_env.setenv('WORLD_SIZE', '1')
    info = cfdist.init_distributed('cpu')
    assert not info.distributed and not dist.is_initialized()


class _FakeCuda:
    """torch.cuda of a node that shows this task ``count`` GPUs; records set_device and init_process_group."""

    def __init__(self, monkeypatch, count):
        self.set = []
        self.init = []
        monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)
        monkeypatch.setattr(torch.cuda, 'set_device', lambda dev: self.set.append(torch.device(dev)))
        monkeypatch.setattr(cfdist.dist, 'init_process_group', lambda **kw: self.init.append(kw))
        monkeypatch.setattr(cfdist.dist, 'barrier', lambda: None)


@pytest.mark.parametrize('visible,local,expected', [(1, 3, 0), (4, 3, 3), (2, 3, 1)])
def test_slurm_cuda_index_is_the_local_id_modulo_the_visible_gpus(launch_env, visible, local, expected):
    """As DeiT: a cluster that shows each task only its own GPU (1 visible, local id 3) uses cuda:0, where
    the local id used as the index failed; NCCL's process group is bound to that device (device_id)."""
    for key, value in dict(SLURM_PROCID=str(4 + local), SLURM_NTASKS='8', SLURM_LOCALID=str(local),
                           MASTER_ADDR='127.0.0.1', MASTER_PORT='29500').items():
        launch_env.setenv(key, value)
    fake = _FakeCuda(launch_env, visible)
    info = cfdist.init_distributed('cuda')
    assert info.device == torch.device('cuda', expected) and info.backend == 'nccl'
    assert fake.set == [torch.device('cuda', expected)]
    assert fake.init[0]['device_id'] == torch.device('cuda', expected)


def test_torchrun_oversubscription_still_refused(launch_env):
    for key, value in dict(RANK='3', WORLD_SIZE='4', LOCAL_RANK='3', MASTER_ADDR='127.0.0.1',
                           MASTER_PORT='29500').items():
        launch_env.setenv(key, value)
    _FakeCuda(launch_env, 2)
    with pytest.raises(cfdist.DistributedSetupError, match='local rank 3 but only 2 GPUs are visible'):
        cfdist.init_distributed('cuda')


# ---------------------------------------------------------------------------------------------- DDP fail fast
def _lvvit_torchrun(tmp_path, fault, timeout=240):
    import subprocess
    import sys
    from pathlib import Path

    from helpers import TINY_LVVIT, make_image_folder, script_env
    root = Path(__file__).resolve().parents[1]
    data = make_image_folder(tmp_path / 'data', {'train': 6, 'val': 2}, 3)
    argv = list(TINY_LVVIT)
    argv[argv.index('-b') + 1] = '2'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={free_port()}',
           'main_lvvit.py', *argv, '--no-repeated-aug', '--dist-timeout', '3', '--data-path', str(data),
           '--debug-fault', fault]
    try:
        return subprocess.run(cmd, cwd=root, env=script_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f'the job hung (no step agreement) for {timeout} s:\n{(e.stderr or b"")[-4000:]!r}')


@pytest.mark.parametrize('kind', ['data', 'forward'])
def test_cf_lvvit_ddp_failure_of_one_process_stops_both_at_the_step(tmp_path, kind):
    """CF-LV-ViT (BatchNorm buffers: DDP broadcasts them in every forward) on gloo, 2 processes; process 1
    fails at epoch 0 step 1, before (data) or inside (forward) the DDP forward: both stop at that step, within
    seconds, process 0 naming process 1's message (no collective mismatch, no wait for --dist-timeout)."""
    proc = _lvvit_torchrun(tmp_path, f'1:0:1:{kind}')
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if ' ERROR ' in line]
    expected = ('32 images in a row could not be read' if kind == 'data' else 'expected the fine images as')
    assert any(f'process 1 stopped the run at epoch 0, step 1: {expected}' in line for line in errors), \
        proc.stderr[-4000:]
    assert f'exitcode: {2 if kind == "data" else 1}' in proc.stderr


# ---------------------------------------------------------------------------------------------- precision flags
def test_tf32_switch_sets_and_reports_both_flags():
    from utils.common.precision import describe_float32, set_tf32, tf32_state
    saved = tf32_state()
    try:
        set_tf32(True)
        assert tf32_state() == {'matmul': True, 'cudnn_conv': True}
        assert describe_float32(True) == ('float32 on CUDA: matmuls in TF32, cuDNN convolutions in TF32 (--tf32)')
        set_tf32(False)
        assert tf32_state() == {'matmul': False, 'cudnn_conv': False}
        assert 'matmuls in IEEE float32, cuDNN convolutions in IEEE float32 (--no-tf32)' in describe_float32(False)
        set_tf32(None)  # leaves what is there
        assert tf32_state() == {'matmul': False, 'cudnn_conv': False}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved['matmul']
        torch.backends.cudnn.allow_tf32 = saved['cudnn_conv']


@pytest.mark.parametrize('capability,refused', [((7, 0), True), ((7, 5), True), ((8, 0), False), ((9, 0), False)])
def test_bfloat16_autocast_refused_on_gpus_without_it(monkeypatch, capability, refused):
    from utils.common.precision import check_amp_dtype
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda index=None: 'Tesla V100-SXM2-16GB')
    dev = torch.device('cuda', 0)
    check_amp_dtype(torch.float16, dev)  # float16 always fine
    check_amp_dtype(torch.bfloat16, torch.device('cpu'))
    if refused:
        with pytest.raises(ValueError, match=r'Tesla V100-SXM2-16GB \(compute capability 7\.\d\) has no native '
                                             r'bfloat16 .*use --amp-dtype float16'):
            check_amp_dtype(torch.bfloat16, dev)
    else:
        check_amp_dtype(torch.bfloat16, dev)


# ---------------------------------------------------------------------------------------------- compile
@torch.no_grad()
def test_compiled_early_exit_with_dynamic_shapes_does_not_recompile_per_row_count():
    """What dynamic_inference --compile does in mode 2 (dynamic=True): after the first batches, new numbers of
    rows going on to the fine stage compile nothing more (the 'eager' backend here: no C++ build needed)."""
    import timm
    from torch._dynamo.utils import counters

    import models  # noqa: F401
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_tiny', coarse_stage_size=2, embed_dim=48, depth=2, num_heads=3,
                              num_classes=4).eval()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    conf = model.forward_details(x).confidence.sort().values
    expected = {}
    for n_go_on in (2, 3, 5, 6):  # thresholds between the confidences: 8 - n_go_on rows exit
        expected[n_go_on] = float((conf[n_go_on - 1] + conf[n_go_on]) / 2)
    eager = {n: model.forward_details(x, t) for n, t in expected.items()}
    model.compile_stages(backend='eager', dynamic=True)
    counters.clear()
    model.forward_details(x, expected[2])  # one warm-up batch (without dynamic=True the next row count recompiles)
    frames_after_warmup = counters['stats']['unique_graphs']
    for n, t in expected.items():
        out = model.forward_details(x, t)
        assert int((~out.exited).sum()) == n
        torch.testing.assert_close(out.fine_logits, eager[n].fine_logits)
    assert counters['stats']['unique_graphs'] == frames_after_warmup
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------- training flags
def _train_args(argv):
    import argparse

    from utils.train.args import get_args_parser
    return argparse.ArgumentParser(parents=[get_args_parser()]).parse_args(argv)


def test_training_deterministic_sets_cublas_workspace_and_tf32_is_reported(monkeypatch, caplog):
    """--deterministic on CUDA sets CUBLAS_WORKSPACE_CONFIG when the environment has none (keeps the user's);
    --no-tf32 is applied and logged (the device is only named: nothing runs on it)."""
    import logging

    from utils.train import setup as train_setup
    from utils.common.precision import tf32_state
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.delenv('CUBLAS_WORKSPACE_CONFIG', raising=False)
    for key in ('RANK', 'WORLD_SIZE', 'SLURM_PROCID'):
        monkeypatch.delenv(key, raising=False)
    saved = (torch.backends.cudnn.benchmark, tf32_state(), torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.setattr(train_setup, 'setup_logging', lambda main: None)
    try:
        with caplog.at_level(logging.INFO):
            info, device, _ = train_setup.setup_process(_train_args(['--device', 'cuda', '--deterministic',
                                                                     '--no-tf32']))
        assert device == torch.device('cuda') and os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':4096:8'
        assert torch.backends.cudnn.benchmark is False
        assert tf32_state() == {'matmul': False, 'cudnn_conv': False}
        assert 'float32 on CUDA: matmuls in IEEE float32, cuDNN convolutions in IEEE float32 (--no-tf32)' in caplog.text
        monkeypatch.setenv('CUBLAS_WORKSPACE_CONFIG', ':16:8')
        train_setup.setup_process(_train_args(['--device', 'cuda', '--deterministic']))
        assert os.environ['CUBLAS_WORKSPACE_CONFIG'] == ':16:8'
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.backends.cuda.matmul.allow_tf32 = saved[1]['matmul']
        torch.backends.cudnn.allow_tf32 = saved[1]['cudnn_conv']
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def test_training_refuses_bfloat16_on_a_gpu_without_it(monkeypatch):
    from utils.common.errors import ConfigError
    from utils.common.precision import training_amp
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.version, 'hip', None)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda index=None: (7, 5))
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda index=None: 'Tesla T4')
    with pytest.raises(ConfigError, match='Tesla T4 .* has no native bfloat16'):
        args = _train_args(['--device', 'cpu', '--amp', '--amp-dtype', 'bfloat16'])
        training_amp(args.amp, args.amp_dtype, torch.device('cuda', 0))


# ---------------------------------------------------------------------------------------------- mid-epoch resume
def test_mid_epoch_rng_state_resumes_with_another_number_of_visible_gpus(monkeypatch):
    """Written by a process that saw 4 GPUs, resumed by one that sees 1 (same world size): this process's own
    GPU generator is restored instead of refusing; a checkpoint without it is still refused in one line."""
    from utils.common.errors import CheckpointError
    from utils.train.checkpointing import capture_rng_state, restore_rng_state
    own = torch.tensor([7], dtype=torch.uint8)
    calls = {}
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    every = [torch.tensor([i], dtype=torch.uint8) for i in range(4)]
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: every)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda device='cuda': own)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', lambda states: calls.setdefault('all', states))
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda state, device='cuda': calls.setdefault('one', state))
    state = capture_rng_state()
    assert len(state['cuda']) == 4 and torch.equal(state['cuda_current'], own)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    restore_rng_state(state)
    assert torch.equal(calls['one'], own) and 'all' not in calls
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 4)
    restore_rng_state(state)
    assert len(calls['all']) == 4
    old = dict(state)
    del old['cuda_current']
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(CheckpointError, match='written with 4 visible GPUs per process, this run sees 2'):
        restore_rng_state(old)


# ---------------------------------------------------------------------------------------------- FLOPs
def test_batch_norm_has_a_formula_for_every_kernel_it_may_dispatch_to():
    """On CUDA BatchNorm runs cuDNN's kernel (MIOpen's on ROCm), which torch's counter has no formula for: without
    one, CF-LV-ViT's GFLOPs on a GPU came out lower than on the CPU. (The CUDA tier compares both devices.)"""
    from utils.inference.flops import _batch_norm_flop, _custom_mapping
    aten = torch.ops.aten
    mapping = _custom_mapping()
    for op in (aten.cudnn_batch_norm, aten.miopen_batch_norm, aten._native_batch_norm_legit_no_training,
               aten._batch_norm_no_update):
        assert mapping[op] is _batch_norm_flop
    assert _batch_norm_flop((2, 64, 56, 56), (64,), (64,)) == 2 * 2 * 2 * 64 * 56 * 56
