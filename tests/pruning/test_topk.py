"""The sync-free selection kernels agree exactly with a stable sort: same kept set, same tie rule
(earlier position wins), NaN / inf ranked last, for the sort path, the radix path (float32 and
float64) and slices of a shared workspace."""
import pytest
import torch

from bip.pruning import topk


def reference(values: torch.Tensor, n_keep: int) -> torch.Tensor:
    keys = torch.where(torch.isfinite(values), values, torch.full_like(values, -1.0))
    order = torch.sort(keys, descending=True, stable=True).indices
    keep = torch.zeros(values.numel(), dtype=torch.bool)
    keep[order[:max(0, n_keep)]] = True
    return keep


def patterns(n: int, dtype, g):
    yield "random", torch.rand(n, generator=g, dtype=dtype)
    yield "ties", torch.randint(0, 5, (n,), generator=g).to(dtype)
    yield "all equal", torch.zeros(n, dtype=dtype)
    x = torch.rand(n, generator=g, dtype=dtype)
    x[torch.randperm(n, generator=g)[:3]] = float("nan")
    yield "3 nans", x
    x = torch.rand(n, generator=g, dtype=dtype)
    x[torch.randperm(n, generator=g)[: n // 2 + 7]] = float("nan")
    x[:5] = float("inf")
    yield "mostly nan, some inf", x
    x = torch.rand(n, generator=g, dtype=dtype) * 1e-39  # float32 subnormals
    x[::7] = 1e30
    yield "subnormal and huge", x


def select(sel, values, n_keep):
    """keys padded with topk.PAD to a multiple of CHUNK, as bip.pruning.masking lays them out."""
    n = values.numel()
    keys = torch.full((topk.padded(n),), topk.PAD, dtype=values.dtype)
    keys[:n] = values
    out = torch.empty(keys.numel(), dtype=torch.bool)
    sel.select(topk.rank_keys_(keys), n_keep, out)
    assert not out[n:].any()  # padding is never kept
    return out[:n]


@pytest.mark.parametrize("n", [500, 40_000])  # below / above topk.SORT_BELOW
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_matches_stable_sort(n, dtype):
    g = torch.Generator().manual_seed(n)
    sel = topk.TopK(topk.padded(n), dtype, torch.device("cpu"))
    for name, values in patterns(n, dtype, g):
        for n_keep in (1, 3, n // 3, n // 2 + 1, n - 4, n - 1, n):
            out = select(sel, values, n_keep)
            assert int(out.sum()) == n_keep, (name, n_keep)
            assert torch.equal(out, reference(values, n_keep)), (name, n_keep)


def test_select_on_slices_of_a_shared_workspace():
    g = torch.Generator().manual_seed(0)
    sel = topk.TopK(topk.padded(100_000), torch.float32, torch.device("cpu"))
    for n in (99_999, 33_000, 70_001, 4097 * 9, 4096 * 9):  # stale contents must not leak in
        values = torch.randint(0, 3, (n,), generator=g).float()
        assert torch.equal(select(sel, values, n // 3), reference(values, n // 3))


def test_three_nans_in_500_keep_the_requested_count():
    values = torch.rand(500)
    values[[3, 100, 499]] = float("nan")
    sel = topk.TopK(500, torch.float32, torch.device("cpu"))
    out = select(sel, values, 250)
    assert int(out.sum()) == 250 and not out[[3, 100, 499]].any()  # NaN ranks last
    out = select(sel, values, 498)
    assert int(out.sum()) == 498 and out[3] and not out[[100, 499]].any()  # earliest NaN first


def test_top_rows_per_row_budget_and_ties():
    keys = torch.tensor([[1.0, 3.0, 2.0, 2.0, 2.0, 0.0],
                         [float("nan"), 1.0, 1.0, topk.PAD, topk.PAD, topk.PAD]])
    kept = topk.top_rows(topk.rank_keys_(keys), torch.tensor([3, 2]))
    assert kept.tolist() == [[False, True, True, True, False, False],
                             [False, True, True, False, False, False]]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_keep_matches_stable_sort_per_group(n, m):
    g = torch.Generator().manual_seed(m)
    keys = torch.randint(0, 3, (6, 5 * m, 3, 3), generator=g).float()
    keys[0, :m, 0, 0] = float("nan")
    ranked = topk.rank_keys_(keys.clone())
    view = ranked.view(6, 5, m, 9)
    out = torch.empty(6, 5, m, 9, dtype=torch.bool)
    topk.nm_keep(view, n, out)
    groups = keys.view(6, 5, m, 9).permute(0, 1, 3, 2).reshape(-1, m)
    expected = torch.stack([reference(grp, n) for grp in groups]).view(6, 5, 9, m).permute(0, 1, 3, 2)
    assert torch.equal(out, expected)
    assert torch.all(out.sum(2) == n)
