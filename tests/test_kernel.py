"""Tests for kernel.py: Sugar's triple kernel (Eq. 4), the GAK Gram targets (Eq. 2), the structure loss
(Eq. 3), VladVA's cross-rank contrastive loss and the combined loss.

Every value is compared with an independent reference written here: float64 Python loops (with a naive GAK
recursion, Cuturi's product-sum form, not dtw.py), tslearn.metrics.cdist_gak, finite differences (gradcheck),
and a real 2-process gloo DDP run against one process on the whole batch.

Run: .venv/bin/python -m pytest tests/test_kernel.py -x -q
"""
import datetime
import faulthandler
import math
import time
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
import kernel

# ----------------------------------------------------------------------------------------------------------
# independent float64 references


def naive_sqdist(uni_a, cross_a, img_a, uni_b, cross_b, img_b) -> np.ndarray:
    """Sugar Eq. 4 by explicit loops: uni-modal distance for same-modality slices, cross-modal otherwise."""
    out = np.zeros((len(img_a), len(img_b)))
    for a in range(len(img_a)):
        for b in range(len(img_b)):
            fa, fb = (uni_a[a], uni_b[b]) if bool(img_a[a]) == bool(img_b[b]) else (cross_a[a], cross_b[b])
            out[a, b] = sum((float(x) - float(y)) ** 2 for x, y in zip(fa, fb))
    return out


def naive_gak(sq: np.ndarray, sigma: float) -> float:
    """Unnormalised GAK (Cuturi et al. 2007): M[i, j] = k(i, j) * (M[i-1, j-1] + M[i-1, j] + M[i, j-1]), with
    the local kernel k = exp(-phi_sigma) = e / (2 - e), e = exp(-d^2 / (2 sigma^2))."""
    n, m = sq.shape
    table = [[0.0] * (m + 1) for _ in range(n + 1)]
    table[0][0] = 1.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            e = math.exp(-sq[i - 1, j - 1] / (2 * sigma**2))
            table[i][j] = e / (2 - e) * (table[i - 1][j - 1] + table[i - 1][j] + table[i][j - 1])
    return table[n][m]


def naive_targets(uni, cross, img, prefix_slices, prefix_len, prefix_batch, sigma=None,
                  delta=None) -> np.ndarray:
    n_prefixes = len(prefix_len)
    seqs = [[int(s) for s in prefix_slices[p][: int(prefix_len[p])]] for p in range(n_prefixes)]
    out = np.ones((n_prefixes, n_prefixes))
    for i in range(n_prefixes):
        for j in range(n_prefixes):
            if int(prefix_batch[i]) == int(prefix_batch[j]):
                continue
            x, y = seqs[i], seqs[j]
            s = sigma if sigma is not None else delta * math.sqrt((len(x) + len(y)) / 2)

            def sq(a, b):
                return naive_sqdist(uni[a], cross[a], img[a], uni[b], cross[b], img[b])

            out[i, j] = naive_gak(sq(x, y), s) / math.sqrt(naive_gak(sq(x, x), s) * naive_gak(sq(y, y), s))
    return out


def naive_median_delta(uni, cross, img) -> float:
    sq = naive_sqdist(uni, cross, img, uni, cross, img)
    d = [math.sqrt(sq[a, b]) for a in range(len(img)) for b in range(a + 1, len(img)) if sq[a, b] > 0]
    return float(np.median(d))


def naive_structure(r: np.ndarray, targets: np.ndarray) -> float:
    n = len(r)
    total = 0.0
    for i in range(n):
        for j in range(n):
            cos = float(r[i] @ r[j]) / (np.linalg.norm(r[i]) * np.linalg.norm(r[j]))
            total += (cos - targets[i, j]) ** 2
    return total / n


def naive_contrastive(img: np.ndarray, txt: np.ndarray, logit_scale: float, neg: np.ndarray | None = None,
                      valid: list[bool] | None = None) -> float:
    """neg, valid: hard-negative captions, extra terms of every image's image->text denominator where valid."""
    scale = min(math.exp(logit_scale), 100.0)
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    b = len(img)
    sim = [[scale * float(img[i] @ txt[j]) for j in range(b)] for i in range(b)]
    extra = [0.0] * b
    if neg is not None:
        neg = neg / np.linalg.norm(neg, axis=1, keepdims=True)
        extra = [sum(math.exp(scale * float(img[i] @ neg[k])) for k in range(b) if valid[k]) for i in range(b)]
    i2t = sum(-sim[i][i] + math.log(sum(math.exp(sim[i][j]) for j in range(b)) + extra[i]) for i in range(b)) / b
    t2i = sum(-sim[j][j] + math.log(sum(math.exp(sim[i][j]) for i in range(b))) for j in range(b)) / b
    return 0.5 * (i2t + t2i)


