"""Differentiable dynamic time warping for unimllm: one batched dynamic program, two implementations, four
uses.

What lives here:
- `soft_dtw`: soft-DTW of a batch of cost matrices (Cuturi & Blondel, ICML 2017, arXiv 1703.01541, Eq. 1-2).
- `hard_dtw_path`: the optimal alignment path(s) of hard DTW (γ = 0).
- `soft_dtw_divergence`: D(x,y) = sdtw(x,y) - ½(sdtw(x,x) + sdtw(y,y)) (Blondel, Mensch & Vert, AISTATS 2021,
  Eq. 5), ≥ 0 and 0 iff x = y.
- `gak`, `gak_gram` (from `log_gak`, `normalised_gak`): Cuturi's global alignment kernel (Cuturi, Vert,
  Birkenes & Matsui, ICASSP 2007; the kernel Sugar's Eq. 2 uses), K(x,y) = Σ_alignments Π exp(-φ_σ(x_i,
  y_j)) with the local cost `phi_sigma`
      φ_σ(d²) = d²/(2σ²) + log(2 - exp(-d²/(2σ²))),
  so log K = -(soft-DTW with γ = 1 on the φ_σ cost) -- the same kernel. Normalised like
  `tslearn.metrics.gak`: log K̃(x,y) = log K(x,y) - ½(log K(x,x) + log K(y,y)), K̃ ∈ (0, 1],
  K̃(x,x) = 1. σ here is tslearn's σ.
- `sq_euclidean`, `pairwise_sq_euclidean`: squared-Euclidean cost matrices from one matmul each.

1. The recursion and its backward. For an n × m cost matrix C (Cuturi & Blondel Eq. 1-2),
      R[i,j] = C[i,j] + softmin_γ(R[i-1,j-1], R[i-1,j], R[i,j-1]),
      softmin_γ(a) = -γ log Σ_p exp(-a_p / γ),
  with R[0,0] = 0 and +inf on the other borders (row 0, column 0); soft-DTW is R[n,m]; γ = 0 is hard DTW (the
  plain min). The DP runs on Q = -R/γ (Q = -R when γ = 0), where the soft-min becomes a log-sum-exp:
      Q[i,j] = -C[i,j]/γ + M + log Σ_p exp(Q_p - M),   M = max_p Q_p,  p ∈ {diag, up, left} predecessors,
  and the soft-min weights π_p(i,j) = exp(Q_p - M) / Σ_p' exp(Q_p' - M) (one-hot argmax when γ = 0) sum
  to 1.
  The gradient is the expected alignment matrix E[i,j] = ∂R[n,m]/∂C[i,j] = ∂R[n,m]/∂R[i,j] (Eq. 3-4),
  and the chain rule through the three successors of (i,j) gives the backward recursion
      E[n,m] = 1,   E[i,j] = π_diag(i+1,j+1) E[i+1,j+1] + π_up(i+1,j) E[i+1,j] + π_left(i,j+1) E[i,j+1].
  Numerics. Most public implementations recompute π in the backward as exp((R_next - R - C)/γ), a difference
  of large, nearly equal numbers (catastrophic cancellation in float32). Here the forward stores the three
  weights of every cell and the backward is a sum of non-negative products: no cancellation. The other float32
  error source is Q itself: |Q| grows like the path cost (~1e6 at n = m = 512, d = 64, γ = 0.1, where
  float32's spacing is 0.06, enough to move mid-range weights by several percent), so Q is kept in float64 for
  both input dtypes. Only its additions and the max run in float64; the small differences Q_p - M go back to
  the input dtype for exp and log, and the weights and E are stored in the input dtype (float32 weights and E
  alone cost ~1e-7 relative).
  Per-pair lengths (n_b, m_b) on both sides and a Sakoe-Chiba band (on each pair's own lengths, the definition
  of `tslearn.metrics.sakoe_chiba_mask`) mask cells: a masked cell has a large finite negative Q (not -inf, so
  no inf - inf = NaN ever appears) and receives an exactly-zero weight, hence E = 0.
  Cells with i + j = k depend only on the anti-diagonals k-1 and k-2, so both passes run as n+m-1 wavefront
  steps.
  The (n+1)×(m+1) grid (border included) is stored diagonal-major ("skewed"): diagonal k is a contiguous run
  of cells starting at row offset[k], and the predecessors of a run of diagonal-k cells are runs of diagonals
  k-1, k-2.

2. CPU tensors: a wavefront of PyTorch ops. Each step is a handful of vectorised ops over (diagonal cells ×
  pairs) on views of the skewed (G, B) buffers, pair index innermost (no torch.cat, no index tensors). Pairs
  are split into cache-sized column chunks, and weights / gradient terms are cut before they turn denormal
  (denormal arithmetic is 10-100x slower). Memory per grid cell, in floats of the input dtype, float32:
  forward Q (2, being float64) + 3 weights + a ¼ mask; backward 3 weights + E + the returned gradient.

3. CUDA tensors: a hand-written Triton kernel per pass (forward, backward), each one launch. On a GPU every
  PyTorch op is a kernel launch, so the wavefront of ops above would cost ~10 launches per anti-diagonal;
  instead one program owns a block of whole pairs for the whole DP and loops over the anti-diagonals itself.
  Programs never talk to each other; inside a program, the stores of diagonal k are made visible to the
  threads that read them at k+1 and k+2 by `tl.debug_barrier()` (CUDA's __syncthreads, which orders global
  memory within a block). Q, the weights and E live in global memory in the skewed layout (the working
  diagonals stay in L1/L2; their loads use the ".cg" cache modifier, L2 only, so no thread can read a stale L1
  line). A diagonal longer than BLOCK_W cells is processed in chunks of BLOCK_W, so there is no length cap
  (the grid is limited only by memory).
  The work of a program is a (BLOCK_W diagonal cells) × (BLOCK_B pairs) tile; `_launch_config` picks one of
  two layouts for the workload:
  - many short pairs (65,536 pairs of length 8): BLOCK_B up to 128 pairs per program, so one lane per (cell,
    pair) and hundreds of programs; the buffers are (G, B) and the costs are transposed to (n, m, B), pair
    innermost, so the 32 lanes of a warp touching one cell of 32 pairs make one coalesced 128-byte access.
  - few long pairs (8 pairs of length 512): BLOCK_B = 1, one program per pair sweeping each diagonal with up
    to 256 lanes; the buffers are (B, G), diagonal-contiguous, so neighbouring lanes read neighbouring cells.
  The backward is pull-based: each cell reads its three successors on diagonals k+1, k+2 and writes only
  itself (no atomics), and writes E · (incoming gradient) straight into the (B, n, m) gradient. Memory per
  grid cell: forward Q (2 for float32) + 3 weights + 1 for the transposed costs (pair-innermost layout only);
  backward 3 weights + E + the gradient. `hard_dtw_path` runs the same kernels with one-hot weights (E = 1
  exactly on the path) and lists the path cells of the 0/1 matrix on the host. Triton is imported on the first
  CUDA call, so a CPU-only install never needs it.
  Testing without a GPU: Triton's interpreter runs kernels on CPU tensors when TRITON_INTERPRET=1 is set
  before triton is imported. With that set and the internal switch `_TRITON_ON_CPU = True`, CPU tensors take
  the Triton path; tests/test_dtw_triton.py does this in a subprocess.

Run the tests with `python -m pytest tests/test_dtw.py tests/test_dtw_triton.py -x -q`, the benchmark with
`python bench/bench_dtw.py [--device cuda]`.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor


# --------------------------------------------------------------------------- input checks and the skewed plan
def _check_lengths(lengths: Tensor | None, batch: int, size: int, name: str) -> Tensor | None:
    """Validate a (B,) lengths tensor: integers in [1, size]."""
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor) or lengths.shape != (batch,) or lengths.dtype.is_floating_point:
        raise ValueError(f"dtw.py: {name} must be an integer tensor of shape ({batch},), got "
                         f"{getattr(lengths, 'shape', type(lengths))} {getattr(lengths, 'dtype', '')}")
    if batch and (int(lengths.min()) < 1 or int(lengths.max()) > size):
        raise ValueError(f"dtw.py: {name} must lie in [1, {size}], got [{int(lengths.min())}, "
                         f"{int(lengths.max())}]")
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

    Band as `tslearn.metrics.sakoe_chiba_mask(n_b, m_b, r)`: j - i ∈ [-r - max(0, n_b - m_b), r + max(0,
    m_b - n_b)], which always contains the end cell (n_b, m_b) and keeps every band cell reachable from
    (1, 1).
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


# ----------------------------------------------------------------------------- 2. the CPU wavefront
# Pairs are processed in column chunks so that one diagonal step's working set stays in L2 cache: with many
# short sequences (65,536 pairs of length 8) a whole-batch diagonal is megabytes and every op would go to
# DRAM. The chunks run one after another, each on ATen's intra-op threads. On an accelerator the whole batch
# is one chunk.
_CHUNK_ELEMENTS = 1 << 16


def _chunks(batch: int, steps: list[tuple[int, int, int, int]], device: torch.device) -> list[slice]:
    """Column slices of the pair axis with about _CHUNK_ELEMENTS cells in the widest diagonal."""
    if device.type != "cpu":
        return [slice(0, batch)]
    width = max(w for _, w, _, _ in steps)
    size = max(1, _CHUNK_ELEMENTS // width)
    return [slice(start, min(start + size, batch)) for start in range(0, batch, size)]


# Denormal floats make x86 arithmetic 10-100x slower, and soft-min weights of far-off-path cells underflow
# into them (exp(-90) in float32). So exponents below -_EXP_CUT become exactly 0 (forward), and pushed
# gradient terms below _FLUSH become exactly 0 (backward). Then every product weight·E is ≥
# exp(-_EXP_CUT)/3 · _FLUSH, a normal number; what is dropped is < 1e-17 (float32) / 1e-130 (float64)
# relative to the end cell's weight of 1.
_EXP_CUT = {torch.float32: 40.0, torch.float64: 300.0}
_FLUSH = {torch.float32: 1e-18, torch.float64: 1e-150}


def _wavefront(q: Tensor, steps: list[tuple[int, int, int, int]], weights: Tensor | None, hard: bool,
               dtype: torch.dtype) -> None:
    """Fill q (G, B) float64 in place: q[cell] += max / log-sum-exp of its three predecessors (soft-min of
    -R/γ).

    q enters holding -C/γ on interior cells (-C when hard) and the border values; weights (G, 3, B) in the
    input dtype, when given, receives the soft-min weights (one-hot argmax when hard) of (diag, up, left)
    predecessors.
    """
    for cols in _chunks(q.shape[1], steps, q.device):
        _wavefront_chunk(q[:, cols], steps, None if weights is None else weights[:, :, cols], hard, dtype)


def _wavefront_chunk(q: Tensor, steps: list[tuple[int, int, int, int]], weights: Tensor | None,
                     hard: bool, dtype: torch.dtype) -> None:
    """_wavefront on one column chunk; q (G, b) and weights (G, 3, b) may be column slices of larger
    buffers."""
    batch, row = q.shape[1], q.stride(0)
    width = max(w for _, w, _, _ in steps)
    scratch = None if weights is not None else q.new_empty(width, 3, batch, dtype=dtype)
    diff = q.new_empty(width, 3, batch) if dtype != torch.float64 else None  # float64 Q_p - M
    mx = q.new_empty(width, 1, batch)  # float64 M
    total = q.new_empty(width, 1, batch, dtype=dtype)
    index = torch.empty(width, 1, batch, dtype=torch.long, device=q.device) if hard else None
    base, cut = q.storage_offset(), _EXP_CUT[dtype]
    for cur, w, dstart, ustart in steps:
        p = weights[cur:cur + w] if weights is not None else scratch[:w]  # (w, 3, b), input dtype
        d = diff[:w] if diff is not None else p  # (w, 3, b), float64
        d[:, 0].copy_(q[dstart:dstart + w])
        # up (i-1, j) and left (i, j-1) are consecutive rows of diagonal k-1: one overlapping (w, 2, b) view
        d[:, 1:].copy_(q.as_strided((w, 2, batch), (row, row, 1), base + ustart * row))
        m_, t_ = mx[:w], total[:w]
        if hard:
            torch.max(d, 1, keepdim=True, out=(m_, index[:w]))
            if weights is not None:
                p.zero_().scatter_(1, index[:w], 1.0)
        else:
            torch.amax(d, 1, keepdim=True, out=m_)
            d.sub_(m_)
            if d is not p:
                p.copy_(d)  # the differences are small: the input dtype holds them accurately
            torch.nn.functional.threshold_(p, -cut, -math.inf).exp_()  # p ≤ -cut: weight exactly 0
            torch.sum(p, 1, keepdim=True, out=t_)
            if weights is not None:
                p.div_(t_)
            m_.add_(t_.log_())  # log Σ exp(Q_p) = M + log Σ exp(Q_p - M)
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


def _sentinel(dtype: torch.dtype, n: int, m: int) -> float:
    """Finite stand-in for Q = -inf: even summed along a whole path (≤ n+m+1 cells) it cannot overflow, and
    exp(sentinel - anything real) is exactly 0, so masked cells get zero weight without inf - inf = NaN."""
    return -torch.finfo(dtype).max / (4 * (n + m + 2))


def _prepare(cost: Tensor, gamma: float, x_lengths: Tensor | None, y_lengths: Tensor | None,
             bandwidth: int | None) -> tuple[Tensor, list, Tensor, Tensor]:
    """Skew the costs into q (G, B) float64 = -C/γ (masked cells: the sentinel), plus the plan and end
    rows."""
    batch, n, m = cost.shape
    steps, interior_idx, grid_i, grid_j, diag_offset, diag_low = _plan(n, m)
    device = cost.device
    interior_idx = interior_idx.to(device)
    sentinel = _sentinel(cost.dtype, n, m)
    c = cost.detach()
    if c.stride(1) < c.stride(2):
        c = c.contiguous()  # the diagonal views below need a non-negative stride along the diagonal
    sb, si, sj = c.stride()
    q = torch.full((grid_i.shape[0], batch), sentinel, dtype=torch.float64, device=device)  # border: "-inf"
    scale = -1.0 / gamma if gamma > 0 else -1.0
    for k, (cur, w, _, _) in enumerate(steps, start=2):
        a = max(1, k - m)  # the diagonal's cells C[:, i-1, k-i-1], i = a..a+w-1, one strided (w, B) view
        diagonal = c.as_strided((w, batch), (si - sj, sb),
                                c.storage_offset() + (a - 1) * si + (k - a - 1) * sj)
        q[cur:cur + w].copy_(diagonal).mul_(scale)
    if x_lengths is not None or y_lengths is not None or bandwidth is not None:
        valid = _valid_cells(grid_i.to(device), grid_j.to(device), n, m, x_lengths, y_lengths, bandwidth,
                             batch)
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


# ----------------------------------------------------------------------------- 3. the GPU kernel (Triton)
# Internal switch: run the Triton kernels on CPU tensors under Triton's interpreter (tests only; it needs
# TRITON_INTERPRET=1 in the environment before triton is first imported).
_TRITON_ON_CPU = False
# Launch configuration (see `_launch_config`): the largest tile of one program, the widest chunk of a
# diagonal, the most pairs per program, and how many programs to keep at least (about two per SM of an H100).
_MAX_TILE = 1024
_MAX_BLOCK_W = 256
_MAX_BLOCK_B = 128
_MIN_PROGRAMS = 264
# Multiply-adds in the kernels contract to FMA (one rounding each): set here, not left to Triton's default,
# which Triton 3.10 changes to off, so the kernels round the same under every Triton version.
_FP_FUSION = True


def _use_triton(cost: Tensor) -> bool:
    """CUDA tensors take the Triton kernels; CPU tensors too under the interpreter switch."""
    return cost.is_cuda or (_TRITON_ON_CPU and os.environ.get("TRITON_INTERPRET") == "1")


@functools.lru_cache(maxsize=1)
def _triton_kernels() -> tuple:
    """Import triton and define the two kernels (first call only: a CPU-only install never imports triton)."""
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def forward_kernel(cost_ptr, q_ptr, w_ptr, offset_ptr, xlen_ptr, ylen_ptr, batch, n, m, scale, band,
                       sentinel, s_cb, s_ci, s_cj, s_qr, s_qb, s_wr, s_wp, s_wb, HARD: tl.constexpr,
                       BANDED: tl.constexpr, STORE_W: tl.constexpr, EXP_CUT: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
        """Q (float64, skewed) and the weights of BLOCK_B pairs, anti-diagonal after anti-diagonal."""
        pair = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        live = pair < batch
        nb = tl.load(xlen_ptr + pair, mask=live, other=0)
        mb = tl.load(ylen_ptr + pair, mask=live, other=0)
        last = tl.max(nb + mb, axis=0)  # the block's last diagonal
        b = pair.to(tl.int64)[None, :]  # (1, BLOCK_B)
        nb, mb, live = nb[None, :], mb[None, :], live[None, :]
        lane = tl.arange(0, BLOCK_W).to(tl.int64)[:, None]  # (BLOCK_W, 1)
        w_dtype = w_ptr.dtype.element_ty
        for k in range(2, last + 1):
            first_i = tl.maximum(k - m, 1)  # interior rows i of diagonal k: first_i .. last_i
            last_i = tl.minimum(k - 1, n)
            row_k = tl.load(offset_ptr + k) - tl.maximum(k - m, 0)  # skewed row of (i, k-i) = row_k + i
            row_1 = tl.load(offset_ptr + k - 1) - tl.maximum(k - 1 - m, 0)
            row_2 = tl.load(offset_ptr + k - 2) - tl.maximum(k - 2 - m, 0)
            for start in range(first_i, last_i + 1, BLOCK_W):
                i = start + lane  # (BLOCK_W, 1)
                j = k - i
                inside = (i <= last_i) & live  # (BLOCK_W, BLOCK_B)
                valid = inside & (i <= nb) & (j <= mb)
                if BANDED:  # tslearn's sakoe_chiba_mask on the pair's own lengths
                    valid &= (j - i >= -band - tl.maximum(nb - mb, 0)) & (j - i <= band
                                                                          + tl.maximum(mb - nb, 0))
                q_diag = tl.load(q_ptr + (row_2 + i - 1) * s_qr + b * s_qb, mask=valid, other=0.0,
                                 cache_modifier=".cg")  # Q[i-1, j-1]
                q_up = tl.load(q_ptr + (row_1 + i - 1) * s_qr + b * s_qb, mask=valid, other=0.0,
                               cache_modifier=".cg")  # Q[i-1, j]
                q_left = tl.load(q_ptr + (row_1 + i) * s_qr + b * s_qb, mask=valid, other=0.0,
                                 cache_modifier=".cg")  # Q[i, j-1]
                c = tl.load(cost_ptr + b * s_cb + (i - 1) * s_ci + (j - 1) * s_cj, mask=valid, other=0.0)
                top = tl.maximum(tl.maximum(q_diag, q_up), q_left)  # M, float64
                if HARD:  # argmax, ties to the first of (diag, up, left) like torch.max
                    is_diag = q_diag == top
                    is_up = (q_up == top) & (~is_diag)
                    is_left = (~is_diag) & (~is_up)
                    p_diag = is_diag.to(w_dtype)
                    p_up = is_up.to(w_dtype)
                    p_left = is_left.to(w_dtype)
                    q_new = top - c.to(tl.float64)
                else:  # differences Q_p - M in the input dtype, exponents below -EXP_CUT -> weight 0
                    d_diag = (q_diag - top).to(w_dtype)
                    d_up = (q_up - top).to(w_dtype)
                    d_left = (q_left - top).to(w_dtype)
                    p_diag = tl.where(d_diag > -EXP_CUT, tl.exp(d_diag), 0.0)
                    p_up = tl.where(d_up > -EXP_CUT, tl.exp(d_up), 0.0)
                    p_left = tl.where(d_left > -EXP_CUT, tl.exp(d_left), 0.0)
                    total = p_diag + p_up + p_left  # ≥ 1: the max term is exp(0)
                    p_diag = p_diag / total
                    p_up = p_up / total
                    p_left = p_left / total
                    q_new = top + tl.log(total).to(tl.float64) + c.to(tl.float64) * scale  # scale = -1/γ
                q_new = tl.where(valid, q_new, sentinel)
                tl.store(q_ptr + (row_k + i) * s_qr + b * s_qb, q_new, mask=inside)
                if STORE_W:
                    w_at = w_ptr + (row_k + i) * s_wr + b * s_wb
                    tl.store(w_at, tl.where(valid, p_diag, 0.0), mask=inside)
                    tl.store(w_at + s_wp, tl.where(valid, p_up, 0.0), mask=inside)
                    tl.store(w_at + 2 * s_wp, tl.where(valid, p_left, 0.0), mask=inside)
            tl.debug_barrier()  # diagonal k is stored before any thread reads it

    @triton.jit
    def backward_kernel(w_ptr, e_ptr, grad_ptr, dvalue_ptr, offset_ptr, xlen_ptr, ylen_ptr, batch, n, m,
                        flush, s_er, s_eb, s_wr, s_wp, s_wb, s_gb, s_gi, s_gj,
                        BLOCK_B: tl.constexpr, BLOCK_W: tl.constexpr):
        """E (skewed, seeded with 1 at each end cell) pulled from the successors, diagonals in reverse;
        grad[b, i-1, j-1] = E[i, j] · dvalue[b]."""
        pair = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        live = pair < batch
        nb = tl.load(xlen_ptr + pair, mask=live, other=0)
        mb = tl.load(ylen_ptr + pair, mask=live, other=0)
        dvalue = tl.load(dvalue_ptr + pair, mask=live, other=0.0)[None, :]
        last = tl.max(nb + mb, axis=0)
        b = pair.to(tl.int64)[None, :]
        live = live[None, :]
        lane = tl.arange(0, BLOCK_W).to(tl.int64)[:, None]
        for step in range(0, last - 1):
            k = last - step  # last .. 2
            first_i = tl.maximum(k - m, 1)
            last_i = tl.minimum(k - 1, n)
            row_k = tl.load(offset_ptr + k) - tl.maximum(k - m, 0)
            row_1 = tl.load(offset_ptr + k + 1) - tl.maximum(k + 1 - m, 0)  # offsets are padded to n+m+2
            row_2 = tl.load(offset_ptr + k + 2) - tl.maximum(k + 2 - m, 0)
            for start in range(first_i, last_i + 1, BLOCK_W):
                i = start + lane
                j = k - i
                inside = (i <= last_i) & live
                # successors that exist in the grid and lie on diagonals this program has written
                has_down = inside & (i < n) & (i + j < last)  # (i+1, j); i + j = k as a tensor
                has_right = inside & (j < m) & (i + j < last)  # (i, j+1)
                has_diag = has_down & (j < m) & (i + j + 1 < last)  # (i+1, j+1)
                e = tl.load(e_ptr + (row_k + i) * s_er + b * s_eb, mask=inside, other=0.0)  # the seed
                at = (row_2 + i + 1) * s_er + b * s_eb  # (i+1, j+1) on diagonal k+2
                term = tl.load(e_ptr + at, mask=has_diag, other=0.0, cache_modifier=".cg") * tl.load(
                    w_ptr + (row_2 + i + 1) * s_wr + b * s_wb, mask=has_diag, other=0.0)
                e += tl.where(term >= flush, term, 0.0)  # no denormals, as on the CPU
                at = (row_1 + i + 1) * s_er + b * s_eb  # (i+1, j) on diagonal k+1, its "up" predecessor
                term = tl.load(e_ptr + at, mask=has_down, other=0.0, cache_modifier=".cg") * tl.load(
                    w_ptr + (row_1 + i + 1) * s_wr + s_wp + b * s_wb, mask=has_down, other=0.0)
                e += tl.where(term >= flush, term, 0.0)
                at = (row_1 + i) * s_er + b * s_eb  # (i, j+1) on diagonal k+1, its "left" predecessor
                term = tl.load(e_ptr + at, mask=has_right, other=0.0, cache_modifier=".cg") * tl.load(
                    w_ptr + (row_1 + i) * s_wr + 2 * s_wp + b * s_wb, mask=has_right, other=0.0)
                e += tl.where(term >= flush, term, 0.0)
                tl.store(e_ptr + (row_k + i) * s_er + b * s_eb, e, mask=inside)
                tl.store(grad_ptr + b * s_gb + (i - 1) * s_gi + (j - 1) * s_gj, e * dvalue, mask=inside)
            tl.debug_barrier()  # diagonal k is stored before any thread reads it

    return forward_kernel, backward_kernel


@functools.lru_cache(maxsize=64)
def _diag_offsets(n: int, m: int, device: torch.device) -> Tensor:
    """(n+m+3,) int64: first skewed row of each diagonal k = 0..n+m+2 (the last two: past the end), as
    `_plan`."""
    k = torch.arange(n + m + 3)
    width = (k.clamp(max=n) - (k - m).clamp(min=0) + 1).clamp(min=0)  # cells of diagonal k
    return torch.cat([torch.zeros(1, dtype=torch.long), width.cumsum(0)[:-1]]).to(device)


def _launch_config(batch: int, n: int, m: int) -> tuple[int, int, int]:
    """(BLOCK_W, BLOCK_B, num_warps): cells per diagonal chunk, pairs per program, warps per program.

    BLOCK_W covers the longest diagonal up to _MAX_BLOCK_W; pairs per program double while the tile stays
    within _MAX_TILE and at least _MIN_PROGRAMS programs remain. BLOCK_B > 1 selects the pair-innermost
    layout.
    """
    block_w = min(1 << (min(n, m) - 1).bit_length(), _MAX_BLOCK_W)
    block_b = 1
    while (2 * block_b * block_w <= _MAX_TILE and 2 * block_b <= _MAX_BLOCK_B
           and batch >= 2 * block_b * _MIN_PROGRAMS):
        block_b *= 2
    return block_w, block_b, max(1, min(4, block_w * block_b // 32))


@dataclass
class _TritonPass:
    """What the Triton backward needs from a forward pass."""
    weights: Tensor  # (G, 3, B) pair innermost, or (B, 3, G)
    offsets: Tensor  # (n+m+3,) diagonal offsets
    x_lengths: Tensor  # (B,) int64
    y_lengths: Tensor
    end: Tensor  # (B,) skewed row of each end cell
    config: tuple[int, int, int]


def _triton_forward(cost: Tensor, gamma: float, x_lengths: Tensor | None, y_lengths: Tensor | None,
                    bandwidth: int | None, need_weights: bool) -> tuple[Tensor, _TritonPass | None]:
    """Q at each end cell (B,) float64, and the weights for the backward when needed (one kernel launch)."""
    forward_kernel, _ = _triton_kernels()
    batch, n, m = cost.shape
    device = cost.device
    block_w, block_b, warps = _launch_config(batch, n, m)
    pair_inner = block_b > 1
    offsets = _diag_offsets(n, m, device)
    cells = int(offsets[n + m + 1])  # G = (n+1)(m+1)
    xl = x_lengths if x_lengths is not None else torch.full((batch,), n, dtype=torch.long, device=device)
    yl = y_lengths if y_lengths is not None else torch.full((batch,), m, dtype=torch.long, device=device)
    c = cost.detach()
    if pair_inner:
        c = c.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (B, n, m) view of (n, m, B) storage
        q = torch.full((cells, batch), _sentinel(cost.dtype, n, m), dtype=torch.float64, device=device)
        q[0] = 0.0  # R[0, 0] = 0
        weights = torch.empty(cells, 3, batch, dtype=cost.dtype, device=device) if need_weights else q
        q_strides, w_strides = (batch, 1), ((3 * batch, batch, 1) if need_weights else (0, 0, 0))
    else:
        q = torch.full((batch, cells), _sentinel(cost.dtype, n, m), dtype=torch.float64, device=device)
        q[:, 0] = 0.0
        weights = torch.empty(batch, 3, cells, dtype=cost.dtype, device=device) if need_weights else q
        q_strides, w_strides = (1, cells), ((1, cells, 3 * cells) if need_weights else (0, 0, 0))
    forward_kernel[(_cdiv(batch, block_b),)](
        c, q, weights, offsets, xl, yl, batch, n, m, -1.0 / gamma if gamma > 0 else -1.0, bandwidth or 0,
        _sentinel(cost.dtype, n, m), *c.stride(), *q_strides, *w_strides, HARD=gamma == 0,
        BANDED=bandwidth is not None, STORE_W=need_weights, EXP_CUT=_EXP_CUT[cost.dtype], BLOCK_B=block_b,
        BLOCK_W=block_w, num_warps=warps, enable_fp_fusion=_FP_FUSION)
    end = offsets[xl + yl] + xl - (xl + yl - m).clamp(min=0)  # (B,) skewed row of (n_b, m_b)
    q_end = (q.gather(0, end.view(1, -1)) if pair_inner else q.gather(1, end.view(-1, 1))).view(batch)
    if not need_weights:
        return q_end, None
    return q_end, _TritonPass(weights, offsets, xl, yl, end, (block_w, block_b, warps))


def _triton_backward(state: _TritonPass, shape: torch.Size, dvalue: Tensor) -> Tensor:
    """(B, n, m) gradient E · dvalue from the stored weights (one kernel launch)."""
    _, backward_kernel = _triton_kernels()
    batch, n, m = shape
    block_w, block_b, warps = state.config
    weights = state.weights
    pair = torch.arange(batch, device=weights.device)
    if block_b > 1:  # (G, B)
        e = weights.new_zeros(weights.shape[0], batch)
        e[state.end, pair] = 1.0  # dR_b / dR[n_b, m_b] = 1
        e_strides, w_strides = (batch, 1), (3 * batch, batch, 1)
    else:  # (B, G)
        e = weights.new_zeros(batch, weights.shape[2])
        e[pair, state.end] = 1.0
        e_strides, w_strides = (1, e.shape[1]), (1, e.shape[1], 3 * e.shape[1])
    grad = weights.new_zeros(batch, n, m)
    dvalue = dvalue.to(weights.dtype).contiguous()
    backward_kernel[(_cdiv(batch, block_b),)](
        weights, e, grad, dvalue, state.offsets, state.x_lengths, state.y_lengths, batch, n, m,
        _FLUSH[weights.dtype], *e_strides, *w_strides, *grad.stride(), BLOCK_B=block_b, BLOCK_W=block_w,
        num_warps=warps, enable_fp_fusion=_FP_FUSION)
    return grad


def _cdiv(a: int, b: int) -> int:
    """Ceiling division (triton.cdiv without importing triton)."""
    return -(-a // b)


# ----------------------------------------------------------------------------- one interface over both
@dataclass
class _CpuPass:
    """What the CPU backward needs from a forward pass."""
    weights: Tensor  # (G, 3, B)
    steps: list
    interior_idx: Tensor
    end: Tensor


def _forward(cost: Tensor, gamma: float, x_lengths: Tensor | None, y_lengths: Tensor | None,
             bandwidth: int | None, need_weights: bool) -> tuple[Tensor, _CpuPass | _TritonPass | None]:
    """R[n_b, m_b] (B,) in the cost's dtype, and the state the backward needs (None without need_weights)."""
    if _use_triton(cost):
        q_end, state = _triton_forward(cost, gamma, x_lengths, y_lengths, bandwidth, need_weights)
    else:
        q, steps, interior_idx, end = _prepare(cost, gamma, x_lengths, y_lengths, bandwidth)
        weights = q.new_empty(q.shape[0], 3, q.shape[1], dtype=cost.dtype) if need_weights else None
        _wavefront(q, steps, weights, gamma == 0, cost.dtype)
        q_end = q.gather(0, end.view(1, -1)).view(-1)
        state = _CpuPass(weights, steps, interior_idx, end) if need_weights else None
    value = (q_end * (-gamma if gamma > 0 else -1.0)).to(cost.dtype)  # R = -γ Q
    _check_finite(value)
    return value, state


