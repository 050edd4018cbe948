"""Benchmark of dtw.py against tslearn 0.10, measured in the same run.

Workloads (forward + backward of soft-DTW, γ = 0.1, squared-Euclidean cost from d = 64 features, float32,
both implementations on the same cost tensor):
  (a) all pairs of 256 × 256 sequences of length 8 (65,536 pairs: the contrastive-batch workload),
  (b) 64 pairs of length 128,
  (c) 8 pairs of length 512;
plus the normalised GAK Gram matrix of 256 sequences of length 8 with 1,536-dimensional features (forward
only; dtw.py in float64 and in float32, tslearn in float64) against `tslearn.metrics.cdist_gak` (same σ:
tslearn's σ convention equals dtw.phi_sigma's).
The reference for soft-DTW is tslearn's numba autograd function `_SoftDTWLossPyTorch` (the function behind
`tslearn.metrics.SoftDTWLossPyTorch`, called directly so that both sides see the same cost tensor).

Time is the best of --repeats interleaved runs after one warm-up (numba compiles in the warm-up). Cells/s
counts the n·m DP cells of every pair. Peak extra memory is the rise of the process's peak RSS (Linux VmHWM,
reset through /proc/self/clear_refs) over the RSS just before the call, inputs already allocated;
"floats/cell" divides it by (pairs · n · m · bytes per float). Speed ratio = tslearn time / dtw.py time (>
1: dtw.py is faster).

With --device cuda the soft-DTW workloads are, in float32 on the GPU,
  (a) 65,536 pairs of length 8, (b) 64 pairs of length 128, (c) 8 pairs of length 512, (d) 512 pairs of length
  256, (e) 4096 pairs of length 64, (f) 32 pairs of length 1024, (g) 4 pairs of length 2048,
each from (pairs, n, 64) N(0,1) sequences, against pysdtw 0.0.5's numba CUDA kernel (`pysdtw.SoftDTW`, same
squared-Euclidean cost) when pysdtw and numba-cuda are installed (optional; pysdtw's kernel is limited to 1024
threads, so (f) and (g) report its failure), plus the GAK Gram matrix on the GPU against tslearn's cdist_gak
on the CPU. GPU times synchronise the device; memory is the peak of torch.cuda's allocator over what was
allocated before the call.

Run: python bench/bench_dtw.py [--repeats 3] [--device cuda]
"""
from __future__ import annotations

import argparse
import ctypes
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import dtw  # noqa: E402
from tslearn.metrics import cdist_gak  # noqa: E402
from tslearn.metrics.soft_dtw_loss_pytorch import _SoftDTWLossPyTorch  # noqa: E402


@dataclass
class BenchConfig:
    repeats: int = 5
    gamma: float = 0.1
    dim: int = 64
    gak_dim: int = 1536
    seed: int = 0