# ----------------------------------------------------------------------------------------------------------
# random batches


def unit(rows: int, dim: int, gen: torch.Generator) -> torch.Tensor:
    return nn.functional.normalize(torch.randn(rows, dim, generator=gen, dtype=torch.float64), dim=-1)


def make_batch(seed: int, n_slices: int = 10, n_prefixes: int = 7, max_len: int = 4, n_samples: int = 4):
    """Teacher features of unit norm (as the teachers give), prefixes of random lengths; the padding of
    prefix_slices holds random valid indices, so a kernel that read past a prefix's length would be caught."""
    gen = torch.Generator().manual_seed(seed)
    uni, cross = unit(n_slices, 6, gen), unit(n_slices, 5, gen)
    img = torch.rand(n_slices, generator=gen) < 0.5
    prefix_slices = torch.randint(0, n_slices, (n_prefixes, max_len), generator=gen)
    prefix_len = torch.randint(1, max_len + 1, (n_prefixes,), generator=gen)
    prefix_batch = torch.randint(0, n_samples, (n_prefixes,), generator=gen)
    return uni, cross, img, prefix_slices, prefix_len, prefix_batch


# ----------------------------------------------------------------------------------------------------------
# triple kernel and targets


def test_triple_kernel_matches_loops():
    gen = torch.Generator().manual_seed(0)
    ua, ca, ia = unit(5, 6, gen), unit(5, 3, gen), torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    ub, cb, ib = unit(4, 6, gen), unit(4, 3, gen), torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    got = kernel.triple_kernel_sqdist(ua, ca, ia, ub, cb, ib)
    np.testing.assert_allclose(got.numpy(), naive_sqdist(ua, ca, ia, ub, cb, ib), atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("mode", ["sigma", "delta", "default"])
def test_targets_match_naive_gak(seed, mode):
    uni, cross, img, ps, pl, pb = make_batch(seed)
    if mode == "sigma":
        kwargs = {"sigma": 0.8}
    elif mode == "delta":
        kwargs = {"delta": 0.6}
    else:
        kwargs = {}
    got = kernel.gak_targets(uni, cross, img, ps, pl, pb, **kwargs)
    ref_kwargs = kwargs if kwargs else {"delta": naive_median_delta(uni, cross, img)}
    ref = naive_targets(uni, cross, img, ps, pl, pb, **ref_kwargs)
    assert got.dtype == torch.float64 and not got.requires_grad
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_targets_float32_close_to_float64():
    uni, cross, img, ps, pl, pb = make_batch(3)
    got = kernel.gak_targets(uni.float(), cross.float(), img, ps, pl, pb, delta=0.7)
    ref = naive_targets(uni, cross, img, ps, pl, pb, delta=0.7)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4, atol=1e-6)


def test_targets_match_tslearn_cdist_gak():
    """Image slices only: the triple kernel is then the plain Euclidean distance of the uni-modal features,
    and tslearn's normalised cdist_gak (same phi_sigma, fixed sigma) is a second reference."""
    # imported here: tslearn pulls in numba (seconds), which the spawned DDP workers need not pay
    from tslearn.metrics import cdist_gak
    from tslearn.utils import to_time_series_dataset

    gen = torch.Generator().manual_seed(4)
    n_slices, n_prefixes, max_len = 14, 6, 5
    uni, cross = unit(n_slices, 8, gen), unit(n_slices, 3, gen)
    img = torch.ones(n_slices, dtype=torch.bool)
    ps = torch.randint(0, n_slices, (n_prefixes, max_len), generator=gen)
    pl = torch.randint(1, max_len + 1, (n_prefixes,), generator=gen)
    pb = torch.arange(n_prefixes)
    got = kernel.gak_targets(uni, cross, img, ps, pl, pb, sigma=0.9)
    series = to_time_series_dataset([uni[ps[p, : pl[p]]].numpy() for p in range(n_prefixes)])
    np.testing.assert_allclose(got.numpy(), cdist_gak(series, sigma=0.9), rtol=1e-8, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n_prefixes=st.integers(1, 9),
    max_len=st.integers(1, 6),
    scale=st.floats(0.2, 3.0),
    mode=st.sampled_from(["sigma", "delta", "default"]),
)
def test_targets_properties(seed, n_prefixes, max_len, scale, mode):
    uni, cross, img, ps, pl, pb = make_batch(seed, n_slices=8, n_prefixes=n_prefixes, max_len=max_len,
                                             n_samples=5)
    kwargs = {"sigma": {"sigma": scale}, "delta": {"delta": scale}, "default": {}}[mode]
    m = kernel.gak_targets(uni.float(), cross.float(), img, ps, pl, pb, **kwargs)
    assert m.shape == (n_prefixes, n_prefixes)
    assert torch.equal(m, m.T)
    assert torch.all(m.diagonal() == 1)
    assert torch.all(m > 0) and torch.all(m <= 1)
    same_sample = pb[:, None] == pb[None, :]
    assert torch.all(m[same_sample] == 1)