def _gradient(state: _CpuPass | _TritonPass, shape: torch.Size, dvalue: Tensor) -> Tensor:
    """(B, n, m) gradient of Σ_b dvalue[b] · R_b w.r.t. the cost: E · dvalue (Cuturi & Blondel Eq. 3-4)."""
    if isinstance(state, _TritonPass):
        return _triton_backward(state, shape, dvalue)
    batch, n, m = shape
    seed = state.weights.new_zeros(state.weights.shape[0], batch)
    seed.scatter_(0, state.end.view(1, -1), 1.0)  # dR_b / dR[n_b, m_b] = 1
    e = _backward_alignment(state.weights, state.steps, seed)
    return _unskew(e, state.interior_idx, n, m).mul_(dvalue.reshape(-1, 1, 1))


class _SoftDTW(torch.autograd.Function):
    """soft_dtw with the stored-weights backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, cost: Tensor, gamma: float, x_lengths: Tensor | None, y_lengths: Tensor | None,
                bandwidth: int | None) -> Tensor:
        value, ctx.state = _forward(cost, gamma, x_lengths, y_lengths, bandwidth, ctx.needs_input_grad[0])
        ctx.shape = cost.shape
        return value

    @staticmethod
    def backward(ctx, grad_value: Tensor) -> tuple[Tensor, None, None, None, None]:
        return _gradient(ctx.state, ctx.shape, grad_value), None, None, None, None


def soft_dtw(cost: Tensor, gamma: float, x_lengths: Tensor | None = None, y_lengths: Tensor | None = None,
             bandwidth: int | None = None) -> Tensor:
    """Soft-DTW value R[n_b, m_b] of each (n_b × m_b) cost matrix in the batch (Cuturi & Blondel Eq. 1-2).

    cost (B, n, m) float32/float64, entries outside each pair's lengths ignored; gamma ≥ 0 (0: hard DTW);
    x_lengths / y_lengths (B,) integer lengths (None: n / m); bandwidth: Sakoe-Chiba radius on each pair's own
    lengths (tslearn's definition), None for no band. Returns (B,), differentiable w.r.t. cost.
    CPU tensors run the wavefront of PyTorch ops, CUDA tensors the Triton kernels (module docstring).
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

    cost (n, m) -> one path; cost (B, n, m) -> a list of B paths. Backtracking: the one-hot argmax pointers
    stored by the γ = 0 forward are followed back from the end cell, for all pairs at once, by the same
    recursion as the backward (with one-hot weights E is exactly 1 on the path and 0 elsewhere); the 0/1
    matrix then goes to the host, where each pair's path is its sorted list of cells.
    """
    single = isinstance(cost, Tensor) and cost.dim() == 2
    batched = cost.unsqueeze(0) if single else cost
    _check_cost(batched, 0.0, bandwidth)
    batch, n, m = batched.shape
    x_lengths = _check_lengths(x_lengths, batch, n, "x_lengths")
    y_lengths = _check_lengths(y_lengths, batch, m, "y_lengths")
    if batch == 0:
        return []
    _, state = _forward(batched.detach(), 0.0, x_lengths, y_lengths, bandwidth, need_weights=True)
    ones = batched.new_ones(batch)
    on_path = (_gradient(state, batched.shape, ones) > 0.5).cpu()
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
    """All-pairs squared Euclidean costs (A, B, n, m) of x (A, n, d) and y (B, m, d) from one (A·n × B·m)
    matmul.

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
    """GAK local cost φ_σ(d²) = d²/(2σ²) + log(2 - exp(-d²/(2σ²))) (Cuturi et al. 2007; tslearn's
    σ).

    exp(-φ_σ) = κ/(2 - κ) with the Gaussian κ = exp(-d²/(2σ²)): the local kernel that Cuturi shows
    makes K positive definite.
    """
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"dtw.py: sigma must be a finite float > 0, got {sigma!r}")
    a = sq_dist * (0.5 / (sigma * sigma))
    if torch.is_grad_enabled() and a.requires_grad:
        # log(2 - e^-a) = log 2 + log1p(-e^-a / 2)
        return a + math.log(2.0) + torch.log1p(-0.5 * torch.exp(-a))
    # no autograd: the same formula in place, one temporary instead of five (Gram matrices are large)
    return torch.neg(a).exp_().mul_(-0.5).log1p_().add_(a).add_(math.log(2.0))


