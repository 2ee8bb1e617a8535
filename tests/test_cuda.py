"""The CUDA tier: ``pytest -m cuda tests`` runs exactly the tests marked ``cuda`` (skipped, with the reason,
where no GPU is visible). Most tests here are parametrized over devices: the ``cpu`` cases run in the ordinary
suite, so everything that does not need a GPU is proven on every machine; the ``cuda`` cases are the tier.

- the four released configurations (CF-DeiT and CF-LV-ViT, 7x7 and 9x9, the golden cases' weights) on the
  device in float32 against a CPU float64 reference: coarse logits, class attention, the selected patches
  (where float64's k-th and (k+1)-th patches are not within the run's rounding of a tie), fine logits,
  early exit with all, some and no rows exiting, batch 1;
- autocast float16 and bfloat16 forward and backward (the class-attention row float32); GradScaler;
- a DistributedDataParallel training step through ``utils.train.engine.train_one_epoch`` (one spawned process:
  NCCL on CUDA, gloo on CPU), with CF-LV-ViT's BatchNorm buffers;
- a checkpoint saved from the device loads on the CPU;
- mode 2's timing records its CUDA events on the model's device (a mock on CPU; real events on a GPU);
- ``compile_stages()`` (inductor on CUDA) gives the eager results; per-stage GFLOPs equal on every device.
"""
from __future__ import annotations

import copy
import time

import pytest
import timm
import torch
import torch.nn.functional as F

from helpers import build_from_config, free_port, golden_case_files, load_case

import models  # noqa: F401  (registers the models)
from utils.inference import predict as inference
from utils.common.precision import AmpConfig
from utils.train.engine import _backward_step



@pytest.fixture(autouse=True)
def cpu_cases_on_one_thread(request):
    """CPU cases run on one thread (tiny models, shared cores); the CUDA cases keep every core for their
    float64 CPU references."""
    if request.node.get_closest_marker('cuda') is not None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

CUDA = pytest.mark.cuda
DEVICES = ['cpu', pytest.param('cuda', marks=CUDA)]
TINY = dict(embed_dim=48, depth=4, num_heads=3, num_classes=5)


def tiny(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, coarse_stage_size=kwargs.pop('g', 7), **dict(TINY, **kwargs))


