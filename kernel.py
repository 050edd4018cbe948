"""Sugar's kernels and every training loss of unimllm.

What lives here:
- `triple_kernel_sqdist`: Sugar's triple kernel (Chow et al., NeurIPS 2024, arXiv 2411.00304, Eq. 4) as
  squared distances between slices (images / sentences) from frozen teacher features: uni-modal features for
  two slices of the same modality, cross-modal features for an image-text pair (kernel="cross": the
  cross-modal features for every pair, Sugar Table 4b "w/o TK").
- `gak_targets`: the normalised global alignment kernel (GAK; Cuturi et al., ICASSP 2007; Sugar Eq. 2)
  Gram matrix M_l between the slice sequences that a batch of prefix embeddings summarise, computed batched
  through `dtw.log_gak` (log K = -soft-DTW with gamma = 1 and cost phi_sigma(d^2)); single="cosine" gives
  one-slice pairs Sugar §3.2's plain cosine instead. `estimate_delta`: the GAK scale delta from data.
- `mean_targets`: Sugar Table 4b "w/o GAK", M_l as the average slice similarity, no alignment.
- `structure_loss`: Sugar Eq. 3, L = (1/n) sum_ij (cos(r_i, r_j) - M_l[i, j])^2.
  Under DDP its prefixes are gathered by `gather_rows_with_grad` (ranks may hold different counts). Both
  losses compute their cosines in float32 even under bf16 autocast (`full_precision`).
- `contrastive_loss` / `ContrastiveLoss`: VladVA's (Ouali et al., CVPR 2025, arXiv 2412.04378) symmetric
  InfoNCE between image and short-caption summaries, learnable temperature (CLIP's), gathered across ranks
  with gradient (`gather_with_grad`, which also holds the argument why DDP then gives the one-process
  gradient).
- `LossWeights`, `combined_loss`: L = L_ntp + lambda_c * L_contrastive + lambda_s * L_structure.

Run the tests:  .venv/bin/python -m pytest tests/test_kernel.py -x -q
Benchmark:      .venv/bin/python bench/bench_kernel.py
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from dtw import log_gak, normalised_gak, pairwise_sq_euclidean

MAX_LOGIT_SCALE = 100.0  # CLIP clamps exp(logit_scale) at 100 (Radford et al. 2021, Sec. 2.5)


# ----------------------------------------------------------------------------------------------------------
# input checks


def _check_finite(name: str, t: Tensor) -> None:
    # Reading a value makes the host wait for an accelerator, every call: checked on the CPU only (train.py's
    # NaN guard catches a non-finite loss on log and checkpoint steps instead).
    if t.device.type == "cpu" and not bool(torch.isfinite(t).all()):
        raise ValueError(f"kernel.py: {name} contains non-finite values (NaN or inf); "
                         "expected finite numbers")


def _check_matrix(name: str, t: Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"kernel.py: {name} must be 2-D (rows, features), got shape {tuple(t.shape)}")


def _check_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"kernel.py: {name} must be a finite number > 0, got {value}")


# ----------------------------------------------------------------------------------------------------------
# Sugar Eq. 4: the triple kernel


KERNELS = ("triple", "cross")  # Sugar Eq. 4, and its Table 4b ablation "w/o TK" (cross-modal features only)


def _check_kernel(kernel: str) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"kernel.py: kernel must be one of {KERNELS}, got {kernel!r}")


def _sqdist(a: Tensor, b: Tensor) -> Tensor:
    """All-pairs squared Euclidean distances, (Sa, D) x (Sb, D) -> (Sa, Sb) (dtw.pairwise_sq_euclidean)."""
    return pairwise_sq_euclidean(a[None], b[None])[0, 0]


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    """All-pairs cosine similarities, (Sa, D) x (Sb, D) -> (Sa, Sb) (0 against an all-zero row)."""
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def _check_slices(names: tuple[str, str, str], uni: Tensor, cross: Tensor, is_img: Tensor) -> None:
    """names: what the caller calls (uni, cross, is_img), for the error message."""
    _check_matrix(names[0], uni)
    _check_matrix(names[1], cross)
    if is_img.dim() != 1 or not (uni.shape[0] == cross.shape[0] == is_img.numel()):
        raise ValueError(
            f"kernel.py: {names[0]} {tuple(uni.shape)}, {names[1]} {tuple(cross.shape)} and "
            f"{names[2]} {tuple(is_img.shape)} must describe the same number of slices"
        )
    _check_finite(names[0], uni)
    _check_finite(names[1], cross)


def _slice_matrix(
    fn: Callable[[Tensor, Tensor], Tensor],
    uni_a: Tensor, cross_a: Tensor, is_img_a: Tensor, uni_b: Tensor, cross_b: Tensor, is_img_b: Tensor,
    kernel: str = "triple",
) -> Tensor:
    """fn (_sqdist or _cosine) between every slice of a and of b, each pair on the teacher features Sugar
    Eq. 4 picks, without checks. kernel="triple": uni-modal features for two slices of one modality,
    cross-modal for an image-text pair, one block per modality pair (each entry costs one dot product over
    the features it needs). kernel="cross" (Table 4b "w/o TK", "CLIP only"): cross-modal features for all."""
    if kernel == "cross":
        return fn(cross_a, cross_b)
    out = uni_a.new_empty(uni_a.shape[0], uni_b.shape[0])  # (Sa, Sb)
    img_a, txt_a = is_img_a.bool().nonzero()[:, 0], (~is_img_a.bool()).nonzero()[:, 0]
    img_b, txt_b = is_img_b.bool().nonzero()[:, 0], (~is_img_b.bool()).nonzero()[:, 0]
    for rows, cols, feat_a, feat_b in (
        (img_a, img_b, uni_a, uni_b),  # image-image: uni-modal (DINOv2 in the paper)
        (txt_a, txt_b, uni_a, uni_b),  # text-text: uni-modal (BGE)
        (img_a, txt_b, cross_a, cross_b),  # image-text: cross-modal (CLIP)
        (txt_a, img_b, cross_a, cross_b),  # text-image: cross-modal
    ):
        if rows.numel() > 0 and cols.numel() > 0:
            out[rows[:, None], cols[None, :]] = fn(feat_a[rows], feat_b[cols])
    return out


def triple_kernel_sqdist(
    uni_a: Tensor, cross_a: Tensor, is_img_a: Tensor, uni_b: Tensor, cross_b: Tensor, is_img_b: Tensor,
    kernel: str = "triple",
) -> Tensor:
    """Sugar Eq. 4 as squared distances: (Sa, Sb) with |u_a - u_b|^2 where the two slices share a modality
    (image-image: DINOv2 in the paper, text-text: BGE) and |c_a - c_b|^2 (CLIP) for an image-text pair.
    kernel="cross" (Sugar Table 4b "w/o TK"): |c_a - c_b|^2 for every pair.

    uni_* (S, Du), cross_* (S, Dc), is_img_* (S,) bool."""
    _check_kernel(kernel)
    _check_slices(("uni_a", "cross_a", "is_img_a"), uni_a, cross_a, is_img_a)
    _check_slices(("uni_b", "cross_b", "is_img_b"), uni_b, cross_b, is_img_b)
    if uni_a.shape[1] != uni_b.shape[1]:
        raise ValueError(f"kernel.py: uni-modal feature widths differ: {uni_a.shape[1]} vs {uni_b.shape[1]}")
    if cross_a.shape[1] != cross_b.shape[1]:
        raise ValueError(f"kernel.py: cross-modal feature widths differ: {cross_a.shape[1]} vs "
                         f"{cross_b.shape[1]}")
    return _slice_matrix(_sqdist, uni_a, cross_a, is_img_a, uni_b, cross_b, is_img_b, kernel)


# ----------------------------------------------------------------------------------------------------------
# Sugar Eq. 2: the GAK Gram targets M_l


def _check_prefixes(prefix_slices: Tensor, prefix_len: Tensor, prefix_batch: Tensor, n_slices: int) -> None:
    if prefix_slices.dim() != 2:
        raise ValueError(f"kernel.py: prefix_slices must be (P, L), got shape {tuple(prefix_slices.shape)}")
    n_prefixes, width = prefix_slices.shape
    if prefix_len.shape != (n_prefixes,) or prefix_batch.shape != (n_prefixes,):
        raise ValueError(
            f"kernel.py: prefix_len {tuple(prefix_len.shape)} and prefix_batch {tuple(prefix_batch.shape)} "
            f"must both be ({n_prefixes},) to match prefix_slices {tuple(prefix_slices.shape)}"
        )
    if n_prefixes == 0:
        return
    if int(prefix_len.min()) < 1:
        raise ValueError("kernel.py: prefix_len has an empty slice sequence (length 0); every prefix "
                         "needs >= 1 slice")
    if int(prefix_len.max()) > width:
        raise ValueError(f"kernel.py: prefix_len up to {int(prefix_len.max())} but prefix_slices has "
                         f"only {width} columns")
    if int(prefix_slices.min()) < 0 or int(prefix_slices.max()) >= n_slices:
        raise ValueError(f"kernel.py: prefix_slices must index the {n_slices} slices, got values "
                         f"outside [0, {n_slices})")


def _median_distance(sq: Tensor) -> float:
    """The median positive distance between two different slices, from their (S, S) squared distances; 1.0
    when there is none (every phi is then 0 and any delta gives the same targets)."""
    upper = sq[torch.triu(torch.ones_like(sq, dtype=torch.bool), diagonal=1)]  # each slice pair once
    # Two identical slices (a caption or image that recurs) are 0 apart, but _sqdist's expansion leaves
    # rounding noise of a few eps * |a|^2: a distance below that tolerance counts as 0.
    tol = 64 * torch.finfo(sq.dtype).eps * float(upper.max()) if upper.numel() > 0 else 0.0
    positive = upper[upper > tol]
    # sqrt is monotone and torch.median picks an element (the lower middle), so sqrt(median d^2) = median d
    return math.sqrt(float(positive.median())) if positive.numel() > 0 else 1.0


def estimate_delta(
    slice_uni: Tensor, slice_cross: Tensor, slice_is_image: Tensor, kernel: str = "triple"
) -> float:
    """Sugar's delta in sigma = delta * sqrt((n + m) / 2), "a fixed pre-defined hyperparameter" whose value
    the paper does not give. Ours: Cuturi's heuristic (also tslearn.metrics.sigma_gak: sigma = the median
    distance between elements times sqrt(the median length)), i.e. delta = the median distance between two
    different slices under `kernel` (Eq. 4), over the slices given. train.py estimates it once, on a fixed
    sample of the training slices, so a pair's target does not move from batch to batch.

    slice_uni (S, Du), slice_cross (S, Dc), slice_is_image (S,)."""
    _check_kernel(kernel)
    _check_slices(("slice_uni", "slice_cross", "slice_is_image"), slice_uni, slice_cross, slice_is_image)
    dtype = torch.promote_types(slice_uni.dtype, torch.float32)
    uni, cross = slice_uni.to(dtype), slice_cross.to(dtype)
    sq = _slice_matrix(_sqdist, uni, cross, slice_is_image, uni, cross, slice_is_image, kernel)  # (S, S)
    return _median_distance(sq)


def _pair_sigma(n: Tensor, m: Tensor, sigma: float | None, delta: float) -> Tensor:
    """sigma for sequences of lengths n and m: fixed, or Sugar's delta * sqrt((n + m) / 2)."""
    if sigma is not None:
        return torch.full(n.shape, sigma, dtype=torch.float64, device=n.device)
    return delta * ((n + m).double() / 2.0).sqrt()


