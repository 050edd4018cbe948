"""
bench_generate.py — decode speed of unimllm.LLM.generate with and without the KV cache, measured in the same
run.

Without a cache every new token recomputes attention and MLPs over the whole sequence (O(T^2) total work for T
tokens); with the cache each step processes one token against stored keys/values (O(T)). The table reports
decode tokens/s for `--new` (default 128) greedy tokens after a `--prompt`-token prompt, and the speed-up.

Run:  python bench/bench_generate.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
          [--threads 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import unimllm as um  # noqa: E402


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    return ap.parse_args()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_generate(llm: um.LLM, ids: torch.Tensor, new: int, use_cache: bool, repeats: int,
                  device: str) -> tuple[float, torch.Tensor]:
    """Best-of-`repeats` wall time of one generate call (after a warm-up), and its tokens."""
    out = llm.generate(ids, max_new_tokens=new, use_cache=use_cache)  # warm-up (allocator, kernels)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = llm.generate(ids, max_new_tokens=new, use_cache=use_cache)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    a = parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"bench_generate.py: --device {a.device} needs a CUDA device")
    if a.threads:
        # on a shared CPU, fewer threads than cores avoids OpenMP spin contention
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = um.LLMConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=4 * a.hidden,
                       num_layers=a.layers,
                       num_heads=a.hidden // 64, num_kv_heads=max(1, a.hidden // 128),
                       max_seq_len=a.prompt + a.new)
    llm = um.LLM(cfg).to(device=a.device, dtype=getattr(torch, a.dtype)).eval()
    ids = torch.randint(0, a.vocab, (a.batch, a.prompt), device=a.device)
    t_cache, out_cache = time_generate(llm, ids, a.new, True, a.repeats, a.device)
    t_full, out_full = time_generate(llm, ids, a.new, False, a.repeats, a.device)
    n = out_cache.numel()
    print(f"device={a.device} dtype={a.dtype} threads={torch.get_num_threads()} batch={a.batch} "
          f"prompt={a.prompt} new={a.new} hidden={a.hidden} layers={a.layers} vocab={a.vocab} "
          f"params={sum(p.numel() for p in llm.parameters()) / 1e6:.1f}M")
    print(f"same tokens with and without cache: {torch.equal(out_cache, out_full)}")
    print(f"{'mode':<14}{'seconds':>10}{'tokens/s':>12}{'ratio':>8}")
    print(f"{'no KV cache':<14}{t_full:>10.3f}{n / t_full:>12.1f}{1.0:>8.2f}")
    print(f"{'KV cache':<14}{t_cache:>10.3f}{n / t_cache:>12.1f}{t_full / t_cache:>8.2f}")


if __name__ == "__main__":
    main()
