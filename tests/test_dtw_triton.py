"""Tests for dtw.py's Triton kernels (the CUDA path), run on the CPU by Triton's interpreter.

TRITON_INTERPRET=1 must be in the environment before triton is first imported, so under a plain
`python -m pytest` this module holds one test that runs the module again in a subprocess with the variable
set; in that subprocess, dtw._TRITON_ON_CPU = True sends CPU tensors through the kernels. References: the
float64 brute-force enumeration of all alignment paths from tests/test_dtw.py, and the CPU wavefront. Every
kernel layout is exercised: many pairs per program (pair innermost), one pair per program (diagonal
innermost), and one pair per program with diagonals cut into 2-cell chunks (the no-length-cap loop). Shapes
are small: the interpreter runs each Triton op as numpy code. A second test compiles both kernels for an H100
(sm_90) without a GPU, which catches what the interpreter accepts but the compiler does not.

Run: python -m pytest tests/test_dtw_triton.py -q
     TRITON_INTERPRET=1 python -m pytest tests/test_dtw_triton.py -q  (the cases directly; -m slow: slow ones)
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dtw  # noqa: E402

pytestmark = pytest.mark.reference("triton", "tslearn.metrics")  # tests/conftest.py
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (_MIN_PROGRAMS, _MAX_BLOCK_W): pairs-per-program layout, one pair per program, and 2-cell diagonal chunks
LAYOUTS = {"pair_lanes": (1, 256), "diagonal": (10 ** 9, 256), "chunked": (10 ** 9, 2)}

if not INTERPRETED:
    def test_triton_kernels_under_interpreter() -> None:
        """This module's cases, in a subprocess with TRITON_INTERPRET=1."""
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
                              env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]

    def test_kernels_compile_for_sm90() -> None:
        """Both kernels compile to a cubin for an H100 (no GPU needed): the real compiler's checks."""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        forward_kernel, backward_kernel = dtw._triton_kernels()
        strides = {"i64": ["s_cb", "s_ci", "s_cj", "s_qr", "s_qb", "s_wr", "s_wp", "s_wb"]}
        signature = {"cost_ptr": "*fp32", "q_ptr": "*fp64", "w_ptr": "*fp32", "offset_ptr": "*i64",
                     "xlen_ptr": "*i64", "ylen_ptr": "*i64", "batch": "i32", "n": "i32", "m": "i32",
                     "scale": "fp64", "band": "i32", "sentinel": "fp64", **{s: "i64" for s in strides["i64"]}}
        constants = {"HARD": False, "BANDED": True, "STORE_W": True, "EXP_CUT": 40.0, "BLOCK_B": 1,
                     "BLOCK_W": 256}
        backward_signature = {"w_ptr": "*fp32", "e_ptr": "*fp32", "grad_ptr": "*fp32", "dvalue_ptr": "*fp32",
                              "offset_ptr": "*i64", "xlen_ptr": "*i64", "ylen_ptr": "*i64", "batch": "i32",
                              "n": "i32", "m": "i32", "flush": "fp32",
                              **{s: "i64" for s in ["s_er", "s_eb", "s_wr", "s_wp", "s_wb", "s_gb", "s_gi",
                                                    "s_gj"]}}
        for fn, sig, consts in ((forward_kernel, signature, constants),
                                (backward_kernel, backward_signature, {"BLOCK_B": 32, "BLOCK_W": 8})):
            sig = {**sig, **{name: "constexpr" for name in consts}}
            names = list(sig)
            source = ASTSource(fn=fn, signature=sig,
                               constexprs={(names.index(k),): v for k, v in consts.items()})
            options = {"num_warps": 4, "enable_fp_fusion": dtw._FP_FUSION}  # as dtw.py launches them
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
            ptx = compiled.asm["ptx"]
            assert "bar.sync" in ptx and "ld.global.cg" in ptx  # the per-diagonal barrier and L2-only loads
            # without fusion every multiply is written mul.rn (explicit rounding: ptxas may not contract it)
            assert ("mul.rn." in ptx) != dtw._FP_FUSION