def _cross_sample_pairs(prefix_batch: Tensor) -> tuple[Tensor, Tensor]:
    """Prefix pairs i < j from different samples (Q,), (Q,): the only targets to compute; the rest are 1
    (same sample) or the mirror image."""
    n_prefixes = prefix_batch.shape[0]
    i, j = torch.triu_indices(n_prefixes, n_prefixes, offset=1, device=prefix_batch.device)  # (Q,), (Q,)
    keep = prefix_batch[i] != prefix_batch[j]
    return i[keep], j[keep]


SINGLES = ("cosine", "gak")  # one-slice pairs: Sugar §3.2's plain cosine, or the GAK value as any pair


@torch.no_grad()
def gak_targets(
    slice_uni: Tensor,
    slice_cross: Tensor,
    slice_is_image: Tensor,
    prefix_slices: Tensor,
    prefix_len: Tensor,
    prefix_batch: Tensor,
    sigma: float | None = None,
    delta: float | None = None,
    kernel: str = "triple",
    single: str = "gak",
) -> Tensor:
    """Target Gram matrix M_l (P, P) of Sugar Eq. 3: M_l[i, j] = normalised GAK between the slice sequences of
    prefixes i and j, log K~(x, y) = log K(x, y) - (log K(x, x) + log K(y, y)) / 2, so K~ in (0, 1],
    K~(x, x) = 1 (dtw.normalised_gak); set to 1 when both prefixes come from the same sample. A target: no
    gradient.

    slice_uni (S, Du), slice_cross (S, Dc), slice_is_image (S,): teacher features of every slice.
    prefix_slices (P, L): slice indices of each prefix in order, padded; prefix_len (P,); prefix_batch (P,).
    sigma: a fixed GAK bandwidth; or delta: sigma = delta * sqrt((n + m) / 2) per pair (Sugar). Give at most
    one; with neither, delta is estimate_delta over this batch's slices.
    kernel: the slice distance inside phi_sigma, "triple" (Eq. 4) or "cross" (Table 4b "w/o TK").
    single: a pair of two one-slice prefixes gets the GAK value ("gak": with one slice each the only
    alignment is (1, 1), K~ = exp(-phi_sigma(d^2)) = e / (2 - e), e = exp(-d^2 / (2 sigma^2))), or
    ("cosine", Sugar §3.2, which uses plain cosine similarity for a sample of one slice) the cosine of the
    two slices' teacher features, those `kernel` picks: uni-modal for two slices of one modality,
    cross-modal for an image and a text.
    A one-slice prefix against a longer one keeps the GAK (our reading: the cosine has no sequence to align).
    The self terms use the pair's own sigma, so Cauchy-Schwarz for the (positive definite) GAK keeps K~ <= 1
    even when sigma differs between pairs."""
    if sigma is not None and delta is not None:
        raise ValueError("kernel.py: gak_targets takes sigma (fixed) or delta (Sugar's per-pair "
                         "scale), not both")
    if sigma is not None:
        _check_positive("sigma", float(sigma))
    if delta is not None:
        _check_positive("delta", float(delta))
    _check_kernel(kernel)
    if single not in SINGLES:
        raise ValueError(f"kernel.py: single must be one of {SINGLES}, got {single!r}")
    _check_slices(("slice_uni", "slice_cross", "slice_is_image"), slice_uni, slice_cross, slice_is_image)
    _check_prefixes(prefix_slices, prefix_len, prefix_batch, slice_uni.shape[0])
    # bf16 features would lose the GAK's precision
    dtype = torch.promote_types(slice_uni.dtype, torch.float32)
    uni, cross = slice_uni.to(dtype), slice_cross.to(dtype)
    slices = (uni, cross, slice_is_image, uni, cross, slice_is_image)
    sq_all = _slice_matrix(_sqdist, *slices, kernel)  # (S, S), gathered per pair below
    n_prefixes = prefix_slices.shape[0]
    targets = torch.ones(n_prefixes, n_prefixes, dtype=dtype, device=slice_uni.device)  # (P, P)
    if n_prefixes == 0:
        return targets
    delta = delta if (delta is not None or sigma is not None) else _median_distance(sq_all)
    idx = prefix_slices.long()  # (P, L)
    lengths = prefix_len.long()  # (P,)
    i, j = _cross_sample_pairs(prefix_batch)  # (Q,), (Q,)
    if single == "cosine":
        one = (lengths[i] == 1) & (lengths[j] == 1)
        cos = _slice_matrix(_cosine, *slices, kernel)[idx[i[one], 0], idx[j[one], 0]]  # Sugar §3.2
        targets[i[one], j[one]] = cos
        targets[j[one], i[one]] = cos
        i, j = i[~one], j[~one]
    if i.numel() == 0:
        return targets
    pair_sigma = _pair_sigma(lengths[i], lengths[j], sigma, delta).to(dtype)  # (Q,)
    cross_cost = sq_all[idx[i][:, :, None], idx[j][:, None, :]]  # (Q, L, L)
    log_k_xy = log_gak(cross_cost, pair_sigma, lengths[i], lengths[j])  # (Q,)

    # Self terms log K(x, x; sigma) for every prefix and every sigma it meets: with a fixed sigma one per
    # prefix, with Sugar's sigma one per (prefix, partner length) — P * L DTWs instead of 2 per pair.
    # (Lp,)
    partner = torch.arange(1, int(lengths.max()) + 1, device=idx.device) if sigma is None else lengths[:1]
    n_partner = partner.numel()
    own = lengths.repeat_interleave(n_partner)  # (P*Lp,)
    self_sigma = _pair_sigma(own, partner.repeat(n_prefixes), sigma, delta).to(dtype)  # (P*Lp,)
    self_cost = sq_all[idx[:, :, None], idx[:, None, :]].repeat_interleave(n_partner, dim=0)  # (P*Lp, L, L)
    log_k_self = log_gak(self_cost, self_sigma, own, own).view(n_prefixes, n_partner)  # (P, Lp)
    col_i = lengths[j] - 1 if sigma is None else torch.zeros_like(i)  # partner of i is j, and vice versa
    col_j = lengths[i] - 1 if sigma is None else torch.zeros_like(j)
    values = normalised_gak(log_k_xy, log_k_self[i, col_i], log_k_self[j, col_j])  # (Q,)
    targets[i, j] = values
    targets[j, i] = values
    return targets


