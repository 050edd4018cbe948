"""bench_data.py — is training ever data-bound? Samples/s the data loader delivers vs samples/s one training step
consumes, measured in the same run (issue 5, "Must show").

Loader side (all on the CPU, single process): building the built-in world (Pillow drawing, captions, negatives,
teacher features) turned into LLaVA-style pretraining samples, `collate` of those samples, and `collate_pairs`.
Training side: one forward + backward of unimllm.MLLM (default config) on a collated batch, next-token loss; if
unimllm.py cannot be imported, a plain torch.nn causal transformer of ~6M parameters stands in.
The ratio column is loader samples/s divided by training samples/s: > 1 means the loader keeps up.

Run: .venv/bin/python bench/bench_data.py [--batch 32] [--threads 2]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402


class TinyCausalLM(nn.Module):
    """Fallback stand-in: patch embedding for images + a pre-norm causal transformer (plain torch.nn)."""

    def __init__(self, vocab: int, image_id: int, d: int = 256, layers: int = 6, heads: int = 4) -> None:
        super().__init__()
        self.image_id = image_id
        self.embed = nn.Embedding(vocab, d)
        self.patch = nn.Conv2d(3, d, 8, 8)
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, batch_first=True, norm_first=True, dropout=0.0)
        self.body = nn.TransformerEncoder(block, layers)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
        x = self.embed(input_ids)  # (B, T, D)
        if images is not None:
            patches = self.patch(images).flatten(2).transpose(1, 2).reshape(-1, x.shape[-1])  # (N*P, D)
            x = x.masked_scatter((input_ids == self.image_id)[..., None], patches)
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        return self.head(self.body(x, mask=mask, is_causal=True))  # (B, T, V)


def build_model(tok: data.Tokenizer) -> tuple[nn.Module, str, int]:
    """(model, name, n_image_tokens)."""
    try:
        import unimllm
        vis = unimllm.VisionConfig()
        cfg = unimllm.MLLMConfig(vis, unimllm.LLMConfig(vocab_size=tok.vocab_size), image_token_id=tok.image_id,
                                 soft_image_token_id=tok.soft_image_id, soft_text_token_id=tok.soft_text_id,
                                 n_soft_tokens=data.n_soft_tokens(tok))
        model = unimllm.MLLM(cfg)
        return model, "unimllm.MLLM (default config)", model.n_image_tokens
    except ImportError as e:  # the real model is written in parallel; fall back as the brief says
        print(f"unimllm unavailable ({e}); using TinyCausalLM")
        return TinyCausalLM(tok.vocab_size, tok.image_id), "TinyCausalLM (torch.nn)", 16


def logits_of(model: nn.Module, batch: dict) -> torch.Tensor:
    out = model(batch["input_ids"], batch["images"])
    return out[0] if isinstance(out, tuple) else out


def rate(fn, n_items: int, repeat: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return n_items * repeat / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scenes", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    world = data.make_world("train", 256, 0)
    tok = data.train_tokenizer(data.world_texts(world))
    model, name, n_img = build_model(tok)
    n_params = sum(p.numel() for p in model.parameters())
    samples = data.pretrain_samples(world)
    K = data.n_soft_tokens(tok)
    batch = data.collate(samples[:args.batch], tok, n_img, 512)

    seed = [0]

    def world_to_samples() -> None:
        seed[0] += 1
        data.pretrain_samples(data.make_world("train", args.scenes, seed[0]))

    per_scene = len(data.pretrain_samples(data.make_world("train", args.scenes, 0))) / args.scenes
    gen_rate = rate(world_to_samples, int(args.scenes * per_scene), 3)
    collate_rate = rate(lambda: data.collate(samples[:args.batch], tok, n_img, 512), args.batch, 20)
    pairs_rate = rate(lambda: data.collate_pairs(world.scenes[:args.batch], tok, n_img, K, 512), args.batch, 20)
    end_to_end = 1 / (1 / gen_rate + 1 / collate_rate)

    def step() -> None:
        logits = logits_of(model, batch)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
        loss.backward()
        model.zero_grad(set_to_none=True)

    train_rate = rate(step, args.batch, 5)
    B, T = batch["input_ids"].shape
    print(f"model: {name}, {n_params / 1e6:.2f}M params; batch {B} x {T} tokens "
          f"({int((batch['input_ids'] == tok.image_id).sum())} image tokens); torch threads {args.threads}")
    print(f"{'stage':44s} {'samples/s':>10s} {'ratio vs train step':>20s}")
    rows = [("train step (fwd+bwd, reference)", train_rate),
            ("world generation -> pretrain samples", gen_rate),
            ("collate (pretrain samples)", collate_rate),
            ("collate_pairs (VladVA pairs)", pairs_rate),
            ("loader end to end (generate + collate)", end_to_end)]
    for label, r in rows:
        print(f"{label:44s} {r:10.1f} {r / train_rate:20.1f}")


if __name__ == "__main__":
    main()
