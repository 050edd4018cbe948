"""Differentiable dynamic time warping for unimllm: one batched wavefront kernel, four uses.

What lives here (see ../shared/DESIGN.md, "Differentiable DTW"):
- `soft_dtw`: soft-DTW of a batch of cost matrices (Cuturi & Blondel, ICML 2017, arXiv 1703.01541, Eq. 1-2),
      R[i,j] = C[i,j] + softmin_γ(R[i-1,j-1], R[i-1,j], R[i,j-1]),  softmin_γ(a) = -γ log Σ_k exp(-a_k / γ),
  with R[0,0] = 0 and +inf on the other borders; gamma = 0 is hard DTW (the plain min).
- `hard_dtw_path`: the optimal alignment path(s) of hard DTW, by backtracking the stored argmin pointers.
- `soft_dtw_divergence`: D(x,y) = sdtw(x,y) - ½(sdtw(x,x) + sdtw(y,y)) (Blondel, Mensch & Vert, AISTATS 2021,
  Eq. 5), ≥ 0 and 0 iff x = y.
- `gak`, `gak_gram`: Cuturi's global alignment kernel (Cuturi, Vert, Birkenes & Matsui, ICASSP 2007; the kernel
  Sugar's Eq. 2 uses), K(x,y) = Σ_alignments Π exp(-φ_σ(x_i, y_j)) with the local cost `phi_sigma`
      φ_σ(d²) = d²/(2σ²) + log(2 - exp(-d²/(2σ²))),
  so log K = -(soft-DTW with γ = 1 on the φ_σ cost) -- the same kernel. Normalised like `tslearn.metrics.gak`:
  log K̃(x,y) = log K(x,y) - ½(log K(x,x) + log K(y,y)), K̃ ∈ (0, 1], K̃(x,x) = 1. σ here is tslearn's σ.
- `sq_euclidean`, `pairwise_sq_euclidean`: squared-Euclidean cost matrices from one matmul each.

The kernel. Cells with i + j = k depend only on the diagonals k-1 and k-2, so the DP runs as n+m-1 wavefront
steps, each a handful of vectorised ops over (diagonal cells × pairs). The (n+1)×(m+1) grid (border included)
is stored diagonal-major ("skewed") with the pair index innermost: diagonal k is one contiguous (w_k, B) block,
and the three predecessors of a diagonal are contiguous blocks of the previous two, so every step works on
views (no torch.cat, no index tensors). Internally the DP runs on Q = -R/γ, where softmin becomes log-sum-exp.
Per-pair lengths on both sides and a Sakoe-Chiba band (on each pair's own lengths, the definition of
`tslearn.metrics.sakoe_chiba_mask`) are a mask applied once to the skewed costs: masked cells get a large
finite negative Q (not -inf, so no inf - inf = NaN ever appears) and receive an exactly-zero soft-min weight.

The backward (a custom `torch.autograd.Function`) does not recompute exp(R_next - R - C) as most public
implementations do (catastrophic cancellation in float32). The forward stores the three soft-min weights of
every cell; the gradient dR[n,m]/dC[i,j] = E[i,j] (the expected alignment matrix, Cuturi & Blondel Eq. 3-4)
is then the linear recursion E[i,j] = Σ_successors E[s] · weight_s(i,j), pushed diagonal by diagonal.
Memory per grid cell: forward 4 floats with autograd (Q + 3 weights; Q is freed after it), 1 without;
backward 3 weights + 1 for E, plus the returned (B, n, m) gradient.
Speed on CPU: pairs are split into cache-sized column chunks, and weights / gradient terms are cut before
they turn denormal (denormal arithmetic is 10-100x slower).

Run the tests with `python -m pytest tests/test_dtw.py -x -q`, the benchmark with `python bench/bench_dtw.py`.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def _plan(n: int, m: int) -> tuple[list[tuple[int, int, int, int]], Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Skewed layout of the (n+1)×(m+1) grid, diagonal-major.

    Returns (steps, interior_idx, grid_i, grid_j, diag_offset, diag_low):
    steps[k-2] = (cur, w, dstart, ustart) for diagonal k = 2..n+m: its interior cells live at rows
    [cur, cur+w) of the skewed buffer, their diagonal predecessors (i-1,j-1) at [dstart, dstart+w), and their
    up / left predecessors (i-1,j) / (i,j-1) at [ustart, ustart+w) / [ustart+1, ustart+1+w).
    interior_idx (n*m,): skewed row of grid cell (i+1, j+1), row-major over (i, j).
    grid_i, grid_j (G,): grid coordinates of each skewed row. diag_offset, diag_low (n+m+1,): first row and
    first grid row index i of each diagonal.
    """
    low = [max(0, k - m) for k in range(n + m + 1)]
    high = [min(k, n) for k in range(n + m + 1)]
    offset = [0] * (n + m + 1)
    for k in range(1, n + m + 1):
        offset[k] = offset[k - 1] + high[k - 1] - low[k - 1] + 1
    steps = []
    for k in range(2, n + m + 1):
        a, b = max(1, k - m), min(k - 1, n)  # interior rows i of diagonal k
        steps.append((offset[k] + a - low[k], b - a + 1,
                      offset[k - 2] + a - 1 - low[k - 2], offset[k - 1] + a - 1 - low[k - 1]))
    diag_offset = torch.tensor(offset, dtype=torch.long)
    diag_low = torch.tensor(low, dtype=torch.long)
    grid_i = torch.cat([torch.arange(low[k], high[k] + 1) for k in range(n + m + 1)])
    grid_j = torch.cat([k - torch.arange(low[k], high[k] + 1) for k in range(n + m + 1)])
    i = torch.arange(1, n + 1).view(n, 1)
    j = torch.arange(1, m + 1).view(1, m)
    interior_idx = (diag_offset[i + j] + i - diag_low[i + j]).reshape(-1)
    return steps, interior_idx, grid_i, grid_j, diag_offset, diag_low