@torch.no_grad()
def mean_targets(
    slice_uni: Tensor,
    slice_cross: Tensor,
    slice_is_image: Tensor,
    prefix_slices: Tensor,
    prefix_len: Tensor,
    prefix_batch: Tensor,
    kernel: str = "triple",
) -> Tensor:
    """Sugar Table 4b "w/o GAK": M_l (P, P) as the average slice similarity instead of the alignment kernel,
    M_l[i, j] = (1 / (n m)) sum_a sum_b cos(f_a, f_b) over the n slices a of prefix i and the m slices b of
    prefix j, every slice against every slice, order ignored; 1 for two prefixes of the same sample, as
    gak_targets. f: the teacher features `kernel` picks (Eq. 4, or "cross"). The paper does not say which
    slice similarity it averages; the teachers' cosine is ours: it makes a one-slice pair Sugar §3.2's
    plain cosine.
    Arguments as gak_targets. A target: no gradient."""
    _check_kernel(kernel)
    _check_slices(("slice_uni", "slice_cross", "slice_is_image"), slice_uni, slice_cross, slice_is_image)
    _check_prefixes(prefix_slices, prefix_len, prefix_batch, slice_uni.shape[0])
    dtype = torch.promote_types(slice_uni.dtype, torch.float32)
    uni, cross = slice_uni.to(dtype), slice_cross.to(dtype)
    cos_all = _slice_matrix(_cosine, uni, cross, slice_is_image, uni, cross, slice_is_image, kernel)  # (S, S)
    n_prefixes, width = prefix_slices.shape
    targets = torch.ones(n_prefixes, n_prefixes, dtype=dtype, device=slice_uni.device)  # (P, P)
    idx, lengths = prefix_slices.long(), prefix_len.long()  # (P, L), (P,)
    i, j = _cross_sample_pairs(prefix_batch)  # (Q,), (Q,)
    valid = torch.arange(width, device=idx.device) < lengths[:, None]  # (P, L): not padding
    mask = valid[i][:, :, None] & valid[j][:, None, :]  # (Q, L, L)
    block = cos_all[idx[i][:, :, None], idx[j][:, None, :]]  # (Q, L, L)
    values = (block * mask).sum((1, 2)) / (lengths[i] * lengths[j]).to(dtype)  # (Q,)
    targets[i, j] = values
    targets[j, i] = values
    return targets