def images(model, batch: int, seed: int = 1) -> torch.Tensor:
    s = model.img_size_list[1]
    return torch.randn(batch, 3, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def ieee_float32():
    """IEEE float32 on the GPU (cuDNN convolutions default to TF32: errors of ~1e-3 in CF-LV-ViT's stem)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _decided_rows(out_attn: torch.Tensor, ref_attn: torch.Tensor, k: int) -> torch.Tensor:
    """(B,) rows whose top-k set cannot change within the run's error: the reference's k-th and (k+1)-th
    attention differ by more than twice the largest difference between the two maps."""
    top = ref_attn.sort(dim=1, descending=True).values
    gap = top[:, k - 1] - top[:, k]
    err = (out_attn.double() - ref_attn.double()).abs().max(dim=1).values
    return gap > 2 * err + 1e-9


def _same_set(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort().values, b.sort().values)


# ------------------------------------------------------------------ the released configurations
# on the CPU the CF-DeiT cases only: CF-LV-ViT's convolutional stem in float64 takes ~40 s per case there
RELEASED = [pytest.param(f, d, id=f'{f.stem}-{d}', marks=[CUDA] if d == 'cuda' else [])
            for f in golden_case_files() for d in ('cpu', 'cuda') if d == 'cuda' or f.stem.startswith('deit')]


@pytest.mark.parametrize('case_file,device', RELEASED)
@torch.no_grad()
def test_released_configuration_against_float64(case_file, device, ieee_float32):
    case = load_case(case_file)
    model = build_from_config(case['config'])
    model.load_state_dict(case['state_dict'], strict=True)
    model.eval()
    x_f = case['x_fine_int8'].to(torch.float32) / case['x_fine_scale']
    x_c = case['x_coarse']  # the release's coarse images (derived in float32 they differ from float64's)
    ref_model = copy.deepcopy(model).double()
    ref_x = [x_c.double(), x_f.double()]
    ref = ref_model.forward_details(ref_x)
    model = model.to(device)
    dev_x = [x_c.to(device), x_f.to(device)]
    out = model.forward_details(dev_x)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.coarse_logits.cpu().double(), ref.coarse_logits, **tol)
    torch.testing.assert_close(out.cls_attn.cpu().double(), ref.cls_attn, rtol=0, atol=1e-5)
    assert out.cls_attn.dtype == torch.float32
    k = model.num_informative
    decided = _decided_rows(out.cls_attn.cpu(), ref.cls_attn, k)
    assert int(decided.sum()) >= 1
    for i in torch.nonzero(decided).flatten().tolist():
        assert _same_set(out.important_coarse_index[i].cpu(), ref.important_coarse_index[i]), i
        torch.testing.assert_close(out.fine_logits[i].cpu().double(), ref.fine_logits[i], **tol)

    # early exit: all, some and no rows exiting, thresholds between float64 confidences
    conf = ref.confidence.double().sort().values
    gaps = conf[1:] - conf[:-1]
    j = int(gaps.argmax())
    assert gaps[j] > 1e-4, 'the golden confidences are too close to split'
    some = float((conf[j] + conf[j + 1]) / 2)
    for threshold, expect in ((0.0, 'all'), (some, 'some'), (float('inf'), 'none')):
        r = ref_model.forward_details(ref_x, threshold)
        o = model.forward_details(dev_x, threshold)
        n = int(o.exited.sum())
        assert {'all': n == len(x_f), 'some': 0 < n < len(x_f), 'none': n == 0}[expect], (expect, n)
        assert torch.equal(o.exited.cpu(), r.exited)
        rows = decided | r.exited  # an exiting row's prediction does not depend on the selection
        torch.testing.assert_close(o.fine_logits.cpu().double()[rows], r.fine_logits[rows], **tol)
        # batch 1: each row alone gives what it gives in the batch (rows whose selection is not a tie)
        decided_rows = torch.nonzero(rows).flatten().tolist()
        for i in {decided_rows[0], decided_rows[-1]}:
            alone = model.forward_details([t[i:i + 1] for t in dev_x], threshold)
            assert bool(alone.exited[0]) == bool(o.exited[i])
            torch.testing.assert_close(alone.fine_logits[0], o.fine_logits[i], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ mixed precision
AMP = [pytest.param('cpu', torch.bfloat16, id='cpu-bfloat16'),
       pytest.param('cuda', torch.float16, marks=CUDA, id='cuda-float16'),
       pytest.param('cuda', torch.bfloat16, marks=CUDA, id='cuda-bfloat16')]


def _skip_without_bf16(device, dtype):
    if device == 'cuda' and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f'{torch.cuda.get_device_name()} has no native bfloat16')


@pytest.mark.parametrize('device,dtype', AMP)
@pytest.mark.parametrize('name', ['cf_deit_tiny', 'cf_lvvit_tiny'])
def test_amp_forward_and_backward(name, device, dtype):
    _skip_without_bf16(device, dtype)
    model = tiny(name).to(device)
    x = images(model, 4).to(device)
    y = torch.arange(4, device=device) % TINY['num_classes']
    model.eval()
    with torch.no_grad():
        ref = model.forward_details(x)
        with torch.autocast(device, dtype=dtype):
            out = model.forward_details(x, 0.5)
    assert out.coarse_logits.dtype == dtype and out.cls_attn.dtype == torch.float32
    torch.testing.assert_close(out.coarse_logits.float(), ref.coarse_logits, rtol=0.1, atol=0.15)
    model.train()
    with torch.autocast(device, dtype=dtype):
        coarse, fine = model.forward_stages(x)
        loss = F.cross_entropy(coarse.float(), y) + F.cross_entropy(fine.float(), y)
    assert coarse.dtype == fine.dtype == dtype
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert len(grads) > 0.9 * sum(1 for p in model.parameters() if p.requires_grad)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize('device,dtype', AMP[:2])
def test_grad_scaler_step_and_skipped_step(device, dtype):
    model = tiny('cf_deit_tiny').to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    amp = AmpConfig(dtype, torch.amp.GradScaler(device, init_scale=2.0 ** 10, growth_interval=1000))
    x = images(model, 2).to(device)
    y = torch.zeros(2, dtype=torch.long, device=device)

    def loss_of(factor: float) -> torch.Tensor:
        with amp.autocast(torch.device(device)):
            coarse, fine = model.forward_stages(x)
            return (F.cross_entropy(coarse.float(), y) + F.cross_entropy(fine.float(), y)) * factor

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad(set_to_none=True)
    _backward_step(loss_of(1.0), opt, model, amp, clip_grad=1.0, clip_mode='norm')
    assert amp.scaler.get_scale() == 2.0 ** 10
    moved = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, moved))
    assert all(torch.isfinite(p).all() for p in moved)
    opt.zero_grad(set_to_none=True)
    _backward_step(loss_of(float('inf')), opt, model, amp, clip_grad=None, clip_mode='norm')
    assert amp.scaler.get_scale() == 2.0 ** 9  # an overflow halves the scale and skips the step
    assert all(torch.equal(a, b) for a, b in zip(moved, model.parameters()))


# ------------------------------------------------------------------ DDP
def _ddp_worker(rank: int, device: str, port: int, result: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import models  # noqa: F401
    from utils.train.engine import TrainStep, train_one_epoch
    torch.set_num_threads(1)
    dev = torch.device('cuda', 0) if device == 'cuda' else torch.device('cpu')
    backend = 'nccl' if device == 'cuda' else 'gloo'
    kwargs = dict(device_id=dev) if device == 'cuda' else {}
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=1, **kwargs)
    try:
        torch.manual_seed(0)
        model = timm.create_model('cf_lvvit_tiny', coarse_stage_size=7, **TINY).to(dev)  # BatchNorm buffers
        ddp = DDP(model, device_ids=[dev] if device == 'cuda' else None)
        s = model.img_size_list[1]
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(2, 3, s, s, generator=g), torch.tensor([0, 1])) for _ in range(2)]
        amp = AmpConfig(torch.float16, torch.amp.GradScaler('cuda')) if device == 'cuda' else AmpConfig()
        before = [p.detach().clone() for p in model.parameters()]

        def criterion(outputs, targets):
            return sum(F.cross_entropy(o.float(), targets) for o in outputs)
        opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
        stats = train_one_epoch(TrainStep(ddp, criterion, opt, amp=amp), batches, dev, 0, progress=False, print_freq=0)
        changed = sum(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        torch.save({'loss': stats['loss'], 'changed': changed, 'backend': dist.get_backend()}, result)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize('device', DEVICES)
def test_ddp_training_step(device, tmp_path):
    import torch.multiprocessing as mp
    result = str(tmp_path / 'result.pt')
    mp.spawn(_ddp_worker, args=(device, free_port(), result), nprocs=1, join=True)
    out = torch.load(result, weights_only=True)
    assert out['backend'] == ('nccl' if device == 'cuda' else 'gloo')
    assert out['loss'] == out['loss'] and out['loss'] > 0  # finite
    assert out['changed'] > 0


# ------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize('device', DEVICES)
@torch.no_grad()
def test_checkpoint_saved_on_the_device_loads_on_cpu(device, tmp_path):
    from utils.common.checkpoint import load_model_weights
    from utils.common.atomic import save_atomic
    model = tiny('cf_lvvit_tiny').to(device).eval()
    x = images(model, 2)
    expected = model.forward_details(x.to(device), 0.5).fine_logits.cpu()
    save_atomic({'model': model.state_dict()}, tmp_path / 'ckpt.pth')
    raw = torch.load(tmp_path / 'ckpt.pth', map_location='cpu', weights_only=True)
    assert {t.device.type for t in raw['model'].values()} == {'cpu'}
    cpu_model = timm.create_model('cf_lvvit_tiny', coarse_stage_size=7, **TINY).eval()
    load_model_weights(cpu_model, tmp_path / 'ckpt.pth')
    torch.testing.assert_close(cpu_model.forward_details(x, 0.5).fine_logits, expected, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ mode 2's timing
class _Recorder:
    """Stand-ins for torch.cuda's events, streams, synchronize and device context, recording devices."""

    def __init__(self):
        self.devices = []
        self.current = []

    def install(self, monkeypatch):
        rec = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing

            def record(self, stream=None):
                rec.devices.append(('record', stream[1] if stream else None, rec.current[-1] if rec.current else None))

            def elapsed_time(self, other):
                return 5.0

        class DeviceContext:
            def __init__(self, dev):
                self.dev = torch.device(dev)

            def __enter__(self):
                rec.current.append(self.dev)

            def __exit__(self, *exc):
                rec.current.pop()

        monkeypatch.setattr(torch.cuda, 'Event', Event)
        monkeypatch.setattr(torch.cuda, 'device', DeviceContext)
        monkeypatch.setattr(torch.cuda, 'current_stream', lambda dev=None: ('stream', torch.device(dev)))
        monkeypatch.setattr(torch.cuda, 'synchronize', lambda dev=None: rec.devices.append(('sync', dev, None)))


def test_mode2_timing_records_on_the_models_device(monkeypatch):
    """The model sits on cuda:1 while cuda:0 is current: every event, stream and synchronize names cuda:1,
    and the forward runs with cuda:1 current (torch.cuda is mocked; the model really runs on the CPU)."""
    model = tiny('cf_deit_tiny').eval()
    model_dev = torch.device('cuda', 1)
    assert inference.model_device(model, torch.device('cuda', 0)) == torch.device('cpu')
    assert inference.model_device(torch.nn.ReLU(), torch.device('cuda', 0)) == torch.device('cuda', 0)
    monkeypatch.setattr(inference, 'model_device', lambda m, default: model_dev)
    seen = []
    real_forward = model.forward_details

    def forward_details(*args, **kwargs):
        seen.append(list(rec.current))
        return real_forward(*args, **kwargs)
    model.forward_details = forward_details
    rec = _Recorder()
    rec.install(monkeypatch)
    loader = [(images(model, 2, seed=i), torch.tensor([0, 1])) for i in range(3)]
    res = inference.timed_early_exit(model, loader, torch.device('cpu'), 0.5, warmup_batches=1)
    assert res.timed_images == 4 and res.seconds == pytest.approx(0.010)
    assert seen == [[model_dev]] * 3
    records = [d for d in rec.devices if d[0] == 'record']
    syncs = [d for d in rec.devices if d[0] == 'sync']
    assert len(records) == 6 and len(syncs) == 6
    assert all(stream == model_dev and current == model_dev for _, stream, current in records)
    assert all(torch.device(dev) == model_dev for _, dev, _ in syncs)


@CUDA
@torch.no_grad()
def test_mode2_cuda_events_time_the_whole_forward_on_the_models_device():
    """On the last visible GPU (cuda:1 when there are two, while cuda:0 is current): the events' time of each
    batch is close to the synchronized wall time of the same forward, not a fraction of it."""
    dev = torch.device('cuda', torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    model = timm.create_model('cf_deit_small', num_classes=10).to(dev).eval()
    x = images(model, 64)
    loader = [(x, torch.zeros(64, dtype=torch.long))] * 4
    res = inference.timed_early_exit(model, loader, dev, 2.0, warmup_batches=2)  # nothing exits
    torch.cuda.synchronize(dev)
    xd = x.to(dev)
    walls = []
    for _ in range(3):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        model.forward_details(xd, 2.0)
        torch.cuda.synchronize(dev)
        walls.append(time.perf_counter() - t0)
    assert res.timed_images == 128
    assert min(res.batch_seconds) > 0.5 * min(walls), (res.batch_seconds, walls)


# ------------------------------------------------------------------ compile and FLOPs
@CUDA
@torch.no_grad()
def test_compiled_stages_on_cuda_give_the_eager_results():
    model = tiny('cf_deit_tiny').cuda().eval()
    x = images(model, 8).cuda()
    expected = model.forward_details(x, 0.5)
    model.compile_stages()
    for _ in range(2):
        got = model.forward_details(x, 0.5)
    assert torch.equal(got.exited, expected.exited)
    torch.testing.assert_close(got.fine_logits, expected.fine_logits, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('name', ['cf_deit_tiny', 'cf_lvvit_tiny'])
def test_stage_gflops_do_not_depend_on_the_device(name, device):
    from utils.inference.flops import stage_gflops
    model = tiny(name)
    on_cpu = stage_gflops(model)
    on_dev = stage_gflops(model.to(device))
    assert on_dev == pytest.approx(on_cpu, rel=1e-9)