def test_targets_empty_batch():
    uni, cross, img, _, _, _ = make_batch(0)
    empty = torch.zeros(0, dtype=torch.long)
    m = kernel.gak_targets(uni, cross, img, torch.zeros(0, 3, dtype=torch.long), empty, empty, sigma=1.0)
    assert m.shape == (0, 0)


# ----------------------------------------------------------------------------------------------------------
# the ablation switches (Sugar Table 4b) and the single-slice rule (Sugar §3.2)


def naive_feats(uni, cross, img, a: int, b: int, kernel: str):
    """The teacher features Eq. 4 compares for slices a and b: uni-modal for one modality, cross-modal for an
    image and a text; kernel "cross" (w/o TK): cross-modal for every pair."""
    if kernel == "triple" and bool(img[a]) == bool(img[b]):
        return [float(x) for x in uni[a]], [float(x) for x in uni[b]]
    return [float(x) for x in cross[a]], [float(x) for x in cross[b]]


def naive_cos(u, v) -> float:
    return sum(x * y for x, y in zip(u, v)) / math.sqrt(sum(x * x for x in u) * sum(y * y for y in v))


def naive_gak_kernel(uni, cross, img, x, y, sigma, kernel) -> float:
    def sq(p, q):
        out = np.zeros((len(p), len(q)))
        for a in range(len(p)):
            for b in range(len(q)):
                fa, fb = naive_feats(uni, cross, img, p[a], q[b], kernel)
                out[a, b] = sum((s - t) ** 2 for s, t in zip(fa, fb))
        return out

    return naive_gak(sq(x, y), sigma) / math.sqrt(naive_gak(sq(x, x), sigma) * naive_gak(sq(y, y), sigma))


def prefix_lists(ps, pl):
    return [[int(s) for s in ps[p][: int(pl[p])]] for p in range(len(pl))]


@pytest.mark.parametrize("kernel_name", ["triple", "cross"])
def test_cross_kernel_sqdist_matches_loops(kernel_name):
    gen = torch.Generator().manual_seed(11)
    ua, ca, ia = unit(5, 6, gen), unit(5, 3, gen), torch.tensor([1, 0, 1, 0, 0], dtype=torch.bool)
    ub, cb, ib = unit(4, 6, gen), unit(4, 3, gen), torch.tensor([0, 1, 1, 0], dtype=torch.bool)
    got = kernel.triple_kernel_sqdist(ua, ca, ia, ub, cb, ib, kernel=kernel_name)
    ref = np.zeros((5, 4))
    for a in range(5):
        for b in range(4):
            fa = ua[a] if kernel_name == "triple" and ia[a] == ib[b] else ca[a]
            fb = ub[b] if kernel_name == "triple" and ia[a] == ib[b] else cb[b]
            ref[a, b] = sum((float(x) - float(y)) ** 2 for x, y in zip(fa, fb))
    np.testing.assert_allclose(got.numpy(), ref, atol=1e-12)
    if kernel_name == "cross":  # w/o TK changes exactly the same-modality pairs
        triple = kernel.triple_kernel_sqdist(ua, ca, ia, ub, cb, ib)
        differ = ia[:, None] != ib[None, :]
        # The two kernels reach the image-text pairs through different matmul shapes, so equal up to
        # rounding, not bit for bit; the same-modality pairs use other features and differ by far more.
        torch.testing.assert_close(got[differ], triple[differ], rtol=0, atol=1e-12)
        assert (got[~differ] - triple[~differ]).abs().min() > 1e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kernel_name", ["triple", "cross"])
