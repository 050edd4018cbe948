"""
bench/bench_train.py — one fine-tuning step of each method, measured in the same run: time per step, its ratio to
the generative-only step, and the share taken by the Sugar GAK targets (dtw.py through kernel.gak_targets) and by
the VladVA contrastive loss. The goal (issue 6): the unified step costs at most 1.3x the generative step.

Run:
    python bench/bench_train.py                 # default model sizes and per-step batches of train.py
    python bench/bench_train.py --steps 5 --threads 2
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data as D  # noqa: E402
import kernel as K  # noqa: E402
import train  # noqa: E402
from unimllm import MLLM, set_trainable  # noqa: E402


class Timed:
    """Wraps a function of module `mod` and accumulates its wall time (the benchmark's only instrumentation)."""

    def __init__(self, mod, name: str) -> None:
        self.mod, self.name, self.fn, self.seconds = mod, name, getattr(mod, name), 0.0
        setattr(mod, name, self)

    def __call__(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4, help="measured steps per method (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-train", type=int, default=300)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = train.parse_args(["--n-train", str(args.n_train)])
    corpus = train.builtin_corpus(cfg)
    tok = D.train_tokenizer(corpus.texts, cfg.model.vocab_size)
    streams = train.build_streams(corpus, 0)
    d = train.Dist(0, 1, torch.device("cpu"))
    gak, con = Timed(K, "gak_targets"), Timed(K, "contrastive_loss")
    rows = []
    for method in train.METHODS:
        cfg = train.parse_args(["--n-train", str(args.n_train), "--method", method])  # the method's recipe
        torch.manual_seed(0)
        model = MLLM(train.model_config(cfg.model, tok))
        train.add_lora(model, cfg.finetune)
        model.init_soft_prompts(*D.soft_prompt_ids(tok))
        set_trainable(model, train.trainable_patterns(cfg.finetune), lora=False)
        opt = train.make_optimizer(model, 1e-4, 0.0)
        trainer = train.Trainer(model, model, tok, cfg, d, "finetune", corpus.pair_singles)
        times, gak_s, con_s = [], 0.0, 0.0
        for step in range(args.steps + 1):
            gak.seconds = con.seconds = 0.0
            t0 = time.perf_counter()
            batches = trainer.collect(streams, step)
            loss, _ = trainer.step_loss(batches)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:  # the first step warms up allocators and caches
                times.append(time.perf_counter() - t0)
                gak_s += gak.seconds
                con_s += con.seconds
        n = len(times)
        rows.append((method, statistics.median(times), gak_s / n, con_s / n, batches.n_sequences()))
    base = rows[0][1]
    print(f"one fine-tuning step, default sizes, {args.threads} threads, median of {args.steps} steps")
    print(f"{'method':<11} {'ms/step':>8} {'x generative':>12} {'GAK targets':>12} {'contrastive':>12} {'samples':>8}")
    for method, t, g, c, n in rows:
        print(f"{method:<11} {t * 1e3:8.0f} {t / base:12.2f} {g / t:11.1%} {c / t:11.1%} {n:8d}")


if __name__ == "__main__":
    main()