def _status_kib(field: str) -> int:
    """A memory field of /proc/self/status in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"bench_dtw.py: /proc/self/status has no field {field}")


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak RSS rise while running fn (Linux only: VmHWM reset by writing 5 to /proc/self/clear_refs).

    malloc_trim first hands freed heap pages back to the OS, so that memory reused from earlier runs counts.
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """Best wall time of each fn over repeats rounds, after one warm-up round.

    The rounds interleave the functions (ours, reference, ours, ...) so that load from other processes on a
    shared machine hits both sides alike; the minimum is the least load-disturbed run.
    """
    for fn in fns:
        fn()
    best = [math.inf] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - start)
    return best


def ours_fwd_bwd(cost: Tensor, gamma: float) -> Callable[[], Tensor]:
    def run() -> Tensor:
        c = cost.detach().requires_grad_(True)
        dtw.soft_dtw(c, gamma).sum().backward()
        return c.grad
    return run


def tslearn_fwd_bwd(cost: Tensor, gamma: float) -> Callable[[], Tensor]:
    def run() -> Tensor:
        c = cost.detach().clone().requires_grad_(True)  # tslearn writes +inf into masked cells of its input
        _SoftDTWLossPyTorch.apply(c, gamma).sum().backward()
        return c.grad
    return run


def soft_dtw_costs(case: str, cfg: BenchConfig) -> Tensor:
    """(pairs, n, m) float32 squared-Euclidean costs for workload a, b or c."""
    g = torch.Generator().manual_seed(cfg.seed)
    if case == "a":
        x = torch.randn(256, 8, cfg.dim, generator=g)
        return dtw.pairwise_sq_euclidean(x, x).reshape(256 * 256, 8, 8).contiguous()
    pairs, length = {"b": (64, 128), "c": (8, 512)}[case]
    x = torch.randn(pairs, length, cfg.dim, generator=g)
    y = torch.randn(pairs, length, cfg.dim, generator=g)
    return dtw.sq_euclidean(x, y).contiguous()



def row(name: str, cells: int, bytes_per_float: int, ours: tuple[float, int], ref: tuple[float, int],
        err: float) -> str:
    (t_o, m_o), (t_r, m_r) = ours, ref
    return (f"{name:<34} {t_o * 1e3:>9.1f} {t_r * 1e3:>9.1f} {t_r / t_o:>7.2f}x {cells / t_o / 1e6:>9.1f} "
            f"{cells / t_r / 1e6:>9.1f} {m_o / 2**20:>8.1f} {m_o / bytes_per_float / cells:>6.2f} "
            f"{m_r / 2**20:>8.1f} {m_r / bytes_per_float / cells:>6.2f} {err:>9.1e}")


def bench_soft_dtw(case: str, cfg: BenchConfig) -> str:
    cost = soft_dtw_costs(case, cfg)
    pairs, n, m = cost.shape
    ours, ref = ours_fwd_bwd(cost, cfg.gamma), tslearn_fwd_bwd(cost, cfg.gamma)
    err = ((ours() - ref()).norm() / ref().norm()).item()
    t_o, t_r = best_times([ours, ref], cfg.repeats)
    mem_o, mem_r = peak_extra_bytes(ours), peak_extra_bytes(ref)
    label = {"a": "(a) 256x256 all pairs, len 8", "b": "(b) 64 pairs, len 128",
             "c": "(c) 8 pairs, len 512"}[case]
    return row(label + " f+b", pairs * n * m, 4, (t_o, mem_o), (t_r, mem_r), err)


def bench_gak_gram(cfg: BenchConfig, dtype: torch.dtype) -> str:
    g = torch.Generator().manual_seed(cfg.seed)
    x64 = torch.randn(256, 8, cfg.gak_dim, generator=g, dtype=torch.float64)
    x, x_np = x64.to(dtype), x64.numpy()
    sigma = float(np.sqrt(cfg.gak_dim))  # φ_σ = O(1) for unit-variance features

    def ours() -> Tensor:
        with torch.no_grad():
            return dtw.gak_gram(x, None, sigma)

    def ref() -> np.ndarray:
        return cdist_gak(x_np, sigma=sigma)  # float64

    err = float(np.abs(ours().double().numpy() - ref()).max())
    t_o, t_r = best_times([ours, ref], cfg.repeats)
    mem_o, mem_r = peak_extra_bytes(ours), peak_extra_bytes(ref)
    name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
    return row(f"GAK Gram 256x8, d 1536, {name}", 256 * 256 * 64, x.element_size(), (t_o, mem_o),
               (t_r, mem_r), err)


# ----------------------------------------------------------------------------- --device cuda
CUDA_CASES = {"a": (65536, 8), "b": (64, 128), "c": (8, 512), "d": (512, 256), "e": (4096, 64),
              "f": (32, 1024), "g": (4, 2048)}


def cuda_best_times(fns: list[Callable[[], object]], repeats: int) -> list[float]:
    """best_times with the device synchronised around each call."""
    def synced(fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            out = fn()
            torch.cuda.synchronize()
            return out
        return run
    torch.cuda.synchronize()
    return best_times([synced(fn) for fn in fns], repeats)


def cuda_peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak of torch.cuda's allocator while running fn, over what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def load_pysdtw():
    """pysdtw's SoftDTW class, or None when pysdtw / numba-cuda are missing."""
    np.row_stack = np.vstack  # removed in numpy 2.5; numba-cuda still imports it
    try:
        import pysdtw
        return pysdtw
    except Exception as err:  # noqa: BLE001 -- any import failure means "not installed here"
        print(f"pysdtw unavailable ({type(err).__name__}: {err}); reporting dtw.py alone")
        return None