def test_mean_targets_match_loops(seed, kernel_name):
    """w/o GAK: the mean over every slice pair of the cosine of the teacher features, by explicit loops; the
    features are rescaled rows, so a dot product of unnormalised features would be caught."""
    uni, cross, img, ps, pl, pb = make_batch(seed, max_len=5)
    gen = torch.Generator().manual_seed(seed + 100)
    uni = uni * (0.5 + torch.rand(uni.shape[0], 1, generator=gen, dtype=torch.float64))
    cross = cross * (0.5 + torch.rand(cross.shape[0], 1, generator=gen, dtype=torch.float64))
    got = kernel.mean_targets(uni, cross, img, ps, pl, pb, kernel=kernel_name)
    seqs = prefix_lists(ps, pl)
    ref = np.ones((len(seqs), len(seqs)))
    for i, x in enumerate(seqs):
        for j, y in enumerate(seqs):
            if int(pb[i]) != int(pb[j]):
                sims = [naive_cos(*naive_feats(uni, cross, img, a, b, kernel_name)) for a in x for b in y]
                ref[i, j] = sum(sims) / len(sims)
    assert got.dtype == torch.float64 and not got.requires_grad
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kernel_name", ["triple", "cross"])
def test_single_slice_cosine_and_kernel_switch_match_loops(seed, kernel_name):
    """single="cosine": two one-slice prefixes get the cosine of the features Eq. 4 picks (uni-modal within a
    modality, cross-modal across; cross-modal only for kernel "cross"); every other pair keeps the GAK with
    that kernel's distances. Both against loops."""
    uni, cross, img, ps, pl, pb = make_batch(seed, n_prefixes=9, max_len=3)
    pl[:4] = 1  # several one-slice prefixes (of different samples with high probability)
    got = kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=0.7, kernel=kernel_name, single="cosine")
    gak = kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=0.7, kernel=kernel_name, single="gak")
    seqs = prefix_lists(ps, pl)
    ref, ref_gak = np.ones((len(seqs), len(seqs))), np.ones((len(seqs), len(seqs)))
    n_single_pairs = 0
    for i, x in enumerate(seqs):
        for j, y in enumerate(seqs):
            if int(pb[i]) == int(pb[j]):
                continue
            sigma = 0.7 * math.sqrt((len(x) + len(y)) / 2)
            ref_gak[i, j] = naive_gak_kernel(uni, cross, img, x, y, sigma, kernel_name)
            ref[i, j] = ref_gak[i, j]
            if len(x) == len(y) == 1:
                ref[i, j] = naive_cos(*naive_feats(uni, cross, img, x[0], y[0], kernel_name))
                n_single_pairs += 1
    assert n_single_pairs > 0
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gak.numpy(), ref_gak, rtol=1e-9, atol=1e-12)


def test_single_slice_gak_is_e_over_two_minus_e():
    """The "gak" form of a one-slice pair in closed form: e / (2 - e), e = exp(-d^2 / (2 sigma^2))."""
    gen = torch.Generator().manual_seed(12)
    uni, cross, img = unit(2, 4, gen), unit(2, 3, gen), torch.tensor([True, False])
    ps, pl, pb = torch.tensor([[0], [1]]), torch.tensor([1, 1]), torch.tensor([0, 1])
    got = kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=0.9, single="gak")[0, 1].item()
    d2 = float((cross[0] - cross[1]).pow(2).sum())  # image-text: cross-modal features
    e = math.exp(-d2 / (2 * 0.9**2))  # sigma = delta * sqrt((1 + 1) / 2)
    assert got == pytest.approx(e / (2 - e), rel=1e-12)
    cos = kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=0.9, single="cosine")[0, 1].item()
    assert cos == pytest.approx(float(cross[0] @ cross[1]), rel=1e-12)


