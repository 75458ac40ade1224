"""Exact top-k selections as device ops only: the kernels behind the mask update.

Every function here runs without a device-to-host sync (no ``.item()``, ``int(tensor)``,
``nonzero``, boolean indexing, ``bincount`` or data-dependent shapes), so a GPU never waits for
the host in a training step; tests/test_sync.py proves it on CPU.

Order (the same everywhere): a larger key ranks first; NaN and +-inf rank below every finite
key (a non-finite score says nothing about importance, and ranking it last keeps the kept count
exact: 3 NaNs in 500 scores still keep exactly the requested count); among equal keys the
earlier position ranks first. Keys are non-negative (|scores|, norms); ``rank_keys_`` maps the
non-finite ones to -1 in place.

- ``TopK``: the n_keep largest of a long 1-D tensor. Small inputs: one stable sort. Large
  inputs: a radix select over the keys' IEEE bit patterns (non-negative floats order like their
  bits, and -1 orders below them as a signed integer): a 2^16-bin histogram per 16 bits of the
  key (``index_add_`` into fixed-size bins: 2 passes for float32, 4 for float64) finds the exact
  n_keep-th largest key as a 0-d tensor t; then keep = key > t, plus the first ``need`` entries
  equal to t, found with a cumulative count over the tied entries (per chunk of 4096 entries,
  then inside the one chunk that holds the last kept tie).
- ``top_rows``: per row of a [rows, units] matrix, the n_keep[row] largest (one stable sort for
  all filter / channel layers at once).
- ``nm_keep``: N of every group of M, by counting for each entry the group members that beat it.
"""
from __future__ import annotations

import torch

BINS = 1 << 16
SORT_BELOW = 1 << 15  # inputs shorter than this use one stable sort instead of the radix select
CHUNK = 4096          # tie resolution: entries per chunk of the cumulative tie count


def rank_keys_(keys: torch.Tensor) -> torch.Tensor:
    """In place: non-finite keys -> -1, below every (non-negative) finite key."""
    return keys.nan_to_num_(nan=-1.0, posinf=-1.0, neginf=-1.0)