# ----------------------------------------------------------------------------------------------------------
# Sugar Eq. 3: the structure loss


def full_precision(x: Tensor) -> torch.autocast:
    """The losses' matmuls in float32 even inside a bf16 autocast region (train.py's CUDA path): autocast
    casts every matmul's inputs to bf16, whose 8-bit significand spaces cosines near 1 by 0.004. The
    structure loss regresses cosines onto targets closer than that, and at CLIP's logit scale of 100 the
    spacing is 0.4 of a logit (tests/test_kernel.py's case: the contrastive gradient 4.5% off, the structure
    loss returned in bf16). train.py leaves TF32 off, which would round these matmuls' inputs to a 10-bit
    significand on an Ampere or Hopper GPU, forward and backward. Ours; open_clip computes its loss under
    autocast."""
    return torch.autocast(x.device.type, enabled=False)


def at_least_float32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def structure_loss(r: Tensor, targets: Tensor) -> Tensor:
    """Sugar Eq. 3: L = (1/n) sum_ij (cos(r_i, r_j) - M_l[i, j])^2 with n = P prefixes (a mean over rows of
    the summed squared errors). r (P, d) prefix embeddings, targets M_l (P, P). No positives, no temperature.
    With P = 0 the loss is a zero that stays attached to r's graph (DDP then still sees every parameter)."""
    n_prefixes = r.shape[0]
    assert r.dim() == 2 and targets.shape == (n_prefixes, n_prefixes), (tuple(r.shape), tuple(targets.shape))
    if n_prefixes == 0:
        return r.sum() * 0.0
    with full_precision(r):
        unit = F.normalize(at_least_float32(r), dim=-1)  # (P, d)
        cosine = unit @ unit.T  # (P, P): M_r
        return (cosine - targets.to(cosine.dtype)).pow(2).sum() / n_prefixes