@pytest.mark.parametrize("kernel_name", ["triple", "cross"])
def test_estimate_delta_is_median_slice_distance(kernel_name):
    uni, cross, img, _, _, _ = make_batch(13, n_slices=15)
    d = [math.sqrt(sum((s - t) ** 2 for s, t in zip(*naive_feats(uni, cross, img, a, b, kernel_name))))
         for a in range(15) for b in range(a + 1, 15)]
    got = kernel.estimate_delta(uni, cross, img, kernel=kernel_name)
    assert got == pytest.approx(sorted(d)[(len(d) - 1) // 2], rel=1e-12)  # torch's median: the lower middle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_estimate_delta_ignores_repeated_slices(dtype):
    """A slice that recurs (the same caption in two samples) is 0 away from its copy; the matmul expansion's
    rounding noise must not turn that 0 into a tiny positive distance that shifts the median."""
    gen = torch.Generator().manual_seed(15)
    # BLAS-sized
    uni, cross, img = unit(30, 384, gen), unit(30, 256, gen), torch.rand(30, generator=gen) < 0.5
    rep = torch.tensor(list(range(30)) + [0] * 30)  # slice 0 recurs 30 times: 465 pairs 0 apart
    uni, cross, img = uni[rep], cross[rep], img[rep]
    u, c, i = uni.numpy(), cross.numpy(), img.numpy()
    d_all = np.where(i[:, None] == i[None, :], np.linalg.norm(u[:, None] - u[None], axis=-1),  # differences,
                     np.linalg.norm(c[:, None] - c[None], axis=-1))  # not the expansion: copies are exactly 0
    d = np.sort(d_all[np.triu_indices(len(rep), 1)])
    d = d[d > 0]
    got = kernel.estimate_delta(uni.to(dtype), cross.to(dtype), img)
    assert got == pytest.approx(d[(len(d) - 1) // 2], rel=1e-6 if dtype == torch.float32 else 1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n_prefixes=st.integers(1, 9), max_len=st.integers(1, 5),
       kernel_name=st.sampled_from(["triple", "cross"]))
def test_mean_targets_properties(seed, n_prefixes, max_len, kernel_name):
    """Symmetric, 1 within a sample, a mean of cosines in [-1, 1]; one-slice pairs equal the cosine rule."""
    uni, cross, img, ps, pl, pb = make_batch(seed, n_slices=8, n_prefixes=n_prefixes, max_len=max_len,
                                             n_samples=5)
    m = kernel.mean_targets(uni, cross, img, ps, pl, pb, kernel=kernel_name)
    assert torch.equal(m, m.T)
    assert torch.all(m[pb[:, None] == pb[None, :]] == 1)
    assert torch.all(m.abs() <= 1 + 1e-12)
    g = kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=1.0, kernel=kernel_name, single="cosine")
    one = (pl[:, None] == 1) & (pl[None, :] == 1)
    torch.testing.assert_close(m[one], g[one], rtol=1e-12, atol=1e-12)


def test_ablation_switches_reject_unknown_names():
    uni, cross, img, ps, pl, pb = make_batch(14)
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=1.0, kernel="clip")
    with pytest.raises(ValueError, match="single must be one of"):
        kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=1.0, single="dot")
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernel.mean_targets(uni, cross, img, ps, pl, pb, kernel="uni")


# ----------------------------------------------------------------------------------------------------------
# structure loss


def test_structure_loss_matches_naive_and_gradcheck():
    gen = torch.Generator().manual_seed(5)
    r = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    uni, cross, img, ps, pl, pb = make_batch(5, n_prefixes=6)
    targets = kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=0.8)
    got = kernel.structure_loss(r, targets)
    assert got.item() == pytest.approx(naive_structure(r.detach().numpy(), targets.numpy()), rel=1e-12)
    assert torch.autograd.gradcheck(kernel.structure_loss, (r, targets.clone().requires_grad_()))


def test_structure_loss_no_prefixes_is_attached_zero():
    r = torch.zeros(0, 4, requires_grad=True)
    loss = kernel.structure_loss(r, torch.zeros(0, 0))
    loss.backward()
    assert loss.item() == 0 and r.grad is not None


# ----------------------------------------------------------------------------------------------------------
# contrastive loss


