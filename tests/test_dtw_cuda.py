"""dtw.py's Triton kernels on a CUDA GPU, against references computed on the CPU: the float64 brute force over
all alignment paths (tests/test_dtw.py) and the float64 CPU wavefront. Skipped where no GPU is visible, as in
CI; tests/test_dtw_triton.py runs the same kernels on the CPU under Triton's interpreter. What only a GPU
checks: the barrier between a program's warps on each diagonal, float32 rounding of the compiled code, and
the launch shapes of full-size workloads (many pairs per program, 2048-long pairs in 256-cell chunks).

Run (on a machine with a CUDA GPU): python -m pytest tests/test_dtw_cuda.py -q
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dtw  # noqa: E402
from test_dtw import band_paths, brute_soft_dtw, ragged_batch, rng_from  # noqa: E402
from test_dtw_triton import LAYOUTS  # noqa: E402

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.reference("triton")]
CUDA = torch.device("cuda")


@pytest.fixture(params=list(LAYOUTS))
def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    programs, block_w = LAYOUTS[request.param]
    monkeypatch.setattr(dtw, "_MIN_PROGRAMS", programs)
    monkeypatch.setattr(dtw, "_MAX_BLOCK_W", block_w)
    return request.param


@pytest.mark.parametrize("gamma", [0.05, 1.0])
@pytest.mark.parametrize("radius", [None, 1])
def test_values_and_gradients_equal_brute_force(layout: str, gamma: float, radius: int | None) -> None:
    cost, xl, yl = ragged_batch(int(gamma * 100) + (radius or 0))
    on_gpu = cost.to(CUDA, copy=True).requires_grad_(True)
    got = dtw.soft_dtw(on_gpu, gamma, torch.tensor(xl, device=CUDA), torch.tensor(yl, device=CUDA), radius)
    got.sum().backward()
    grad = on_gpu.grad.cpu()
    for b in range(cost.shape[0]):
        want, expected = brute_soft_dtw(cost[b, :xl[b], :yl[b]].numpy(), gamma, radius)
        assert got[b].item() == pytest.approx(want, rel=1e-9, abs=1e-9 * gamma)
        np.testing.assert_allclose(grad[b, :xl[b], :yl[b]].numpy(), expected, atol=1e-9)
        assert grad[b, xl[b]:].abs().sum() == 0 and grad[b, :, yl[b]:].abs().sum() == 0


@pytest.mark.parametrize("radius", [None, 0, 2])
def test_hard_dtw_and_paths(layout: str, radius: int | None) -> None:
    cost, xl, yl = ragged_batch(40 + (radius or 0), batch=5, n=6, m=5)
    on_gpu, lengths = cost.to(CUDA), (torch.tensor(xl, device=CUDA), torch.tensor(yl, device=CUDA))
    got = dtw.soft_dtw(on_gpu, 0.0, *lengths, radius)
    paths = dtw.hard_dtw_path(on_gpu, *lengths, radius)
    for b in range(cost.shape[0]):
        c = cost[b, :xl[b], :yl[b]]
        want = min(sum(c[i, j].item() for i, j in p) for p in band_paths(xl[b], yl[b], radius))
        assert got[b].item() == pytest.approx(want, rel=1e-12)
        assert paths[b][0] == (0, 0) and paths[b][-1] == (xl[b] - 1, yl[b] - 1)
        assert sum(c[i, j].item() for i, j in paths[b]) == pytest.approx(want, rel=1e-12)


# Full-size workloads with the default launch configuration: (pairs, n, m). They cover many pairs per program
# (65,536 × 8), one pair per program with every diagonal in one chunk (64 × 128, 8 × 512) and 2048-long pairs
# whose diagonals take eight 256-cell chunks.
WORKLOADS = [(65536, 8, 8), (64, 128, 128), (8, 512, 512), (2, 2048, 2048), (256, 64, 40)]


@pytest.mark.parametrize("pairs,n,m", WORKLOADS)
@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_float32_on_gpu_equals_float64_on_cpu(pairs: int, n: int, m: int, gamma: float) -> None:
    """Ragged N(0,1) pairs (d = 64): values within 1e-5 relative and gradients within 2e-4 relative L2 of
    the float64 CPU wavefront."""
    gen = torch.Generator().manual_seed(pairs + n)
    x64 = torch.randn(pairs, n, 64, dtype=torch.float64, generator=gen)
    y64 = torch.randn(pairs, m, 64, dtype=torch.float64, generator=gen)
    xl = torch.randint(max(1, n // 2), n + 1, (pairs,), generator=gen)
    yl = torch.randint(max(1, m // 2), m + 1, (pairs,), generator=gen)
    results = []
    for device, dtype in ((torch.device("cpu"), torch.float64), (CUDA, torch.float32)):
        x, y = (t.to(device, dtype).detach().requires_grad_(True) for t in (x64, y64))
        value = dtw.soft_dtw(dtw.sq_euclidean(x, y), gamma, xl.to(device), yl.to(device))
        value.backward(torch.linspace(0.5, 1.5, pairs, dtype=dtype, device=device))
        grad = torch.cat([x.grad.flatten(), y.grad.flatten()]).double().cpu()
        results.append((value.detach().double().cpu(), grad))
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert ((got_grad - want_grad).norm() / want_grad.norm()).item() < 2e-4


def test_divergence_gak_and_gram_equal_cpu() -> None:
    rng = rng_from(8)
    x, y = torch.tensor(rng.normal(size=(3, 5, 2))), torch.tensor(rng.normal(size=(3, 4, 2)))
    xl, yl = torch.tensor([5, 2, 3]), torch.tensor([4, 4, 1])
    results = []
    for device in ("cpu", CUDA):
        a, b, la, lb = (t.to(device) for t in (x, y, xl, yl))
        results.append([dtw.soft_dtw_divergence(a, b, 0.5, la, lb), dtw.gak(a, b, 1.5, la, lb),
                        dtw.gak_gram(a, None, 1.5, la)])
    for want, got in zip(*results):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-12, atol=1e-14)