def _int_view(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    if dtype == torch.float32:
        return torch.int32, 32
    if dtype == torch.float64:
        return torch.int64, 64
    raise TypeError(f"top-k keys must be float32 or float64, got {dtype}")


class TopK:
    """Workspace for exact top-k selections over 1-D keys of up to ``capacity`` entries.

    Buffers are allocated once (large fresh allocations cost page faults on CPU and allocator
    traffic on GPU) and reused by every call, including calls on shorter slices.
    """

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.dtype, self.device = capacity, dtype, device
        int_dtype, self.width = _int_view(dtype)
        rows = -(-capacity // CHUNK)
        big = capacity >= SORT_BELOW
        self.seg = torch.empty(capacity if big else 0, dtype=int_dtype, device=device)
        self.high = torch.empty(capacity if big else 0, dtype=int_dtype, device=device)
        self.outside = torch.empty(capacity if big else 0, dtype=torch.bool, device=device)
        self.eq = torch.zeros(rows * CHUNK if big else 0, dtype=torch.bool, device=device)
        self.ones = torch.ones(capacity if big else 0, dtype=torch.int32, device=device)
        self.counts = torch.zeros(BINS + 1, dtype=torch.int32, device=device)
        self.row_ids = torch.arange(rows, device=device)[:, None]
        self.col_ids = torch.arange(CHUNK, device=device)

    def select(self, keys: torch.Tensor, n_keep: int, out: torch.Tensor) -> torch.Tensor:
        """out[i] = keys[i] is among the ``n_keep`` first in the module's order. ``keys``: 1-D,
        contiguous, already passed through ``rank_keys_``; ``out``: bool, same length."""
        n = keys.numel()
        if n_keep >= n:
            return out.fill_(True)
        if n_keep <= 0:
            return out.fill_(False)
        if n < SORT_BELOW:
            order = torch.sort(keys, descending=True, stable=True).indices
            return out.zero_().scatter_(0, order[:n_keep], True)
        assert n <= self.capacity and keys.dtype == self.dtype, (n, self.capacity, keys.dtype)
        key = keys.view(self.seg.dtype)
        t, need = self._threshold(key, n_keep)
        torch.gt(key, t, out=out)
        self._keep_first_ties(key, t, need, out)
        return out

    def _threshold(self, key: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n_keep-th largest key t (0-d) and how many entries equal to t are kept."""
        n, w = key.numel(), self.width
        seg, high, outside, counts = self.seg[:n], self.high[:n], self.outside[:n], self.counts
        ones = self.ones[:n]
        # Level 0, the top 16 bits, signed: +32768 puts the bins in rank order.
        torch.bitwise_right_shift(key, w - 16, out=high)
        torch.add(high, BINS // 2, out=seg)
        counts.zero_().index_add_(0, seg, ones)
        b, above = _bin_of(counts[:BINS], n_keep)
        prefix = b - BINS // 2                   # the top 16 bits of t, as a signed integer
        need = n_keep - above
        for shift in range(w - 32, -1, -16):     # lower levels: unsigned 16-bit digits
            if shift != w - 32:                  # (for w - 32, ``high`` already holds key >> 16 levels up)
                torch.bitwise_right_shift(key, shift + 16, out=high)
            torch.ne(high, prefix, out=outside)  # entries not sharing t's higher digits
            torch.bitwise_right_shift(key, shift, out=seg)
            seg.bitwise_and_(BINS - 1).masked_fill_(outside, BINS)
            counts.zero_().index_add_(0, seg, ones)
            b, above = _bin_of(counts[:BINS], need)
            prefix = prefix * BINS + b
            need = need - above
        return prefix.to(key.dtype), need

    def _keep_first_ties(self, key, t, need, out) -> None:
        """out |= the first ``need`` positions where key == t (a cumulative count over the tied
        entries, chunked so that only one chunk needs a full-length cumulative sum)."""
        n = key.numel()
        rows = -(-n // CHUNK)
        eq = self.eq[:rows * CHUNK]
        torch.eq(key, t, out=eq[:n])
        eq[n:].zero_()
        eq2d = eq.view(rows, CHUNK)
        per_row = eq2d.sum(1, dtype=torch.int32).cumsum(0)
        r = (per_row < need).sum().view(1)              # the chunk holding the need-th tie
        before = per_row.index_select(0, r) - eq2d.index_select(0, r).sum(1, dtype=torch.int32)
        row = eq2d.index_select(0, r)
        c = (row.cumsum(1, dtype=torch.int32) < need - before).sum()  # its column in that chunk
        eq2d.logical_and_(self.row_ids[:rows] <= r)
        eq2d.index_copy_(0, r, row & (self.col_ids <= c))
        out.logical_or_(eq[:n])


def _bin_of(counts: torch.Tensor, need) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts in ascending rank order: the bin b holding the need-th largest entry and the
    number of entries in bins above b (both 0-d)."""
    at_or_above = counts.flip(0).cumsum(0, dtype=torch.int32).flip(0)
    b = (at_or_above >= need).sum() - 1
    above = torch.cat([at_or_above[1:], at_or_above.new_zeros(1)]).gather(0, b.view(1)).squeeze(0)
    return b, above


def top_rows(keys: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Bool [rows, units]: per row, the n_keep[row] first keys in the module's order. ``keys``
    already passed through ``rank_keys_``; pad short rows with -2 (below every real key)."""
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    ranks_kept = torch.arange(keys.shape[1], device=keys.device) < n_keep[:, None]
    return torch.zeros_like(ranks_kept).scatter_(1, order, ranks_kept)


def nm_keep(keys: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
    """N:M selection. ``keys`` and ``out`` are [..., M, K] views (groups of M along dim -2):
    out[..., j, :] = fewer than n members of its group beat member j, where i beats j if
    key_i > key_j, or key_i == key_j and i < j. M(M-1)/2 comparisons, no sort."""
    m = keys.shape[-2]
    beaten_by = torch.zeros(keys.shape, dtype=torch.uint8, device=keys.device)
    for i in range(m):
        for j in range(i + 1, m):
            i_wins = keys[..., i, :] >= keys[..., j, :]  # ties: the earlier member i wins
            beaten_by[..., j, :] += i_wins
            beaten_by[..., i, :] += ~i_wins
    return torch.lt(beaten_by, n, out=out)