@pytest.mark.parametrize("log_scale", [math.log(1 / 0.07), 0.3, math.log(250.0)])
def test_contrastive_matches_naive(log_scale):
    gen = torch.Generator().manual_seed(6)
    img = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    txt = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    got = kernel.contrastive_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64))
    assert got.item() == pytest.approx(naive_contrastive(img.numpy(), txt.numpy(), log_scale), rel=1e-12)


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 6), valid=st.lists(st.booleans(), min_size=6, max_size=6), seed=st.integers(0, 2**16))
def test_contrastive_hard_negatives_join_the_image_to_text_denominator(b, valid, seed):
    """--pair-twins caption (NegCLIP): each valid negative caption is one more wrong caption for every image;
    an invalid one is no term at all; the text->image direction is unchanged."""
    gen = torch.Generator().manual_seed(seed)
    img, txt, neg = (torch.randn(b, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    log_scale = math.log(1 / 0.07)
    got = kernel.contrastive_loss(img, txt, torch.tensor(log_scale, dtype=torch.float64), 100.0, neg,
                                  torch.tensor(valid[:b]))
    want = naive_contrastive(img.numpy(), txt.numpy(), log_scale, neg.numpy(), valid[:b])
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_contrastive_gradcheck_and_clamp():
    gen = torch.Generator().manual_seed(7)
    img = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    txt = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(1.2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kernel.contrastive_loss, (img, txt, scale))
    neg = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([True, False, True, True])
    assert torch.autograd.gradcheck(lambda *x: kernel.contrastive_loss(*x, 100.0, neg, valid), (img, txt, scale))
    clamped = torch.tensor(math.log(300.0), dtype=torch.float64, requires_grad=True)
    kernel.ContrastiveLoss()(img, txt, clamped).backward()
    assert clamped.grad.item() == 0.0  # above CLIP's 100 the temperature is frozen


@pytest.mark.parametrize("loss", ["contrastive", "structure"])
def test_losses_stay_float32_inside_bf16_autocast(loss):
    """train.py's CUDA path runs compute_loss under bf16 autocast, which casts every matmul's inputs to bf16
    (a cosine to about 0.004). Both losses must still be the float64 loss to float32 rounding, value and
    gradient, on summaries as alike as a Winoground pair's (cosines about 0.9), at CLIP's logit scale of 100."""
    gen = torch.Generator().manual_seed(11)
    common = 3 * torch.randn(1, 128, generator=gen)
    x = (common + torch.randn(64, 128, generator=gen)).requires_grad_()  # (B, d)
    y = common + 0.5 * torch.randn(64, 128, generator=gen) + 0.3 * x.detach()  # (B, d)
    unit_y = torch.nn.functional.normalize(y.double(), dim=-1)
    targets = unit_y @ unit_y.T  # (B, B): near the cosines of x, so the loss is small and sensitive

    def f(a):
        if loss == "contrastive":
            return kernel.contrastive_loss(a, y.to(a.dtype), torch.tensor(math.log(100.0), dtype=a.dtype))
        return kernel.structure_loss(a, targets)

    x64 = x.detach().double().requires_grad_()
    want = f(x64)
    want.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = f(x)
    got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-4 * x64.grad.abs().max().item())


class _Towers(nn.Module):
    """Two linear towers + CLIP's learnable logit_scale: the parameters DDP averages."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(11)
        self.img = nn.Linear(5, 4).double()
        self.txt = nn.Linear(5, 4).double()
        for p in (*self.img.parameters(), *self.txt.parameters()):
            p.data = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07), dtype=torch.float64))

    def forward(self, x_img, x_txt, x_neg=None, valid=None):
        neg = None if x_neg is None else self.txt(x_neg)  # hard-negative captions through the text tower
        return kernel.contrastive_loss(self.img(x_img), self.txt(x_txt), self.logit_scale, 100.0, neg, valid)


def _full_batch(world: int, per_rank: int):
    """Images, captions, hard-negative captions and which negatives are real (every third is not)."""
    gen = torch.Generator().manual_seed(12)
    return (*(torch.randn(world * per_rank, 5, generator=gen, dtype=torch.float64) for _ in range(3)),
            torch.arange(world * per_rank) % 3 != 1)


def _prefix_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix embeddings of every rank (rank r's r + 2 rows, in rank order) and structure targets for them."""
    gen = torch.Generator().manual_seed(13)
    n = sum(range(2, world + 2))
    return torch.randn(n, 4, generator=gen, dtype=torch.float64), torch.rand(n, n, generator=gen, dtype=torch.float64)


def _ddp_worker(rank: int, world: int, port: int, per_rank: int, out_dir: str, negatives: bool):
    # While the worker lives, every thread's stack goes to a file each 30 s: a worker stuck where no timeout
    # reaches (process teardown) leaves a trace the parent reports.
    stacks = open(f"{out_dir}/rank{rank}.stacks", "w")
    faulthandler.dump_traceback_later(30, repeat=True, file=stacks)
    # The store lives in the parent (as under torchrun), so no rank's exit can take it from the other; the
    # timeout turns a stuck collective into an error instead of a hung CI job.
    store = dist.TCPStore("127.0.0.1", port, world + 1, is_master=False, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        model = nn.parallel.DistributedDataParallel(_Towers())
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        x_img, x_txt, x_neg = (x[rows].clone().requires_grad_() for x in _full_batch(world, per_rank)[:3])
        valid = _full_batch(world, per_rank)[3][rows]
        loss = model(x_img, x_txt, *((x_neg, valid) if negatives else ()))
        loss.backward()
        grads = {name: p.grad for name, p in model.module.named_parameters()}
        # Sugar's prefixes: rank r holds r + 2 rows, so the ranks' counts differ (train.py with --data documents)
        prefixes, targets = _prefix_batch(world)
        own = prefixes[sum(range(2, rank + 2)):sum(range(2, rank + 3))].clone().requires_grad_()
        gathered = kernel.gather_rows_with_grad(own)
        kernel.structure_loss(gathered, targets).backward()
        torch.save({"loss": loss.detach(), "grads": grads, "x_img": x_img.grad, "x_txt": x_txt.grad,
                    "x_neg": x_neg.grad, "prefixes": gathered.detach(), "x_prefix": own.grad},
                   f"{out_dir}/rank{rank}.pt")
        dist.barrier()  # the other rank may still be in a collective with this one
    finally:
        dist.destroy_process_group()


def _run_ddp_workers(world: int, per_rank: int, out_dir, negatives: bool, limit_s: float = 90) -> list[dict]:
    """Runs _ddp_worker on `world` gloo ranks; returns each rank's saved results. Fails with the workers'
    stacks if a rank has not saved its results within limit_s. A rank that saved them but has not exited
    (stuck in teardown, after its last collective) is terminated with a warning that carries its stacks:
    the results it saved are complete."""
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=60))
    workers = mp.spawn(_ddp_worker, args=(world, store.port, per_rank, str(out_dir), negatives), nprocs=world,
                       join=False)
    deadline = time.monotonic() + limit_s
    while not workers.join(timeout=1):  # raises if a worker fails
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.terminate()
            stacks = "\n".join(f"rank {r}:\n{(out_dir / f'rank{r}.stacks').read_text()}" for r in range(world))
            if not all((out_dir / f"rank{r}.pt").exists() for r in range(world)):
                pytest.fail(f"the {world} DDP workers did not finish within {limit_s} s; their stacks:\n{stacks}")
            warnings.warn(f"the {world} DDP workers saved their results but did not exit within {limit_s} s; "
                          f"their stacks:\n{stacks}")
            break
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("negatives", [False, True])
def test_contrastive_ddp_two_ranks_equals_one_process(tmp_path, negatives):
    """2 gloo ranks, real DDP: the mean of the rank losses is the whole-batch loss, the parameter gradients
    DDP averages (towers + shared logit_scale) are the whole-batch gradients, and each rank's input gradient
    divided by the world size (what DDP's averaging applies upstream) is the whole-batch input gradient; with
    hard-negative captions too (each rank's negatives are columns of every rank's images). And Sugar's prefixes
    with unequal counts per rank (kernel.gather_rows_with_grad)."""
    world, per_rank = 2, 3
    ranks = _run_ddp_workers(world, per_rank, tmp_path, negatives)

    model = _Towers()
    *xs, valid = _full_batch(world, per_rank)
    x_img, x_txt, x_neg = (x.requires_grad_() for x in xs)
    loss = model(x_img, x_txt, *((x_neg, valid) if negatives else ()))
    loss.backward()

    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-12)
    for name, p in model.named_parameters():
        for r in ranks:  # DDP leaves the same averaged gradient on every rank
            torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-10, atol=1e-12)
    for key, x in (("x_img", x_img), ("x_txt", x_txt)) + ((("x_neg", x_neg),) if negatives else ()):
        torch.testing.assert_close(torch.cat([r[key] for r in ranks]) / world, x.grad, rtol=1e-10, atol=1e-12)
    # Sugar's prefixes, 2 and 3 rows: every rank gathers all 5 in rank order, and each rank's gradient over
    # the world size is the one-process gradient of the structure loss
    prefixes, targets = _prefix_batch(world)
    prefixes.requires_grad_()
    kernel.structure_loss(prefixes, targets).backward()
    for r in ranks:
        assert torch.equal(r["prefixes"], prefixes.detach())
    torch.testing.assert_close(torch.cat([r["x_prefix"] for r in ranks]) / world, prefixes.grad, rtol=1e-10,
                               atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# combined loss


def test_combined_loss_weights_and_skips():
    ntp, con, struct = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5), torch.tensor(0.25)
    total, terms = kernel.combined_loss(ntp, con, struct, kernel.LossWeights(1.0, 2.0, 4.0))
    assert total.item() == pytest.approx(2.0 + 2 * 0.5 + 4 * 0.25)
    assert terms == {"ntp": 2.0, "contrastive": 0.5, "structure": 0.25, "total": total.item()}
    total, terms = kernel.combined_loss(ntp, None, torch.tensor(float("nan")),
                                        kernel.LossWeights(1.0, 0.0, 0.0))
    assert total.item() == 2.0 and "contrastive" not in terms
    total.backward()
    assert ntp.grad.item() == 1.0