# ----------------------------------------------------------------------------------------------------------
# VladVA: symmetric InfoNCE, gathered across ranks


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """(B, d) on each of W ranks -> (W*B, d), every rank's rows in rank order, and this rank's index (its
    rows' offset in the gathered batch is rank * B); one process: (x, 0). As open_clip's gather_features;
    every rank must pass the same B (all_gather needs equal shapes; use drop_last).

    The DDP gradient argument. DDP averages the parameter gradients of the W ranks. If the W rank losses sum
    to W * L, L the loss of the whole global batch, and a rank's loss reaches other ranks' rows only through
    this gather, then the gradient that reaches each rank's own rows is d(W * L)/d(its rows): the gather's
    backward sums, over ranks, the gradients every rank's loss sends to a row into the rank that owns it.
    DDP's average then divides by W: the parameter gradients equal those of one process on the whole batch.
    train.py meets the condition for each term: L_ntp (each rank: its tokens' summed loss over the global
    token count, times W), the contrastive loss (each rank: the mean over its own rows, against every rank's
    columns), the structure loss (every rank: the full loss on the gathered prefixes). tests/test_kernel.py
    and tests/test_train.py check it."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    return torch.cat(dist_fn.all_gather(x), dim=0), dist.get_rank()


def gather_rows_with_grad(x: Tensor) -> Tensor:
    """gather_with_grad for ranks whose row counts may differ (Sugar's prefixes: --data documents differ in
    their numbers of segments): each rank's rows are padded to the largest count for the collective and cut
    back after it, so the result is every rank's real rows in rank order (the order of train.py's structure
    targets). Costs one host read of the counts."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    counts = torch.zeros(dist.get_world_size(), dtype=torch.long, device=x.device)
    counts[dist.get_rank()] = x.shape[0]
    dist.all_reduce(counts)  # (W,): every rank's count
    most, counts = int(counts.max()), counts.tolist()
    padded = torch.cat([x, x.new_zeros(most - x.shape[0], *x.shape[1:])])  # (most, d)
    blocks = gather_with_grad(padded)[0].split(most)  # W blocks of (most, d)
    return torch.cat([block[:n] for block, n in zip(blocks, counts)])