def bench_cuda_case(case: str, cfg: BenchConfig, pysdtw) -> str:
    pairs, length = CUDA_CASES[case]
    g = torch.Generator(device="cuda").manual_seed(cfg.seed)
    x = torch.randn(pairs, length, cfg.dim, generator=g, device="cuda")
    y = torch.randn(pairs, length, cfg.dim, generator=g, device="cuda")

    def ours() -> Tensor:
        xg = x.detach().requires_grad_(True)
        dtw.soft_dtw(dtw.sq_euclidean(xg, y), cfg.gamma).sum().backward()
        return xg.grad

    t_o, = cuda_best_times([ours], cfg.repeats)
    mem_o = cuda_peak_extra_bytes(ours)
    cells = pairs * length * length
    label = f"({case}) {pairs} pairs, len {length} f+b"
    text = f"{label:<34} {t_o * 1e3:>9.2f} {cells / t_o / 1e6:>10.1f} {mem_o / 4 / cells:>6.2f}"
    if pysdtw is None:
        return text
    try:
        sdtw = pysdtw.SoftDTW(gamma=cfg.gamma, dist_func=pysdtw.distance.pairwise_l2_squared, use_cuda=True)

        def ref() -> Tensor:
            xg = x.detach().requires_grad_(True)
            sdtw(xg, y).sum().backward()
            return xg.grad

        err = ((ours() - ref()).norm() / ref().norm()).item()
        t_r, = cuda_best_times([ref], cfg.repeats)
        mem_r = cuda_peak_extra_bytes(ref)
        return text + f" {t_r * 1e3:>9.2f} {t_r / t_o:>7.2f}x {mem_r / 4 / cells:>6.2f} {err:>9.1e}"
    except Exception as err:  # noqa: BLE001 -- e.g. its 1024-thread limit
        return text + f"  pysdtw failed: {type(err).__name__}: {str(err)[:60]}"


def bench_cuda_gak(cfg: BenchConfig) -> str:
    g = torch.Generator().manual_seed(cfg.seed)
    x64 = torch.randn(256, 8, cfg.gak_dim, generator=g, dtype=torch.float64)
    sigma = float(np.sqrt(cfg.gak_dim))
    rows = []
    for dtype in (torch.float64, torch.float32):
        x = x64.to(dtype).cuda()

        def ours() -> Tensor:
            with torch.no_grad():
                return dtw.gak_gram(x, None, sigma)

        ref = cdist_gak(x64.numpy(), sigma=sigma)
        err = float(np.abs(ours().double().cpu().numpy() - ref).max())
        t_o, = cuda_best_times([ours], cfg.repeats)
        t_r, = best_times([lambda: cdist_gak(x64.numpy(), sigma=sigma)], 1)
        name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
        rows.append(f"GAK Gram 256x8, d 1536, {name:<8} ours {t_o * 1e3:.2f} ms, tslearn cdist_gak (CPU) "
                    f"{t_r * 1e3:.1f} ms, {t_r / t_o:.1f}x, max abs diff {err:.1e}")
    return "\n".join(rows)


def main_cuda(cfg: BenchConfig) -> None:
    pysdtw = load_pysdtw()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; gamma={cfg.gamma}, d={cfg.dim}, "
          f"float32; best of {cfg.repeats} runs")
    print(f"{'workload':<34} {'ours ms':>9} {'ours Mc/s':>10} {'fl/c':>6} {'pysdtw ms':>9} {'speed':>8} "
          f"{'fl/c':>6} {'rel err':>9}")
    for case in CUDA_CASES:
        print(bench_cuda_case(case, cfg), flush=True)
    print(bench_cuda_gak(cfg), flush=True)
    print("speed = pysdtw time / dtw.py time; fl/c = peak extra GPU memory in floats per DP cell (inputs, "
          "cost matrix and gradients included); rel err = relative L2 difference of the x gradients")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=BenchConfig.repeats)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    cfg = BenchConfig(repeats=args.repeats)
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("bench_dtw.py: --device cuda needs a CUDA device")
        main_cuda(cfg)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; gamma={cfg.gamma}; best of "
          f"{cfg.repeats} interleaved runs")
    print(f"{'workload':<34} {'ours ms':>9} {'ts ms':>9} {'speed':>8} {'ours Mc/s':>9} {'ts Mc/s':>9} "
          f"{'ours MiB':>8} {'fl/c':>6} {'ts MiB':>8} {'fl/c':>6} {'rel err':>9}")
    for case in ("a", "b", "c"):
        print(bench_soft_dtw(case, cfg), flush=True)
    for dtype in (torch.float64, torch.float32):
        print(bench_gak_gram(cfg, dtype), flush=True)
    print("speed = tslearn time / dtw.py time; Mc/s = million DP cells per second; fl/c = peak extra memory "
          "in floats per DP cell; rel err = relative L2 gradient difference (soft-DTW, tslearn as reference) "
          "or max abs Gram difference (GAK)")


if __name__ == "__main__":
    main()
