"""The class-token attention row is float32 under autocast (bfloat16 on CPU here; the CUDA tier
repeats it in float16 and bfloat16 on a GPU)."""
import timm
import torch

import models  # noqa: F401  (registers the models)
from models.layers import ClsAttention, cls_attention_row


def _qk(seed=0, heads=6, n=50, hd=64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, n, hd, generator=g)
    k = torch.randn(2, heads, n, hd, generator=g)
    return q, k


def _ties(row: torch.Tensor) -> int:
    """Equal values in a (N,) row: N minus its number of distinct values."""
    return row.numel() - row.unique().numel()


@torch.no_grad()
def test_row_is_float32_under_autocast():
    q, k = _qk()
    ref = cls_attention_row(q, k, 64 ** -0.5)
    for q_in, k_in in ((q, k), (q.bfloat16(), k.bfloat16())):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            got = cls_attention_row(q_in, k_in, 64 ** -0.5)
        assert got.dtype == torch.float32
        if q_in.dtype == torch.float32:  # autocast did not touch it: bit-identical to float32
            assert torch.equal(got, ref)
        else:  # from the upcast bfloat16 q, k: as float32 computes it from those values
            assert torch.equal(got, cls_attention_row(q_in.float(), k_in.float(), 64 ** -0.5))
    for b in range(2):
        for h in range(6):
            assert _ties(got[b, h]) <= _ties(ref[b, h])


@torch.no_grad()
def test_release_switch_keeps_the_autocast_row():
    attn = ClsAttention(dim=48, num_heads=3).eval()
    x = torch.randn(2, 50, 48, generator=torch.Generator().manual_seed(0))
    _, ref = attn(x, return_cls_attn=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        _, doc = attn(x, return_cls_attn=True)
        attn.half_precision_cls_attn = True
        _, rel = attn(x, return_cls_attn=True)
    assert ref.dtype == doc.dtype == rel.dtype == torch.float32
    # the released AMP row is half-precision values (many ties), the documented one is not
    assert sum(_ties(r) for r in rel.flatten(0, 1)) > sum(_ties(r) for r in doc.flatten(0, 1))
    assert sum(_ties(r) for r in doc.flatten(0, 1)) <= sum(_ties(r) for r in ref.flatten(0, 1))
    # without autocast the switch changes nothing
    _, rel32 = attn(x, return_cls_attn=True)
    assert torch.equal(rel32, ref)
    # the model constructor sets it on every block
    model = timm.create_model('cf_deit_tiny', depth=2, half_precision_cls_attn=True)
    assert all(b.attn.half_precision_cls_attn for b in model.blocks)
    assert not any(b.attn.half_precision_cls_attn for b in timm.create_model('cf_deit_tiny', depth=2).blocks)


@torch.no_grad()
def test_bf16_selection_matches_float32_on_cf_deit_small(one_thread):
    """A random cf_deit_small under bfloat16 autocast selects float32's patches, except in rows
    whose k-th and (k+1)-th attention are closer than the bfloat16 run's error (a tie within rounding)."""
    torch.manual_seed(0)
    model = timm.create_model('cf_deit_small').eval()
    x = torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    ref = model.forward_details(x)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model.forward_details(x)
    assert out.cls_attn.dtype == torch.float32
    k = model.num_informative
    compared = 0
    for i in range(x.shape[0]):
        assert _ties(out.cls_attn[i]) <= _ties(ref.cls_attn[i])
        top = ref.cls_attn[i].sort(descending=True).values
        gap = float(top[k - 1] - top[k])
        err = float((out.cls_attn[i] - ref.cls_attn[i]).abs().max())
        if gap > 2 * err:
            compared += 1
            assert set(out.important_coarse_index[i].tolist()) == set(ref.important_coarse_index[i].tolist()), i
    assert compared >= 4, compared  # enough rows are decided, not ties