def contrastive_loss(img: Tensor, txt: Tensor, logit_scale: Tensor, max_scale: float = MAX_LOGIT_SCALE,
                     neg: Tensor | None = None, neg_valid: Tensor | None = None) -> Tensor:
    """VladVA's symmetric InfoNCE (CLIP form): the mean of the image->text and text->image cross-entropies
    over the logits exp(logit_scale) * <img_i, txt_j>, exp(logit_scale) clamped at max_scale. img, txt (B, d),
    row k of each a positive pair (L2-normalised here); logit_scale a scalar, log of the inverse temperature.
    The mean of the two directions, not the sum, is ours (VladVA writes no formula): CLIP's pseudo-code and
    open_clip's ClipLoss, so log(B) means chance. Under DDP each rank scores its own rows against every rank's
    columns (open_clip's local_loss=True: (B, W*B) logits instead of (W*B, W*B)), exact by the DDP gradient
    argument (gather_with_grad).

    neg (B, d), neg_valid (B,) bool: hard-negative texts (NegCLIP, Yuksekgonul et al. ICLR 2023; train.py
    --pair-twins caption), extra columns of the image->text direction only, for every image; a row whose
    neg_valid is False is no column (a pair without a negative still passes a row, so every rank gathers the
    same shape)."""
    assert img.dim() == 2 and img.shape == txt.shape and img.shape[0] > 0 and logit_scale.numel() == 1
    with full_precision(img):
        img, txt, logit_scale = at_least_float32(img), at_least_float32(txt), at_least_float32(logit_scale)
        neg = at_least_float32(neg) if neg is not None else None
        img_local = F.normalize(img, dim=-1)  # (B, d)
        txt_local = F.normalize(txt, dim=-1)  # (B, d)
        img_all, rank = gather_with_grad(img_local)  # (W*B, d)
        txt_all, _ = gather_with_grad(txt_local)  # (W*B, d)
        scale = logit_scale.reshape(()).clamp(max=math.log(max_scale)).exp()  # CLIP's clamp at 100
        logits_img = scale * img_local @ txt_all.T  # (B, W*B): my images against every caption
        logits_txt = scale * txt_local @ img_all.T  # (B, W*B): my captions against every image
        if neg is not None:
            assert neg.shape == txt.shape and neg_valid is not None and neg_valid.shape == txt.shape[:1]
            neg_all, _ = gather_with_grad(F.normalize(neg, dim=-1))  # (W*B, d)
            valid_all = gather_with_grad(neg_valid.float())[0] > 0.5  # (W*B,)
            logits_neg = (scale * img_local @ neg_all.T).masked_fill(~valid_all, float("-inf"))  # (B, W*B)
            logits_img = torch.cat([logits_img, logits_neg], dim=1)  # (B, 2*W*B)
        # (B,) positives, offset by rank
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        return 0.5 * (F.cross_entropy(logits_img, labels) + F.cross_entropy(logits_txt, labels))


