"""bench_data.py — is training ever data-bound? Samples/s the data loader delivers vs samples/s one training
step consumes, measured in the same run.

Loader side (all on the CPU, single process): building the built-in world (Pillow drawing, captions,
negatives, teacher features) turned into LLaVA-style pretraining samples, `collate` of those samples, and
`collate_pairs`.
Training side: one forward + backward of unimllm.MLLM (train.py's default sizes) on a collated batch,
next-token loss.
The ratio column is loader samples/s divided by training samples/s: > 1 means the loader keeps up.

Run: .venv/bin/python bench/bench_data.py [--batch 32] [--threads 2]
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402
import unimllm  # noqa: E402


def build_model(tok: data.Tokenizer) -> unimllm.MLLM:
    """train.py's default model sizes (the training step the loader has to keep up with)."""
    cfg = train.parse_args([])
    return unimllm.MLLM(train.model_config(cfg.model, tok))


def logits_of(model: unimllm.MLLM, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], batch["images"])[0]


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
    model = build_model(tok)
    name, n_img = "unimllm.MLLM (train.py default sizes)", model.n_image_tokens
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
    pairs_rate = rate(lambda: data.collate_pairs(world.scenes[:args.batch], tok, n_img, K, 512),
                      args.batch, 20)
    end_to_end = 1 / (1 / gen_rate + 1 / collate_rate)

    def step() -> None:
        logits = logits_of(model, batch)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=-100)
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
