"""Benchmark: building Sugar's GAK target Gram matrix M_l (kernel.gak_targets; Sugar Eq. 2-4).

256 prefixes of 1 to 8 slices each (every prefix its own sample, so all 256*255/2 pairs need a GAK), teacher
features of 1,536 dimensions. Three ways to get the same matrix, timed in the same run:
- kernel.gak_targets: one batched soft-DTW over all pairs (+ the self terms);
- a per-pair Python loop over the same code (triple_kernel_sqdist, phi_sigma, soft_dtw with B = 1), timed on
  --loop-pairs pairs and extrapolated to all pairs;
- tslearn.metrics.cdist_gak (numba), on image-only slices with a fixed sigma, where the triple kernel is the
  plain Euclidean distance that tslearn knows; the max difference to ours is printed as a check.

Run: .venv/bin/python bench/bench_kernel.py [--prefixes 256] [--max-len 8] [--dim 1536] [--loop-pairs 200]
"""
import argparse
import math
import pathlib
import sys
import time

import torch
from tslearn.metrics import cdist_gak
from tslearn.utils import to_time_series_dataset

# run from anywhere: kernel.py, dtw.py
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import kernel  # noqa: E402
from dtw import phi_sigma, soft_dtw  # noqa: E402


def make_inputs(n_prefixes: int, max_len: int, dim: int, image_only: bool, seed: int = 0):
    """One sample per prefix; prefix p owns slices [p*max_len, p*max_len + len_p)."""
    gen = torch.Generator().manual_seed(seed)
    n_slices = n_prefixes * max_len
    uni = torch.nn.functional.normalize(torch.randn(n_slices, dim, generator=gen), dim=-1)  # (S, D)
    cross = torch.nn.functional.normalize(torch.randn(n_slices, dim, generator=gen), dim=-1)  # (S, D)
    if image_only:
        is_img = torch.ones(n_slices, dtype=torch.bool)
    else:
        is_img = torch.rand(n_slices, generator=gen) < 0.5
    prefix_slices = torch.arange(n_slices).view(n_prefixes, max_len)  # (P, L)
    prefix_len = torch.randint(1, max_len + 1, (n_prefixes,), generator=gen)  # (P,)
    prefix_batch = torch.arange(n_prefixes)  # (P,)
    return uni, cross, is_img, prefix_slices, prefix_len, prefix_batch


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def loop_pair(uni, cross, is_img, x: torch.Tensor, y: torch.Tensor, sigma: float) -> float:
    """Normalised GAK of one pair of slice sequences with the same building blocks as gak_targets."""

    def log_k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = kernel.triple_kernel_sqdist(uni[a], cross[a], is_img[a], uni[b], cross[b], is_img[b])  # (n, m)
        return -soft_dtw(phi_sigma(sq / sigma**2, 1.0)[None], 1.0)[0]

    return float((log_k(x, y) - 0.5 * (log_k(x, x) + log_k(y, y))).exp())


def time_loop(inputs, delta: float, n_pairs: int) -> tuple[float, int]:
    """Seconds for the first n_pairs pairs (i < j) of the per-pair loop, and the total pair count."""
    uni, cross, is_img, prefix_slices, prefix_len, _ = inputs
    n_prefixes = prefix_len.numel()
    pairs = [(i, j) for i in range(n_prefixes) for j in range(i + 1, n_prefixes)]
    seqs = [prefix_slices[p, : prefix_len[p]] for p in range(n_prefixes)]
    start = time.perf_counter()
    for i, j in pairs[:n_pairs]:
        sigma = delta * math.sqrt((len(seqs[i]) + len(seqs[j])) / 2)  # Sugar's per-pair sigma
        loop_pair(uni, cross, is_img, seqs[i], seqs[j], sigma)
    return time.perf_counter() - start, len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefixes", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1536)
    parser.add_argument("--loop-pairs", type=int, default=200,
                        help="pairs timed in the per-pair loop (then extrapolated)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    delta, sigma = 1.0, 1.0
    torch.set_grad_enabled(False)

    mixed = make_inputs(args.prefixes, args.max_len, args.dim, image_only=False)
    kernel.gak_targets(*mixed, delta=delta)  # warm-up
    t_ours = best_of(lambda: kernel.gak_targets(*mixed, delta=delta), args.repeats)
    t_sample, n_pairs = time_loop(mixed, delta, args.loop_pairs)
    t_loop = t_sample / min(args.loop_pairs, n_pairs) * n_pairs

    images = make_inputs(args.prefixes, args.max_len, args.dim, image_only=True)
    uni, _, _, prefix_slices, prefix_len, _ = images
    series = to_time_series_dataset([uni[prefix_slices[p, : prefix_len[p]]].double().numpy()
                                     for p in range(args.prefixes)])
    cdist_gak(series[:4], sigma=sigma)  # numba compilation outside the timing
    t_ours_fixed = best_of(lambda: kernel.gak_targets(*images, sigma=sigma), args.repeats)
    start = time.perf_counter()
    ref = torch.from_numpy(cdist_gak(series, sigma=sigma))
    t_tslearn = time.perf_counter() - start
    max_diff = (kernel.gak_targets(*images, sigma=sigma).double() - ref).abs().max().item()

    print(f"M_l for {args.prefixes} prefixes x up to {args.max_len} slices, {args.dim}-dim features, "
          f"{n_pairs} pairs, torch threads {torch.get_num_threads()}")
    print(f"{'method':58s} {'seconds':>9s} {'vs ours':>9s}")
    print(f"{'kernel.gak_targets (triple kernel, Sugar delta)':58s} {t_ours:9.3f} {1.0:8.1f}x")
    loop_name = f"per-pair loop, same code (extrapolated from {min(args.loop_pairs, n_pairs)} pairs)"
    print(f"{loop_name:58s} {t_loop:9.3f} {t_loop / t_ours:8.1f}x")
    print(f"{'kernel.gak_targets (image-only, fixed sigma)':58s} {t_ours_fixed:9.3f} {1.0:8.1f}x")
    print(f"{'tslearn.metrics.cdist_gak (same setting)':58s} {t_tslearn:9.3f} "
          f"{t_tslearn / t_ours_fixed:8.1f}x")
    print(f"max |ours - tslearn| = {max_diff:.2e}")


if __name__ == "__main__":
    main()
