"""Where a checkpoint's embeddings lose the colour-shape binding: linear probes on its representations.

For each (colour, shape) of the built-in world (24), a logistic-regression probe on one representation of an
image says whether an object of that colour and shape is in it, and on one representation of a short caption
whether the caption names one; fitted on --n-train training-split scenes (L-BFGS, L2 1e-3 on standardised
features), scored on --n-test test-split scenes. The score is the balanced accuracy on the hard cases only:
the colour and the shape both occur, on one object (positive) or on two (negative). A bag of colours and
shapes scores 0.5 there; 1.0 means the binding is read off linearly. Representations:
  adapter mean / adapter concat   the image tokens the decoder reads (mean over the cells / all cells side by side)
  summary L1 .. Ln, summary       the summary position (VladVA: the last soft-prompt token after [image] or
                                  [caption]) after each decoder layer, and after the final norm: the embedding
                                  eval.py's image-text suites use

  python bench/summary_probe.py --ckpt runs/unified.base.pt runs/unified.pt

The README's "Why winoground/group stays near 0" quotes its output.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from unimllm import MLLM, load_checkpoint  # noqa: E402

PAIRS = [(c, s) for c in data.COLOURS for s in data.SHAPES]


def image_labels(scenes: list[data.Scene]) -> tuple[Tensor, Tensor]:
    """(N, 24) is the (colour, shape) in the image, and (N, 24) is it a hard case (both occur)."""
    y = torch.tensor([[float(s.graph.find(c, sh) is not None) for c, sh in PAIRS] for s in scenes])
    hard = torch.tensor([[c in {o.colour for o in s.graph.objects} and sh in {o.shape for o in s.graph.objects}
                          for c, sh in PAIRS] for s in scenes])
    return y, hard


def caption_labels(scenes: list[data.Scene]) -> tuple[Tensor, Tensor]:
    """(N, 24) does the short caption name the (colour, shape), and (N, 24) is it a hard case."""
    nps = [[np_ for np_ in (s.phrase.first, s.phrase.second) if np_ is not None] for s in scenes]
    y = torch.tensor([[float(any((n.colour, n.shape) == p for n in row)) for p in PAIRS] for row in nps])
    hard = torch.tensor([[c in {n.colour for n in row} and sh in {n.shape for n in row} for c, sh in PAIRS]
                         for row in nps])
    return y, hard


def probe(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, hard: Tensor) -> float:
    """Balanced accuracy on the hard cases of 24 logistic regressions fitted on (x_train, y_train)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(x_train.shape[1], y_train.shape[1], requires_grad=True)
    b = torch.zeros(y_train.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=300)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x_train @ w + b, y_train) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        said = (x_test @ w + b) > 0
    pos, neg = hard & (y_test > 0), hard & (y_test == 0)
    return float(0.5 * ((said & pos).sum() / pos.sum() + (~said & neg).sum() / neg.sum()))


@torch.no_grad()
def summary_states(model: MLLM, tok: data.Tokenizer, scenes: list[data.Scene], side: str,
                   batch: int = 128) -> list[Tensor]:
    """The summary position's state after each decoder layer and after the final norm: n_layers + 1 tensors
    (N, D), for side "image" or "caption"."""
    layers, caught = model.llm.layers, {}
    hooks = [layer.register_forward_hook(lambda mod, args, out, k=k: caught.__setitem__(k, out))
             for k, layer in enumerate(layers)]
    n_img, k_soft = model.n_image_tokens, model.cfg.n_soft_tokens
    out: list[list[Tensor]] = [[] for _ in range(len(layers) + 1)]
    try:
        for i in range(0, len(scenes), batch):
            part = scenes[i:i + batch]
            segments = [data.image_seg(s.image) if side == "image" else data.text_seg(s.short_caption, False)
                        for s in part]
            b = data.collate([data.Sample([seg]) for seg in segments], tok, n_img, model.cfg.llm.max_seq_len)
            soft = tok.soft_image_id if side == "image" else tok.soft_text_id
            rows = [data.summary_row(r[:n], soft, k_soft)  # as eval.Embedder builds them
                    for r, n in zip(b["input_ids"].tolist(), b["attention_mask"].sum(1).tolist())]
            width = max(len(r) for r, _ in rows)
            ids = torch.tensor([r + [tok.pad_id] * (width - len(r)) for r, _ in rows])  # (B, T)
            pos = torch.tensor([p for _, p in rows])  # (B,)
            _, hidden = model(ids, b["images"])  # (B, T, D) after the final norm
            at = torch.arange(len(part))
            for k in range(len(layers)):
                out[k].append(caught[k][at, pos])
            out[-1].append(hidden[at, pos])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o) for o in out]


@torch.no_grad()
def adapter_tokens(model: MLLM, scenes: list[data.Scene], batch: int = 128) -> Tensor:
    """(N, P, D): the image tokens the decoder reads (adapter output with the row and column embeddings)."""
    return torch.cat([model.image_tokens(torch.stack([s.image for s in scenes[i:i + batch]]))
                      for i in range(0, len(scenes), batch)])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", nargs="+", required=True)
    ap.add_argument("--n-train", type=int, default=1500)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.n_train < 50 or args.n_test < 50:
        raise SystemExit("summary_probe.py: --n-train and --n-test must be >= 50")
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in args.ckpt:
        if not Path(path).is_file():
            raise SystemExit(f"summary_probe.py: --ckpt {path}: no such file")
        ckpt = load_checkpoint(path)
        model, tok = MLLM.from_checkpoint(ckpt, path).eval(), data.Tokenizer.from_str(ckpt["tokenizer"])
        size = model.cfg.vision.image_size
        train = data.make_world("train", args.n_train, 5, image_size=size, n_stories=0, n_winoground=0).scenes
        test = data.make_world("test", args.n_test, 1, image_size=size, n_stories=0, n_winoground=0).scenes
        rows = []
        y_tr, _ = image_labels(train)
        y_te, hard = image_labels(test)
        tok_tr, tok_te = adapter_tokens(model, train), adapter_tokens(model, test)
        rows.append(("image", "adapter mean", probe(tok_tr.mean(1), y_tr, tok_te.mean(1), y_te, hard)))
        rows.append(("image", "adapter concat", probe(tok_tr.flatten(1), y_tr, tok_te.flatten(1), y_te, hard)))
        for side, labels in (("image", image_labels), ("caption", caption_labels)):
            y_tr, _ = labels(train)
            y_te, hard = labels(test)
            s_tr, s_te = summary_states(model, tok, train, side), summary_states(model, tok, test, side)
            names = [f"summary L{k + 1}" for k in range(len(s_tr) - 1)] + ["summary"]
            rows += [(side, name, probe(a, y_tr, b, y_te, hard)) for name, a, b in zip(names, s_tr, s_te)]
        print(f"{path}: balanced accuracy on the hard cases (0.5: a bag of colours and shapes)")
        for side, name, value in rows:
            print(f"  {side:8s} {name:16s} {value:.3f}")


if __name__ == "__main__":
    main()
