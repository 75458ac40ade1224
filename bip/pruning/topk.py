"""Exact top-k selections as device ops only: the kernels behind the mask update.

Every function here runs without a device-to-host sync (no ``.item()``, ``int(tensor)``,
``nonzero``, boolean indexing, ``bincount`` or data-dependent shapes), so a GPU never waits for
the host in a training step; tests/test_sync.py proves it on CPU.

Order (the same everywhere): a larger key ranks first; NaN and +-inf rank below every finite
key (a non-finite score says nothing about importance, and ranking it last keeps the kept count
exact: 3 NaNs in 500 scores still keep exactly the requested count); among equal keys the
earlier position ranks first. Keys are non-negative floats (|scores|, norms): ``rank_keys_``
maps the non-finite ones to -1.0 in place, and padding entries hold ``PAD`` = -0.5. Keys are
compared as the signed integers of their bit patterns: non-negative floats order like their
bits, and both -1.0 and, below it, -0.5 order below them (negative floats order in reverse as
integers), so padding always ranks last.

- ``TopK``: the n_keep largest of a long 1-D tensor. Short inputs: one stable sort. Long inputs
  (a multiple of ``CHUNK``, padded with PAD): a radix select over the key bits: a 2^16-bin
  histogram per 16 bits (``index_add_`` into fixed-size bins: 2 passes for float32, 4 for
  float64) finds the exact n_keep-th largest key t as a 0-d tensor; then the ties at t are
  resolved with a cumulative count over the tied entries: per chunk of 4096 entries (counted
  4 bytes at a time), then inside the one chunk that holds the last kept tie. Chunks before it
  keep key >= t, chunks after it key > t: one comparison pass.
- ``top_rows``: per row of a [rows, units] matrix, the n_keep[row] largest (one stable sort for
  all filter / channel layers at once).
- ``nm_keep``: N of every group of M, by counting for each entry the group members that beat it.
"""
from __future__ import annotations

import torch

BINS = 1 << 16
SORT_BELOW = 1 << 15  # inputs shorter than this use one stable sort instead of the radix select
CHUNK = 4096          # tie resolution: entries per chunk of the cumulative tie count
PAD = -0.5            # key of padding entries: ranks below everything, non-finite included


def rank_keys_(keys: torch.Tensor) -> torch.Tensor:
    """In place: non-finite keys -> -1.0, below every (non-negative) finite key."""
    return keys.nan_to_num_(nan=-1.0, posinf=-1.0, neginf=-1.0)


