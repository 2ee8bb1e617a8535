"""The pure token functions against brute-force definitions."""
import pytest
import torch

from models.token_ops import (
    coarse_from_fine, fine_children, gather_tokens, num_informative, rank_coarse_patches,
    scatter_to_fine_grid, upsample_tokens,
)


def test_fine_children_layout_matches_release():
    # g = 7: coarse patch 0 -> fine 0, 1, 14, 15; coarse 8 (row 1, col 1) -> 30, 31, 44, 45
    idx = torch.tensor([[0, 8]])
    assert fine_children(idx, (7, 7)).tolist() == [[0, 30, 1, 31, 14, 44, 15, 45]]


@pytest.mark.parametrize('g', [3, 7, 9])
def test_fine_children_cover_the_fine_grid(g):
    fine = fine_children(torch.arange(g * g)[None], (g, g))
    assert sorted(fine[0].tolist()) == list(range(4 * g * g))
    # each child lies inside its parent's 2x2 block
    parent = torch.arange(g * g).repeat(4)
    assert torch.equal((fine[0] // (2 * g)) // 2 * g + (fine[0] % (2 * g)) // 2, parent)


def test_num_informative():
    assert (num_informative(49, 0.5), num_informative(81, 0.5), num_informative(49, 1.0)) == (25, 41, 49)
    with pytest.raises(ValueError):
        num_informative(49, 0.0)


def test_rank_and_gather():
    attn = torch.tensor([[0.1, 0.4, 0.2, 0.3]])
    imp, unimp = rank_coarse_patches(attn, 2)
    assert imp.tolist() == [[1, 3]] and unimp.tolist() == [[2, 0]]
    x = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    out = gather_tokens(x, torch.tensor([[3, 0], [1, 1]]))
    assert torch.equal(out, torch.stack([x[0, [3, 0]], x[1, [1, 1]]]))


def test_upsample_tokens_is_nearest_on_the_grid():
    x = torch.arange(6, dtype=torch.float32).reshape(1, 6, 1)  # 2x3 grid
    up = upsample_tokens(x, (2, 3)).reshape(4, 6)
    assert up.tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]


def test_scatter_to_fine_grid():
    g = 3
    torch.manual_seed(0)
    imp, unimp = rank_coarse_patches(torch.rand(2, g * g), 4)
    k = imp.shape[1]
    tokens = torch.randn(2, 4 * k + g * g - k, 5)
    out = scatter_to_fine_grid(tokens, imp, unimp, (g, g))
    assert out.shape == (2, 4 * g * g, 5)
    fine_imp = fine_children(imp, (g, g))
    for b in range(2):
        for j in range(4 * k):
            assert torch.equal(out[b, fine_imp[b, j]], tokens[b, j])
        for j, c in enumerate(unimp[b].tolist()):
            for child in fine_children(torch.tensor([[c]]), (g, g))[0].tolist():
                assert torch.equal(out[b, child], tokens[b, 4 * k + j])


def test_coarse_from_fine_keeps_batch_of_one():
    x = torch.randn(1, 3, 224, 224)
    y = coarse_from_fine(x, (112, 112))
    assert y.shape == (1, 3, 112, 112)
    assert torch.equal(y[0, :, 0, 0], x[0, :, 0, 0]) and torch.equal(y[0, :, -1, -1], x[0, :, -1, -1])
