"""
bench/bench_train.py — training steps through train.py's own loop (train.train_stage): pre-training and each
fine-tuning method, at the sizes of each --preset, measured in the same run. Per configuration:

  ms/step      median wall time of one step of the training thread (the first step, which warms up allocators
               and caches, and the last, which writes a checkpoint, are left out)
  samples/s    sequences per step / median step time (a pair counts once)
  build ms     time to build one batch on the data thread (collation + Sugar GAK targets), overlapping steps
  data wait    share of the step the training thread spent blocked on the data thread
  log          share spent flushing the loss terms (one device->host transfer), logging and checking for NaN;
               on CUDA this is also where the thread waits for the device, every --log-every steps

Goal (2 CPU cores): data wait + log <= 5% of a step.

With --pair-batches, vladva and unified are measured at each --pair-batch given (the --caption-batch pairs
whose long caption is read stay the preset's); with --caption-chunks, every fine-tuning method at each
--caption-chunks given; with --autocasts, every configuration at each --autocast given; each also as a ratio
to the first of its method.

Run:
    python bench/bench_train.py                             # the cpu preset (the gpu one: --presets cpu,gpu)
    python bench/bench_train.py --pair-batches 32,64,128    # each with the default 16 long captions
    python bench/bench_train.py --caption-chunks 1,4        # README, "Long captions in chunks of like length"
    python bench/bench_train.py --autocasts off,bf16        # README, "bf16 autocast on the CPU"
    python bench/bench_train.py --device cuda --presets cpu,gpu
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train  # noqa: E402
from unimllm import MLLM, set_trainable  # noqa: E402


def measure(cfg: train.TrainConfig, corpus: train.Corpus, tok: data.Tokenizer, stage_name: str, steps: int,
            device: torch.device) -> tuple[float, float, float, float, float]:
    """(ms/step, samples/s, build ms, data-wait share, log share) of `steps` measured steps of one stage."""
    d = train.Dist(0, 1, device)
    torch.manual_seed(0)
    model = MLLM(train.model_config(cfg.model, tok)).to(device)
    if stage_name == "pretrain":
        train.pretrain_trainable(model, vision_frozen=True)  # as after stage 0
        lr = cfg.pretrain.pretrain_lr
    else:
        train.add_lora(model, cfg.finetune)
        model.init_soft_prompts(*data.soft_prompt_ids(tok))
        set_trainable(model, train.trainable_patterns(cfg.finetune))
        lr = cfg.finetune.finetune_lr
    opt = train.make_optimizer(model, lr, 0.0)
    streams = train.build_streams(corpus, 0, tok, model.n_image_tokens, cfg.run.length_group)
    objective = train.objective_of(stage_name, cfg.finetune)
    batches = train.Batches(stage_name, streams, cfg, d, tok, model.cfg, objective, corpus.pair_singles)
    t0 = time.perf_counter()
    n_seq = sum(batches(k).n_sequences for k in range(3)) / 3
    build = (time.perf_counter() - t0) / 3
    times = train.LoopTimes()
    # pre-training's first steps are the opening's, as in train.py (float32 there under --autocast auto on the CPU)
    n_open = sum(n for _, n in train.opening(cfg, streams)) if stage_name == "pretrain" else 0
    stage = train.Stage(stage_name, steps + 2, lr, None, restart=n_open)
    train.train_stage(stage, model, opt, batches, {stage_name: []}, 0, steps + 2, times)
    step, wait, log = (times.step_s[1:-1], times.data_wait_s[1:-1], times.log_s[1:-1])
    total = sum(step)
    median = statistics.median(step)
    ms, per_s = median * 1e3, n_seq / median
    return ms, per_s, build * 1e3, sum(wait) / total, sum(log) / total


def positive_ints(args: argparse.Namespace, name: str) -> list[int]:
    """The comma-separated integers >= 1 of flag `name` ([] if not given)."""
    value, flag = getattr(args, name), "--" + name.replace("_", "-")
    try:
        values = [int(x) for x in value.split(",")] if value else []
    except ValueError:
        raise SystemExit(f"bench_train.py: {flag} takes comma-separated integers, got {value!r}")
    if any(n < 1 for n in values):
        raise SystemExit(f"bench_train.py: every {flag} value must be >= 1, got {value!r}")
    return values


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", default="cpu", help="comma-separated --preset values")
    p.add_argument("--steps", type=int, default=10, help="measured steps per configuration")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--n-train", type=int, default=300, help="world scenes (batches: the preset's)")
    p.add_argument("--pair-batches", default="", help="comma-separated --pair-batch values for vladva and unified")
    p.add_argument("--caption-chunks", default="", help="comma-separated --caption-chunks values for fine-tuning")
    p.add_argument("--autocasts", default="", help="comma-separated --autocast values (auto, bf16, off)")
    args = p.parse_args()
    pair_batches, chunks = positive_ints(args, "pair_batches"), positive_ints(args, "caption_chunks")
    autocasts = args.autocasts.split(",") if args.autocasts else []
    if any(a not in train.AUTOCASTS for a in autocasts):
        raise SystemExit(f"bench_train.py: --autocasts takes {', '.join(train.AUTOCASTS)}, comma-separated, "
                         f"got {args.autocasts!r}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bench_train.py: --device {args.device} needs a CUDA device")
    print(f"device {device}, {args.threads} threads, median of {args.steps} steps through train.train_stage")
    print(f"{'preset':<7} {'stage / method':<35} {'ms/step':>8} {'samples/s':>10} {'build ms':>9} "
          f"{'data wait':>10} {'log':>7} {'x first':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            argv = ["--preset", preset, "--n-train", str(args.n_train), "--out", str(Path(tmp) / "bench.pt"),
                    "--ckpt-every", "1000000"]
            cfg = train.parse_args(argv)
            corpus = train.builtin_corpus(cfg)
            tok = data.train_tokenizer(corpus.texts, cfg.model.vocab_size)
            default_pairs, default_captions = cfg.finetune.pair_batch, cfg.finetune.caption_batch
            for stage_name, method in [("pretrain", "generative")] + [("finetune", m) for m in train.METHODS]:
                cfg.finetune.method = method
                sizes = pair_batches if pair_batches and method in ("vladva", "unified") else [default_pairs]
                cuts = chunks if chunks and stage_name == "finetune" else [cfg.run.caption_chunks]
                casts = autocasts or [cfg.run.autocast]
                first = None
                for n, c, a in [(n, c, a) for n in sizes for c in cuts for a in casts]:
                    cfg.finetune.pair_batch, cfg.finetune.caption_batch = n, min(n, default_captions)
                    cfg.run.caption_chunks, cfg.run.autocast = c, a
                    ms, sps, build, wait, log = measure(cfg, corpus, tok, stage_name, args.steps, device)
                    first = first or ms
                    what = "pretrain" if stage_name == "pretrain" else f"finetune {method}"
                    what += f" pairs {n}" if len(sizes) > 1 else ""
                    what += f" chunks {c}" if len(cuts) > 1 else ""
                    what += f" autocast {a}" if len(casts) > 1 else ""
                    print(f"{preset:<7} {what:<35} {ms:8.0f} {sps:10.1f} {build:9.1f} {wait:10.1%} {log:7.1%} "
                          f"{ms / first:8.2f}", flush=True)


if __name__ == "__main__":
    main()
