"""Paths the other smoke tests never take: Sugar and generative fine-tuning end to end with two micro-batches
per step, eval.py --blank-images (whose Winoground image score is known: two black images embed identically,
so no caption can prefer its own image), and sampling with a temperature against softmax(logits / T)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as E  # noqa: E402
import train  # noqa: E402
import unimllm as um  # noqa: E402

TINY = ["--smoke", "--n-train", "24", "--pretrain-steps", "2", "--finetune-steps", "2", "--grad-accum", "2",
        "--log-every", "1", "--ckpt-every", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sugar_and_generative_finetuning_with_grad_accum_then_blank_image_eval(tmp_path):
    sugar = tmp_path / "sugar.pt"
    train.main([*TINY, "--method", "sugar", "--out", str(sugar)])
    generative = tmp_path / "generative.pt"
    train.main([*TINY, "--method", "generative", "--init", str(tmp_path / "sugar.base.pt"), "--out",
                str(generative)])
    for path, method in ((sugar, "sugar"), (generative, "generative")):
        ckpt = train.load_checkpoint(path)
        assert ckpt["method"] == method and ckpt["stage"] == "finetune" and ckpt["done"]
        terms = ckpt["history"]["finetune"]
        assert len(terms) == 2 and all(math.isfinite(v) for t in terms for v in t.values())
        assert ("structure" in terms[0]) == (method == "sugar")
    metrics = E.main(["--ckpt", str(sugar), "--n-test", "8", "--blank-images", "1"])
    assert metrics["winoground/image"] == 0.0 and metrics["winoground/group"] == 0.0, metrics
    assert all(math.isfinite(v) for v in metrics.values())


def test_sampling_follows_softmax_of_logits_over_temperature():
    torch.manual_seed(0)
    cfg = um.LLMConfig(vocab_size=8, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                       num_kv_heads=1, max_seq_len=16)
    model = um.LLM(cfg).eval()
    with torch.no_grad():  # this tied head's logits span ~45 (one token takes everything): narrow them
        model.embed_tokens.weight.mul_(0.05)
    prompt = torch.tensor([[1, 2, 3]])
    n = 4000
    for T in (0.5, 2.0):
        with torch.no_grad():
            logits = model(prompt)[0, -1].double()  # (V,)
            p = torch.softmax(logits / T, -1)
            new = model.generate(prompt.repeat(n, 1), max_new_tokens=1, temperature=T,
                                 generator=torch.Generator().manual_seed(1))
        counts = torch.bincount(new[:, 0], minlength=cfg.vocab_size).double()
        chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
        # chi-square with V - 1 = 7 degrees of freedom: P(chi2 > 30) < 1e-4
        assert chi2 < 30.0, (T, chi2, counts.tolist(), (n * p).tolist())
        # a fair chi-square case
        assert float(p.min() / p.max()) < 0.8 and p.max() < 0.9 and n * p.min() > 5, p