def _self_and_cross(x: Tensor, y: Tensor, x_lengths: Tensor | None, y_lengths: Tensor | None,
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Costs of (x,y), (x,x), (y,y) padded to one (3B, L, L) batch, with per-pair lengths (3B,) each side."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"dtw.py: expected x (B, n, d) and y (B, m, d), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
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


def log_gak(sq_dist: Tensor, sigma: float | Tensor, x_lengths: Tensor | None = None,
            y_lengths: Tensor | None = None) -> Tensor:
    """Unnormalised log K (B,) of each (n_b × m_b) squared-distance matrix in sq_dist (B, n, m):
    log K = -soft_dtw(φ_σ(d²), γ=1). sigma: one float, or a (B,) tensor, one σ per pair (Sugar's σ
    depends on the pair's lengths; φ_σ(d²) = φ_1(d²/σ²), so a per-pair σ is folded into the
    distances)."""
    if isinstance(sigma, Tensor):
        cost = phi_sigma(sq_dist / sigma.pow(2).view(-1, 1, 1), 1.0)  # (B, n, m)
    else:
        cost = phi_sigma(sq_dist, sigma)
    return -soft_dtw(cost, 1.0, x_lengths, y_lengths)


def normalised_gak(log_xy: Tensor, log_xx: Tensor, log_yy: Tensor) -> Tensor:
    """K̃(x,y) = exp(log K(x,y) - ½(log K(x,x) + log K(y,y))) ∈ (0, 1] (like `tslearn.metrics.gak`). The
    exponent is ≤ 0 by Cauchy-Schwarz for the positive definite K, up to rounding: the clamps keep rounding
    and an underflowing exp inside (0, 1]."""
    log_norm = log_xy - 0.5 * (log_xx + log_yy)
    return log_norm.clamp_max(0.0).exp().clamp_min(torch.finfo(log_norm.dtype).tiny)


def gak(x: Tensor, y: Tensor, sigma: float, x_lengths: Tensor | None = None,
        y_lengths: Tensor | None = None) -> Tensor:
    """Normalised global alignment kernel K̃(x_b, y_b) ∈ (0, 1], (B,) (tslearn's `gak` with the same
    σ)."""
    cost, left, right = _self_and_cross(x, y, x_lengths, y_lengths)
    log_xy, log_xx, log_yy = log_gak(cost, sigma, left, right).chunk(3)
    return normalised_gak(log_xy, log_xx, log_yy)


def _default_lengths(lengths: Tensor | None, count: int, size: int, device: torch.device,
                     name: str) -> Tensor:
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
    sq = pairwise_sq_euclidean(x, other).reshape(a * b, n, m)
    log_k = log_gak(sq, sigma, xl.repeat_interleave(b), ol.repeat(a)).view(a, b)
    if y is None:
        log_x = log_y = torch.diagonal(log_k)
    else:
        log_x = log_gak(sq_euclidean(x, x), sigma, xl, xl)
        log_y = log_gak(sq_euclidean(other, other), sigma, ol, ol)
    return normalised_gak(log_k, log_x.view(-1, 1), log_y.view(1, -1))