def _check_lengths(lengths: Tensor | None, batch: int, size: int, name: str) -> Tensor | None:
    """Validate a (B,) lengths tensor: integers in [1, size]."""
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor) or lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        raise ValueError(f"dtw.py: {name} must be an integer tensor of shape ({batch},), got "
                         f"{getattr(lengths, 'shape', type(lengths))} {getattr(lengths, 'dtype', '')}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > size):
        raise ValueError(f"dtw.py: {name} must lie in [1, {size}], got [{int(lengths.min())}, {int(lengths.max())}]")
    return lengths.long()


def _check_cost(cost: Tensor, gamma: float, bandwidth: int | None) -> None:
    """Validate the (B, n, m) cost tensor, gamma and bandwidth."""
    if not isinstance(cost, Tensor) or cost.dim() != 3:
        raise ValueError(f"dtw.py: cost must be a (B, n, m) tensor, got {getattr(cost, 'shape', type(cost))}")
    if cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtw.py: cost must be float32 or float64, got {cost.dtype}")
    if cost.shape[1] < 1 or cost.shape[2] < 1:
        raise ValueError(f"dtw.py: cost must have n, m >= 1, got shape {tuple(cost.shape)}")
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"dtw.py: gamma must be a finite float >= 0 (0 = hard DTW), got {gamma!r}")
    if bandwidth is not None and (not isinstance(bandwidth, int) or bandwidth < 0):
        raise ValueError(f"dtw.py: bandwidth must be an int >= 0 or None, got {bandwidth!r}")


def _valid_cells(grid_i: Tensor, grid_j: Tensor, n: int, m: int, x_lengths: Tensor | None,
                 y_lengths: Tensor | None, bandwidth: int | None, batch: int) -> Tensor:
    """(G, B) bool: interior cells inside each pair's lengths and Sakoe-Chiba band.

    Band as `tslearn.metrics.sakoe_chiba_mask(n_b, m_b, r)`: j - i ∈ [-r - max(0, n_b - m_b), r + max(0, m_b - n_b)],
    which always contains the end cell (n_b, m_b) and keeps every band cell reachable from (1, 1).
    """
    device = grid_i.device
    gi, gj = grid_i.view(-1, 1), grid_j.view(-1, 1)  # (G, 1)
    nb = x_lengths.view(1, -1) if x_lengths is not None else torch.full((1, batch), n, device=device)
    mb = y_lengths.view(1, -1) if y_lengths is not None else torch.full((1, batch), m, device=device)
    valid = (gi >= 1) & (gj >= 1) & (gi <= nb) & (gj <= mb)  # (G, B)
    if bandwidth is not None:
        offset = gj - gi
        valid &= offset >= -bandwidth - (nb - mb).clamp_min(0)
        valid &= offset <= bandwidth + (mb - nb).clamp_min(0)
    return valid