# ----------------------------------------------------------------------------------------------------------
# bad input raises a clear error


def test_bad_inputs_raise():
    uni, cross, img, ps, pl, pb = make_batch(8)
    with pytest.raises(ValueError, match="uni-modal feature widths"):
        kernel.triple_kernel_sqdist(uni, cross, img, uni[:, :3], cross, img)
    with pytest.raises(ValueError, match="cross-modal feature widths"):
        kernel.triple_kernel_sqdist(uni, cross, img, uni, cross[:, :2], img)
    with pytest.raises(ValueError, match="same number of slices"):
        kernel.gak_targets(uni, cross[:-1], img, ps, pl, pb, sigma=1.0)
    with pytest.raises(ValueError, match="empty slice sequence"):
        kernel.gak_targets(uni, cross, img, ps, torch.where(pl == pl[0], 0, pl), pb, sigma=1.0)
    bad = uni.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        kernel.gak_targets(bad, cross, img, ps, pl, pb, sigma=1.0)
    bad = cross.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        kernel.gak_targets(uni, bad, img, ps, pl, pb, delta=1.0)
    for value in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sigma must be"):
            kernel.gak_targets(uni, cross, img, ps, pl, pb, sigma=value)
        with pytest.raises(ValueError, match="delta must be"):
            kernel.gak_targets(uni, cross, img, ps, pl, pb, delta=value)
    with pytest.raises(ValueError, match="not both"):
        kernel.gak_targets(uni, cross, img, ps, pl, pb, sigma=1.0, delta=1.0)
    with pytest.raises(ValueError, match="index the"):
        kernel.gak_targets(uni, cross, img, ps + 100, pl, pb, sigma=1.0)
    with pytest.raises(ValueError, match="LossWeights.structure"):
        kernel.LossWeights(structure=-1.0)