else:
    from test_dtw import band_paths, brute_soft_dtw, ragged_batch, rng_from  # noqa: E402

    @pytest.fixture(params=list(LAYOUTS))
    def layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
        monkeypatch.setattr(dtw, "_TRITON_ON_CPU", True)
        programs, block_w = LAYOUTS[request.param]
        monkeypatch.setattr(dtw, "_MIN_PROGRAMS", programs)
        monkeypatch.setattr(dtw, "_MAX_BLOCK_W", block_w)
        return request.param

    def test_layout_config_is_what_the_fixture_asks(layout: str) -> None:
        block_w, block_b, _ = dtw._launch_config(6, 5, 4)
        assert (block_b > 1) == (layout == "pair_lanes") and (block_w == 2) == (layout == "chunked")

    @pytest.mark.parametrize("gamma", [0.05, 1.0])
    @pytest.mark.parametrize("radius", [None, 1])
    def test_values_and_gradients_equal_brute_force(layout: str, gamma: float, radius: int | None) -> None:
        cost, xl, yl = ragged_batch(int(gamma * 100) + (radius or 0))
        cost.requires_grad_(True)
        got = dtw.soft_dtw(cost, gamma, torch.tensor(xl), torch.tensor(yl), radius)
        got.sum().backward()
        for b in range(cost.shape[0]):
            want, expected = brute_soft_dtw(cost.detach()[b, :xl[b], :yl[b]].numpy(), gamma, radius)
            assert got[b].item() == pytest.approx(want, rel=1e-9, abs=1e-9 * gamma)
            np.testing.assert_allclose(cost.grad[b, :xl[b], :yl[b]].numpy(), expected, atol=1e-9)
            assert cost.grad[b, xl[b]:].abs().sum() == 0 and cost.grad[b, :, yl[b]:].abs().sum() == 0

    @pytest.mark.parametrize("radius", [None, 0, 2])
    def test_hard_dtw_and_paths(layout: str, radius: int | None) -> None:
        cost, xl, yl = ragged_batch(40 + (radius or 0), batch=5, n=6, m=5)
        got = dtw.soft_dtw(cost, 0.0, torch.tensor(xl), torch.tensor(yl), radius)
        paths = dtw.hard_dtw_path(cost, torch.tensor(xl), torch.tensor(yl), radius)
        for b in range(cost.shape[0]):
            c = cost[b, :xl[b], :yl[b]]
            want = min(sum(c[i, j].item() for i, j in p) for p in band_paths(xl[b], yl[b], radius))
            assert got[b].item() == pytest.approx(want, rel=1e-12)
            path = paths[b]
            assert path[0] == (0, 0) and path[-1] == (xl[b] - 1, yl[b] - 1)
            assert all((i2 - i1, j2 - j1) in ((1, 0), (0, 1), (1, 1))
                       for (i1, j1), (i2, j2) in zip(path, path[1:]))
            assert sum(c[i, j].item() for i, j in path) == pytest.approx(want, rel=1e-12)

    @pytest.mark.parametrize("gamma", [0.0, 0.3])
    def test_float32_and_float64_equal_cpu_wavefront(layout: str, gamma: float,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
        rng = rng_from(7)
        xl, yl = torch.tensor([6, 3, 5, 1, 2]), torch.tensor([4, 5, 2, 4, 1])
        base = torch.tensor(rng.uniform(0, 2, size=(5, 6, 5)))
        for dtype in (torch.float64, torch.float32):
            results = []
            for triton_path in (True, False):
                monkeypatch.setattr(dtw, "_TRITON_ON_CPU", triton_path)
                cost = base.to(dtype).clone().requires_grad_(True)
                value = dtw.soft_dtw(cost, gamma, xl, yl, 2)
                value.backward(torch.arange(1.0, 6.0, dtype=dtype))  # per-pair incoming gradients
                results.append((value.detach(), cost.grad))
            assert results[0][0].dtype == dtype and results[0][1].dtype == dtype
            tol = 1e-12 if dtype == torch.float64 else 1e-6
            torch.testing.assert_close(results[0][0], results[1][0], rtol=tol, atol=tol)
            torch.testing.assert_close(results[0][1], results[1][1], rtol=tol, atol=tol)

    def test_divergence_gak_and_gram_equal_cpu_wavefront(layout: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
        rng = rng_from(8)
        x, y = torch.tensor(rng.normal(size=(3, 5, 2))), torch.tensor(rng.normal(size=(3, 4, 2)))
        xl, yl = torch.tensor([5, 2, 3]), torch.tensor([4, 4, 1])
        results = []
        for triton_path in (True, False):
            monkeypatch.setattr(dtw, "_TRITON_ON_CPU", triton_path)
            results.append([dtw.soft_dtw_divergence(x, y, 0.5, xl, yl), dtw.gak(x, y, 1.5, xl, yl),
                            dtw.gak_gram(x, None, 1.5, xl)])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)

    def check_float32_precision(n: int, seeds: list[int], gammas: list[float]) -> None:
        """float32 gradients (Triton) within 2e-4 relative L2 of float64 (CPU) for N(0,1) inputs, d = 64."""
        dtw._TRITON_ON_CPU = True
        try:
            for seed in seeds:
                torch.manual_seed(seed)
                x64 = torch.randn(1, n, 64, dtype=torch.float64)
                y64 = torch.randn(1, n, 64, dtype=torch.float64)
                for gamma in gammas:
                    grads = []
                    for dtype, triton_path in ((torch.float64, False), (torch.float32, True)):
                        dtw._TRITON_ON_CPU = triton_path
                        x, y = (t.to(dtype).clone().requires_grad_(True) for t in (x64, y64))
                        dtw.soft_dtw(dtw.sq_euclidean(x, y), gamma).sum().backward()
                        grads.append(torch.cat([x.grad.flatten(), y.grad.flatten()]).double())
                    assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 2e-4, (seed, gamma)
        finally:
            dtw._TRITON_ON_CPU = False

    def test_float32_gradient_precision_n48() -> None:
        check_float32_precision(48, [2], [0.1, 1.0])

    @pytest.mark.slow
    def test_float32_gradient_precision_n512() -> None:
        check_float32_precision(512, [0, 2, 5], [0.1, 1.0])