# Pairs are processed in column chunks so that one diagonal step's working set stays in L2 cache: with many
# short sequences (65,536 pairs of length 8) a whole-batch diagonal is megabytes and every op would go to DRAM.
# (Running chunks on separate Python threads with single-threaded ops measured slower than ATen's own
# intra-op threads on each chunk.) On an accelerator the whole batch is one chunk.
_CHUNK_ELEMENTS = 1 << 16


def _chunks(batch: int, steps: list[tuple[int, int, int, int]], device: torch.device) -> list[slice]:
    """Column slices of the pair axis with about _CHUNK_ELEMENTS cells in the widest diagonal."""
    if device.type != "cpu":
        return [slice(0, batch)]
    width = max(w for _, w, _, _ in steps)
    size = max(1, _CHUNK_ELEMENTS // width)
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


# Denormal floats make x86 arithmetic 10-100x slower, and soft-min weights of far-off-path cells underflow into
# them (exp(-90) in float32). So exponents below -_EXP_CUT become exactly 0 (forward), and pushed gradient terms
# below _FLUSH become exactly 0 (backward). Then every product weight·E is ≥ exp(-_EXP_CUT)/3 · _FLUSH, a normal
# number; what is dropped is < 1e-17 (float32) / 1e-130 (float64) relative to the end cell's weight of 1.
_EXP_CUT = {torch.float32: 40.0, torch.float64: 300.0}
_FLUSH = {torch.float32: 1e-18, torch.float64: 1e-150}


def _wavefront(q: Tensor, steps: list[tuple[int, int, int, int]], weights: Tensor | None, hard: bool) -> None:
    """Fill q (G, B) in place: q[cell] += max / log-sum-exp of its three predecessors (soft-min of -R/γ).

    q enters holding -C/γ on interior cells (-C when hard) and the border values; weights (G, 3, B), when
    given, receives the soft-min weights (one-hot argmin when hard) of (diag, up, left) predecessors.
    """
    for cols in _chunks(q.shape[1], steps, q.device):
        _wavefront_chunk(q[:, cols], steps, None if weights is None else weights[:, :, cols], hard)


def _wavefront_chunk(q: Tensor, steps: list[tuple[int, int, int, int]], weights: Tensor | None,
                     hard: bool) -> None:
    """_wavefront on one column chunk; q (G, b) and weights (G, 3, b) may be column slices of larger buffers."""
    batch, row = q.shape[1], q.stride(0)
    width = max(w for _, w, _, _ in steps)
    scratch = None if weights is not None else q.new_empty(width, 3, batch)
    mx = q.new_empty(width, 1, batch)
    total = q.new_empty(width, 1, batch)
    index = torch.empty(width, 1, batch, dtype=torch.long, device=q.device) if hard else None
    base, cut = q.storage_offset(), _EXP_CUT[q.dtype]
    for cur, w, dstart, ustart in steps:
        p = weights[cur:cur + w] if weights is not None else scratch[:w]  # (w, 3, b)
        p[:, 0].copy_(q[dstart:dstart + w])
        # up (i-1, j) and left (i, j-1) are consecutive rows of diagonal k-1: one overlapping (w, 2, b) view
        p[:, 1:].copy_(q.as_strided((w, 2, batch), (row, row, 1), base + ustart * row))
        m_, t_ = mx[:w], total[:w]
        if hard:
            torch.max(p, 1, keepdim=True, out=(m_, index[:w]))
            if weights is not None:
                p.zero_().scatter_(1, index[:w], 1.0)
        else:
            torch.amax(p, 1, keepdim=True, out=m_)
            torch.nn.functional.threshold_(p.sub_(m_), -cut, -math.inf).exp_()  # p ≤ -cut: weight exactly 0
            torch.sum(p, 1, keepdim=True, out=t_)
            if weights is not None:
                p.div_(t_)
            m_.add_(t_.log_())  # log Σ exp(p) = max + log Σ exp(p - max)
        q[cur:cur + w].add_(m_.view(w, batch))


def _backward_alignment(weights: Tensor, steps: list[tuple[int, int, int, int]], seed: Tensor) -> Tensor:
    """E (G, B): expected alignment, E[cell] = seed + Σ_successors E[s] · weight_s(cell), pushed backwards.

    seed (G, B), ≥ 0, is overwritten with E.
    """
    for cols in _chunks(seed.shape[1], steps, seed.device):
        _backward_chunk(weights[:, :, cols], steps, seed[:, cols])
    return seed


def _backward_chunk(weights: Tensor, steps: list[tuple[int, int, int, int]], e: Tensor) -> None:
    """_backward_alignment on one column chunk."""
    batch = e.shape[1]
    width = max(w for _, w, _, _ in steps)
    pushed = e.new_empty(width, 3, batch)
    flush = _FLUSH[e.dtype]
    for cur, w, dstart, ustart in reversed(steps):
        f = torch.mul(weights[cur:cur + w], e[cur:cur + w].unsqueeze(1), out=pushed[:w])  # (w, 3, b)
        torch.nn.functional.threshold_(f, flush, 0.0)  # E ≥ 0 here; tiny terms -> 0 (no denormals)
        e[dstart:dstart + w].add_(f[:, 0])
        e[ustart:ustart + w].add_(f[:, 1])
        e[ustart + 1:ustart + 1 + w].add_(f[:, 2])


def _prepare(cost: Tensor, gamma: float, x_lengths: Tensor | None, y_lengths: Tensor | None,
             bandwidth: int | None) -> tuple[Tensor, list, Tensor, Tensor]:
    """Skew the costs into q (G, B) = -C/γ (masked cells: a large finite negative), plus the plan and end rows."""
    batch, n, m = cost.shape
    steps, interior_idx, grid_i, grid_j, diag_offset, diag_low = _plan(n, m)
    device = cost.device
    interior_idx = interior_idx.to(device)
    # finite stand-in for -inf: even summed along a whole path (≤ n+m+1 cells) it cannot overflow, and
    # exp(sentinel - anything real) is exactly 0, so masked cells get zero weight without inf - inf = NaN.
    sentinel = -torch.finfo(cost.dtype).max / (4 * (n + m + 2))
    scaled = torch.empty(n, m, batch, dtype=cost.dtype, device=device)
    torch.mul(cost.detach().permute(1, 2, 0), -1.0 / gamma if gamma > 0 else -1.0, out=scaled)  # (n, m, B)
    q = torch.full((grid_i.shape[0], batch), sentinel, dtype=cost.dtype, device=device)  # border: "-inf"
    q.index_copy_(0, interior_idx, scaled.view(n * m, batch))
    del scaled
    if x_lengths is not None or y_lengths is not None or bandwidth is not None:
        valid = _valid_cells(grid_i.to(device), grid_j.to(device), n, m, x_lengths, y_lengths, bandwidth, batch)
        q.masked_fill_(~valid, sentinel)
    q[0] = 0.0  # R[0, 0] = 0
    nb = x_lengths if x_lengths is not None else torch.full((batch,), n, device=device, dtype=torch.long)
    mb = y_lengths if y_lengths is not None else torch.full((batch,), m, device=device, dtype=torch.long)
    end = diag_offset.to(device)[nb + mb] + nb - diag_low.to(device)[nb + mb]  # (B,) skewed row of (n_b, m_b)
    return q, steps, interior_idx, end


def _unskew(e: Tensor, interior_idx: Tensor, n: int, m: int) -> Tensor:
    """(G, B) skewed grid values -> (B, n, m) cost-shaped view."""
    return e.index_select(0, interior_idx).view(n, m, -1).permute(2, 0, 1)


def _check_finite(value: Tensor) -> None:
    """NaN / -inf costs inside the region (or +inf blocking every path) reach the end cell: fail loudly."""
    if not bool(torch.isfinite(value).all()):
        raise ValueError("dtw.py: soft-DTW value is not finite: the cost has NaN or -inf entries inside the "
                         "(lengths, band) region, or +inf entries block every alignment path")


class _SoftDTW(torch.autograd.Function):
    """soft_dtw with the stored-weights backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, cost: Tensor, gamma: float, x_lengths: Tensor | None, y_lengths: Tensor | None,
                bandwidth: int | None) -> Tensor:
        q, steps, interior_idx, end = _prepare(cost, gamma, x_lengths, y_lengths, bandwidth)
        batch = cost.shape[0]
        weights = q.new_empty(q.shape[0], 3, batch) if ctx.needs_input_grad[0] else None
        _wavefront(q, steps, weights, hard=gamma == 0)
        value = q.gather(0, end.view(1, -1)).view(batch) * (-gamma if gamma > 0 else -1.0)  # R = -γ Q
        _check_finite(value)
        ctx.save_for_backward(weights, interior_idx, end)
        ctx.steps, ctx.shape = steps, cost.shape
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor) -> tuple[Tensor, None, None, None, None]:
        weights, interior_idx, end = ctx.saved_tensors
        batch, n, m = ctx.shape
        seed = weights.new_zeros(weights.shape[0], batch)
        seed.scatter_(0, end.view(1, -1), 1.0)  # dR_b / dR[n_b, m_b] = 1
        e = _backward_alignment(weights, ctx.steps, seed)
        return _unskew(e, interior_idx, n, m).mul_(grad_value.reshape(-1, 1, 1)), None, None, None, None


def soft_dtw(cost: Tensor, gamma: float, x_lengths: Tensor | None = None, y_lengths: Tensor | None = None,
             bandwidth: int | None = None) -> Tensor:
    """Soft-DTW value R[n_b, m_b] of each (n_b × m_b) cost matrix in the batch (Cuturi & Blondel Eq. 1-2).

    cost (B, n, m) float32/float64, entries outside each pair's lengths ignored; gamma ≥ 0 (0: hard DTW);
    x_lengths / y_lengths (B,) integer lengths (None: n / m); bandwidth: Sakoe-Chiba radius on each pair's own
    lengths (tslearn's definition), None for no band. Returns (B,), differentiable w.r.t. cost.
    """
    _check_cost(cost, gamma, bandwidth)
    batch, n, m = cost.shape
    x_lengths = _check_lengths(x_lengths, batch, n, "x_lengths")
    y_lengths = _check_lengths(y_lengths, batch, m, "y_lengths")
    if batch == 0:
        return cost.sum((1, 2))
    return _SoftDTW.apply(cost, float(gamma), x_lengths, y_lengths, bandwidth)


def hard_dtw_path(cost: Tensor, x_lengths: Tensor | None = None, y_lengths: Tensor | None = None,
                  bandwidth: int | None = None) -> list[tuple[int, int]] | list[list[tuple[int, int]]]:
    """Optimal hard-DTW alignment path(s), 0-based (i, j) from (0, 0) to (n_b-1, m_b-1).

    cost (n, m) -> one path; cost (B, n, m) -> a list of B paths. Backtracking: the one-hot argmin pointers
    stored by the γ = 0 forward are followed back from the end cell, for all pairs at once, by the same
    recursion as the backward (with one-hot weights E is exactly 1 on the path and 0 elsewhere).
    """
    single = isinstance(cost, Tensor) and cost.dim() == 2
    batched = cost.unsqueeze(0) if single else cost
    _check_cost(batched, 0.0, bandwidth)
    batch, n, m = batched.shape
    x_lengths = _check_lengths(x_lengths, batch, n, "x_lengths")
    y_lengths = _check_lengths(y_lengths, batch, m, "y_lengths")
    q, steps, interior_idx, end = _prepare(batched.detach(), 0.0, x_lengths, y_lengths, bandwidth)
    weights = q.new_empty(q.shape[0], 3, batch)
    _wavefront(q, steps, weights, hard=True)
    _check_finite(q.gather(0, end.view(1, -1)))
    seed = q.new_zeros(q.shape).scatter_(0, end.view(1, -1), 1.0)
    on_path = _unskew(_backward_alignment(weights, steps, seed), interior_idx, n, m) > 0.5
    paths = []
    for b in range(batch):
        cells = on_path[b].nonzero().tolist()
        paths.append(sorted((i, j) for i, j in cells))  # a monotone path is sorted by (i, j)
    return paths[0] if single else paths


def sq_euclidean(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean cost matrices (B, n, m) of x (B, n, d) and y (B, m, d), from one batched matmul."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"dtw.py: sq_euclidean needs x (B, n, d) and y (B, m, d), got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    xx = x.pow(2).sum(-1, keepdim=True)  # (B, n, 1)
    yy = y.pow(2).sum(-1).unsqueeze(1)  # (B, 1, m)
    return torch.baddbmm(xx + yy, x, y.transpose(1, 2), alpha=-2.0).clamp_min(0.0)  # |x|² + |y|² - 2 x·y


def pairwise_sq_euclidean(x: Tensor, y: Tensor) -> Tensor:
    """All-pairs squared Euclidean costs (A, B, n, m) of x (A, n, d) and y (B, m, d) from one (A·n × B·m) matmul.

    No (A, B, n, m, d) tensor and no per-pair loop; the result is a permuted view of the matmul output.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[2] != y.shape[2]:
        raise ValueError(f"dtw.py: pairwise_sq_euclidean needs x (A, n, d) and y (B, m, d), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    (a, n, d), (b, m, _) = x.shape, y.shape
    xf, yf = x.reshape(a * n, d), y.reshape(b * m, d)
    xx, yy = xf.pow(2).sum(-1, keepdim=True), yf.pow(2).sum(-1).unsqueeze(0)  # (A·n, 1), (1, B·m)
    dist = torch.addmm(xx + yy, xf, yf.t(), alpha=-2.0).clamp_min(0.0)  # (A·n, B·m)
    return dist.view(a, n, b, m).permute(0, 2, 1, 3)


def phi_sigma(sq_dist: Tensor, sigma: float) -> Tensor:
    """GAK local cost φ_σ(d²) = d²/(2σ²) + log(2 - exp(-d²/(2σ²))) (Cuturi et al. 2007; tslearn's σ).

    exp(-φ_σ) = κ/(2 - κ) with the Gaussian κ = exp(-d²/(2σ²)): the local kernel that Cuturi shows makes K
    positive definite.
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"dtw.py: sigma must be a finite float > 0, got {sigma!r}")
    a = sq_dist * (0.5 / (sigma * sigma))
    if torch.is_grad_enabled() and a.requires_grad:
        return a + math.log(2.0) + torch.log1p(-0.5 * torch.exp(-a))  # log(2 - e^-a) = log 2 + log1p(-e^-a / 2)
    # no autograd: the same formula in place, one temporary instead of five (Gram matrices are large)
    return torch.neg(a).exp_().mul_(-0.5).log1p_().add_(a).add_(math.log(2.0))


def _self_and_cross(x: Tensor, y: Tensor, x_lengths: Tensor | None, y_lengths: Tensor | None,
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Costs of (x,y), (x,x), (y,y) padded to one (3B, L, L) batch, with per-pair lengths (3B,) each side."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"dtw.py: expected x (B, n, d) and y (B, m, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    (batch, n, _), m = x.shape, y.shape[1]
    xl = _check_lengths(x_lengths, batch, n, "x_lengths")
    yl = _check_lengths(y_lengths, batch, m, "y_lengths")
    xl = xl if xl is not None else torch.full((batch,), n, dtype=torch.long, device=x.device)
    yl = yl if yl is not None else torch.full((batch,), m, dtype=torch.long, device=x.device)
    size = max(n, m)
    cost = torch.cat([
        torch.nn.functional.pad(sq_euclidean(x, y), (0, size - m, 0, size - n)),
        torch.nn.functional.pad(sq_euclidean(x, x), (0, size - n, 0, size - n)),
        torch.nn.functional.pad(sq_euclidean(y, y), (0, size - m, 0, size - m)),
    ])  # (3B, L, L): one DP call serves all three terms
    return cost, torch.cat([xl, xl, yl]), torch.cat([yl, xl, yl])


def soft_dtw_divergence(x: Tensor, y: Tensor, gamma: float, x_lengths: Tensor | None = None,
                        y_lengths: Tensor | None = None) -> Tensor:
    """Soft-DTW divergence (Blondel, Mensch & Vert 2021, Eq. 5) with squared-Euclidean cost, (B,).

    x (B, n, d), y (B, m, d), lengths may differ per pair and per side.
    """
    cost, left, right = _self_and_cross(x, y, x_lengths, y_lengths)
    xy, xx, yy = soft_dtw(cost, gamma, left, right).chunk(3)
    return xy - 0.5 * (xx + yy)


def gak(x: Tensor, y: Tensor, sigma: float, x_lengths: Tensor | None = None,
        y_lengths: Tensor | None = None) -> Tensor:
    """Normalised global alignment kernel K̃(x_b, y_b) ∈ (0, 1] (tslearn's `gak` with the same σ), (B,).

    log K = -soft_dtw(φ_σ(D²), γ=1); log K̃(x,y) = log K(x,y) - ½(log K(x,x) + log K(y,y)).
    """
    cost, left, right = _self_and_cross(x, y, x_lengths, y_lengths)
    log_xy, log_xx, log_yy = (-soft_dtw(phi_sigma(cost, sigma), 1.0, left, right)).chunk(3)
    return torch.exp(log_xy - 0.5 * (log_xx + log_yy))


def _default_lengths(lengths: Tensor | None, count: int, size: int, device: torch.device, name: str) -> Tensor:
    """Validated lengths, or the full length for every sequence."""
    checked = _check_lengths(lengths, count, size, name)
    return checked if checked is not None else torch.full((count,), size, dtype=torch.long, device=device)


def gak_gram(x: Tensor, y: Tensor | None, sigma: float, x_lengths: Tensor | None = None,
             y_lengths: Tensor | None = None) -> Tensor:
    """Gram matrix (A, B) of the normalised GAK between all x (A, n, d) and y (B, m, d) (y None: y = x).

    Like `tslearn.metrics.cdist_gak`. All pair costs come from one matmul; the self terms log K(x,x) are the
    diagonal when y is None, else one extra batched DP over the A + B self pairs.
    """
    if x.dim() != 3 or (y is not None and (y.dim() != 3 or y.shape[2] != x.shape[2])):
        raise ValueError(f"dtw.py: gak_gram needs x (A, n, d) and y (B, m, d) or None, got {tuple(x.shape)} "
                         f"and {None if y is None else tuple(y.shape)}")
    a, n, _ = x.shape
    xl = _default_lengths(x_lengths, a, n, x.device, "x_lengths")
    other, ol = (x, xl) if y is None else (y, _default_lengths(y_lengths, y.shape[0], y.shape[1], x.device,
                                                              "y_lengths"))
    b, m = other.shape[0], other.shape[1]
    cost = phi_sigma(pairwise_sq_euclidean(x, other), sigma).reshape(a * b, n, m)
    log_k = -soft_dtw(cost, 1.0, xl.repeat_interleave(b), ol.repeat(a)).view(a, b)
    if y is None:
        log_x = log_y = torch.diagonal(log_k)
    else:
        log_x = -soft_dtw(phi_sigma(sq_euclidean(x, x), sigma), 1.0, xl, xl)
        log_y = -soft_dtw(phi_sigma(sq_euclidean(other, other), sigma), 1.0, ol, ol)
    return torch.exp(log_k - 0.5 * (log_x.view(-1, 1) + log_y.view(1, -1)))