def test_loss_preconditions_are_asserted():
    """Inside the losses a malformed call is a bug of the caller (train.py), refused by an assert; what a user
    can get wrong is refused at the edges: a zero batch by train.py's flags, all weights 0 by "trains
    nothing" (tests/test_train.py), a non-finite loss by train.py's NaN guard
    (test_non_finite_loss_keeps_the_last_good_checkpoint), which relies on a NaN or inf input coming out as a
    non-finite loss, checked here."""
    with pytest.raises(AssertionError):  # targets not (P, P)
        kernel.structure_loss(torch.randn(3, 2), torch.ones(2, 2))
    assert not torch.isfinite(kernel.structure_loss(torch.full((2, 2), float("nan")), torch.ones(2, 2)))
    scale = torch.tensor(1.0)
    with pytest.raises(AssertionError):  # shapes differ
        kernel.contrastive_loss(torch.randn(3, 4), torch.randn(3, 5), scale)
    with pytest.raises(AssertionError):  # an empty batch
        kernel.contrastive_loss(torch.randn(0, 4), torch.randn(0, 4), scale)
    inf = torch.full((2, 4), float("inf"))
    assert not torch.isfinite(kernel.contrastive_loss(inf, torch.randn(2, 4), scale))
    with pytest.raises(AssertionError, match="not given"):
        kernel.combined_loss(torch.tensor(1.0), None, torch.tensor(1.0), kernel.LossWeights())
    with pytest.raises(AssertionError, match="every weight is 0"):
        kernel.combined_loss(torch.tensor(1.0), None, None, kernel.LossWeights(0.0, 0.0, 0.0))
    total, _ = kernel.combined_loss(torch.tensor(float("nan")), None, None, kernel.LossWeights(1.0, 0.0, 0.0))
    assert not torch.isfinite(total)
