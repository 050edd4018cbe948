"""Count drift diagnostic: where in a fine-tuned model's LoRA the count answer moves from "three" to "four".
For each checkpoint, on the three-object scenes of a test draw of the built-in world, the teacher-forced margin
log p("three") - log p("four") after "question: how many shapes are there? answer:", with every LoRA update
on, with none (the base's answer), and with the LoRA of one group of projections switched off (its B set to
zero, the rest kept). A positive margin is a right answer between those two; the median printed is torch's
(the lower of the two middle values). The instrument behind the README's "The count drift".

  python bench/count_drift.py runs/unified.pt [more checkpoints] [--test-seed 2] [--scenes 200]
"""
import argparse
import re
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
from train import predicting  # noqa: E402
from unimllm import MLLM, load_checkpoint  # noqa: E402

QUESTION = "how many shapes are there?"
# (what is switched off, a regex over LoRA parameter names)
GROUPS = [("nothing", r"(?!)"), ("all LoRA", r"."), ("attention", r"self_attn"), ("MLP", r"\.mlp\."),
          ("layers 0-1", r"llm\.layers\.[01]\."), ("layers 2-3", r"llm\.layers\.[23]\.")]


@torch.no_grad()
def answer_log_likelihoods(model: MLLM, tok: data.Tokenizer, images: list[torch.Tensor], answer: str) -> torch.Tensor:
    """log p(answer </s> | image, question) for each image, summed over the answer's tokens. (N,)"""
    b = data.collate([data.Sample([data.image_seg(x), data.text_seg(data.format_question(QUESTION), False),
                                   data.text_seg(answer, True)]) for x in images],
                     tok, model.n_image_tokens, model.cfg.llm.max_seq_len)
    predict = predicting(b["labels"])  # (P,) flat positions; position t predicts the token at t + 1
    logits, _ = model(b["input_ids"], b["images"], predict)  # (P, V)
    target = b["labels"].flatten()[predict + 1]  # (P,)
    token_lp = torch.log_softmax(logits.float(), -1).gather(1, target[:, None]).squeeze(1)  # (P,)
    rows = predict // b["labels"].shape[1]
    return torch.zeros(len(images)).index_add_(0, rows, token_lp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--test-seed", type=int, default=2, help="the draw (eval.py's default test draw is 1)")
    p.add_argument("--scenes", type=int, default=200)
    args = p.parse_args()
    for path in args.ckpts:
        ckpt = load_checkpoint(path)
        model, tok = MLLM.from_checkpoint(ckpt, path).eval(), data.Tokenizer.from_str(ckpt["tokenizer"])
        world = data.make_world("test", args.scenes, args.test_seed, image_size=model.cfg.vision.image_size)
        images = [s.image for s in world.scenes if len(s.graph.objects) == 3]
        lora_b = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}
        print(f"{path}: {len(images)} three-object scenes of test draw {args.test_seed}")
        for name, off in GROUPS:
            if not lora_b and name != "nothing":
                break
            for n, p in model.named_parameters():
                if n in lora_b:
                    p.data.copy_(torch.zeros_like(p) if re.search(off, n) else lora_b[n])
            margin = (answer_log_likelihoods(model, tok, images, "three")
                      - answer_log_likelihoods(model, tok, images, "four"))  # (N,)
            deciles = statistics.quantiles(margin.tolist(), n=10)
            print(f"  LoRA off: {name:<11} margin median {margin.median():5.2f}, 10th percentile "
                  f"{deciles[0]:5.2f}; 'three' over 'four' {(margin > 0).float().mean():.3f}")


if __name__ == "__main__":
    main()