class ContrastiveLoss(nn.Module):
    """Module form of `contrastive_loss`; the learnable logit_scale lives in the model (MLLM.logit_scale)."""

    def __init__(self, max_scale: float = MAX_LOGIT_SCALE):
        super().__init__()
        _check_positive("max_scale", max_scale)
        self.max_scale = max_scale

    def forward(self, img: Tensor, txt: Tensor, logit_scale: Tensor) -> Tensor:
        return contrastive_loss(img, txt, logit_scale, self.max_scale)


# ----------------------------------------------------------------------------------------------------------
# the combined objective


@dataclass
class LossWeights:
    """L = ntp * L_ntp + contrastive * L_contrastive + structure * L_structure. A weight of 0
    drops its term: (1, 0, 0) generative only, (1, c, 0) VladVA, (1, 0, s) Sugar, (1, c, s) unified. Neither
    paper gives lambda_c or lambda_s; 1.0 is our default."""

    ntp: float = 1.0
    contrastive: float = 1.0
    structure: float = 1.0

    def __post_init__(self) -> None:
        for name, value in (("ntp", self.ntp), ("contrastive", self.contrastive),
                            ("structure", self.structure)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"kernel.py: LossWeights.{name} must be a finite number >= 0, got {value}")


def combined_loss(
    ntp: Tensor | None, contrastive: Tensor | None, structure: Tensor | None, weights: LossWeights
) -> tuple[Tensor, dict[str, Tensor]]:
    """L = L_ntp + lambda_c * L_contrastive + lambda_s * L_structure. A term whose weight is 0 is skipped (it
    may be None); a term with a positive weight must be given. Returns the total and, for logging, every given
    term and "total" as detached 0-d tensors on the terms' device (no host sync: train.py reads them on log
    steps only, where its NaN guard stops a run whose loss is not finite: a NaN or inf input comes out as a
    non-finite loss, on every device)."""
    terms = {"ntp": (ntp, weights.ntp), "contrastive": (contrastive, weights.contrastive),
             "structure": (structure, weights.structure)}
    total: Tensor | None = None
    logged: dict[str, Tensor] = {}
    for name, (value, weight) in terms.items():
        if value is not None:
            logged[name] = value.detach().reshape(())
        if weight == 0:
            continue
        assert value is not None, f"combined_loss: term {name!r} has weight {weight} but was not given"
        contribution = weight * value.reshape(())
        total = contribution if total is None else total + contribution
    assert total is not None, "combined_loss: every weight is 0"
    logged["total"] = total.detach()
    return total, logged