def padded(n: int) -> int:
    """Length of a buffer for n keys that the radix select accepts (a multiple of CHUNK)."""
    return -(-n // CHUNK) * CHUNK


def int_keys(keys: torch.Tensor) -> torch.Tensor:
    """The keys' bit patterns as signed integers (the order used everywhere here)."""
    if keys.dtype == torch.float32:
        return keys.view(torch.int32)
    if keys.dtype == torch.float64:
        return keys.view(torch.int64)
    raise TypeError(f"top-k keys must be float32 or float64, got {keys.dtype}")


class TopK:
    """Workspace for exact top-k selections over 1-D keys of up to ``capacity`` entries.

    Buffers are allocated once (large fresh allocations cost page faults on CPU and allocator
    traffic on GPU) and reused by every call, including calls on shorter slices.
    """

    def __init__(self, capacity: int, dtype: torch.dtype, device: torch.device):
        self.capacity, self.dtype = capacity, dtype
        int_dtype = int_keys(torch.empty(0, dtype=dtype)).dtype
        self.width = 32 if int_dtype == torch.int32 else 64
        big = capacity if capacity >= SORT_BELOW else 0
        self.high = torch.empty(big, dtype=int_dtype, device=device)
        self.inside = torch.empty(big, dtype=torch.int32, device=device)
        self.eq = torch.empty(big, dtype=torch.bool, device=device)
        self.ones = torch.ones(1, dtype=torch.int32, device=device).expand(big)  # no memory
        self.counts = torch.zeros(BINS, dtype=torch.int32, device=device)
        self.row_ids = torch.arange(-(-capacity // CHUNK), device=device)[:, None]
        self.col_ids = torch.arange(CHUNK, device=device)

    def select(self, keys: torch.Tensor, n_keep: int, out: torch.Tensor) -> torch.Tensor:
        """out[i] = keys[i] is among the ``n_keep`` first in the module's order. ``keys``: 1-D,
        contiguous, passed through ``rank_keys_``; from SORT_BELOW entries on, a multiple of
        CHUNK long (pad with PAD). ``out``: bool, same length. Returns ``out``."""
        n = keys.numel()
        if n_keep >= n:
            return out.fill_(True)
        if n_keep <= 0:
            return out.fill_(False)
        key = int_keys(keys)
        if n < SORT_BELOW:
            order = torch.sort(key, descending=True, stable=True).indices
            return out.zero_().scatter_(0, order[:n_keep], True)
        assert n <= self.capacity and n % CHUNK == 0 and keys.dtype == self.dtype, (n, keys.dtype)
        t, need = self._threshold(key, n_keep)
        self._keep(key, t, need, out)
        return out

    def _threshold(self, key: torch.Tensor, n_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The n_keep-th largest key t (0-d) and how many entries equal to t are kept."""
        n, w = key.numel(), self.width
        digits, inside, counts = self.high[:n], self.inside[:n], self.counts
        # Level 0, the top 16 bits, signed: +BINS/2 puts the bins in rank order.
        torch.bitwise_right_shift(key, w - 16, out=digits).add_(BINS // 2)
        counts.zero_().index_add_(0, digits, self.ones[:n])
        b, above = _bin_of(counts, n_keep)
        prefix, need = b, n_keep - above       # t's higher digits, as ``digits`` holds them
        for shift in range(w - 32, -1, -16):   # lower levels: unsigned 16-bit digits
            if shift != w - 32:                # (at w - 32, ``digits`` holds them already)
                torch.bitwise_right_shift(key, shift + 16, out=digits)
            # Histogram of this digit over the entries sharing t's higher digits: the others
            # add 0 (an int32 weight, not a moved index: no conversion, no single hot bin).
            torch.eq(digits, prefix, out=inside)
            if shift:
                torch.bitwise_right_shift(key, shift, out=digits).bitwise_and_(BINS - 1)
            else:
                torch.bitwise_and(key, BINS - 1, out=digits)
            counts.zero_().index_add_(0, digits, inside)
            b, above = _bin_of(counts, need)
            prefix = prefix * BINS + b if shift != w - 32 else (prefix - BINS // 2) * BINS + b
            need = need - above
        return prefix.to(key.dtype), need

    def _keep(self, key, t, need, out) -> None:
        """out = key > t, plus the first ``need`` positions where key == t."""
        n = key.numel()
        rows = n // CHUNK
        eq = torch.eq(key, t, out=self.eq[:n])
        per_row = _row_counts(eq.view(rows, CHUNK)).cumsum(0)
        r = (per_row < need).sum().view(1)       # the chunk holding the need-th tie
        before = per_row.index_select(0, r) - _row_counts(eq.view(rows, CHUNK).index_select(0, r))
        row_eq = eq.view(rows, CHUNK).index_select(0, r)
        c = (row_eq.cumsum(1, dtype=torch.int32) < need - before).sum()  # its column there
        # chunks before r keep every tie (>= t), chunks from r on none (>= t + 1) ...
        thr = torch.where(self.row_ids[:rows] < r, t, t + 1)
        torch.ge(key.view(rows, CHUNK), thr, out=out.view(rows, CHUNK))
        # ... and chunk r its ties up to column c.
        row = (key.view(rows, CHUNK).index_select(0, r) > t) | (row_eq & (self.col_ids <= c))
        out.view(rows, CHUNK).index_copy_(0, r, row)


def _row_counts(eq2d: torch.Tensor) -> torch.Tensor:
    """True entries per row of a [rows, CHUNK] bool tensor. Bool reductions are slow on CPU,
    so 4 bools are summed at once as the bytes of an int32 (each byte sums at most 128 ones:
    no carry into the next byte; the top byte may set the sign bit, hence the mask), then the 4
    byte sums are added."""
    words = eq2d.view(torch.int32).view(eq2d.shape[0], CHUNK // 512, 128).sum(-1, dtype=torch.int32)
    lanes = (words & 255) + ((words >> 8) & 255) + ((words >> 16) & 255) + ((words >> 24) & 255)
    return lanes.sum(1)


def _bin_of(counts: torch.Tensor, need) -> tuple[torch.Tensor, torch.Tensor]:
    """For counts in ascending rank order: the bin b holding the need-th largest entry and the
    number of entries in bins above b (both 0-d)."""
    upto = counts.cumsum(0)
    above = upto[-1] - upto                  # entries in higher bins
    b = (above + counts >= need).sum() - 1   # at-or-above counts never increase with the bin
    return b, above.gather(0, b.view(1)).squeeze(0)


def top_rows(keys: torch.Tensor, n_keep: torch.Tensor) -> torch.Tensor:
    """Bool [rows, units]: per row, the n_keep[row] first keys in the module's order. ``keys``
    already passed through ``rank_keys_``; pad short rows with PAD."""
    order = torch.sort(int_keys(keys), dim=1, descending=True, stable=True).indices
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
