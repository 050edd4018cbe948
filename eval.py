"""
eval.py — every metric of a unimllm checkpoint, on the built-in world's test split (or a user's file).

Discriminative metrics use the embeddings of the method the checkpoint was trained with:
  VladVA summaries (Ouali et al., CVPR 2025, arXiv 2412.04378): the L2-normalised final hidden state of the
    last soft-prompt token after an image (`<image> <soft_image>*K`) or a text (`text <soft_text>*K`);
  Sugar prefix embeddings (Chow et al., NeurIPS 2024, arXiv 2411.00304): the retrieval projector applied to
    the vector of a sample's last segment (mean over an image's tokens, last token of a text).
Generative metrics decode greedily with the KV cache.

Metrics (the JSON keys):
  retrieval/{i2t,t2i}_r{1,5,10}   image <-> caption recall@K (every caption of a Karpathy record; a caption
                                  that says the same as a correct one, string or facts, is correct too)
  compositional/<category>, compositional/mean
                                  SugarCrepe-style: the image scores its caption above the negative
  winoground/{text,image,group}   two scenes, captions differing by a swap (Thrush et al., CVPR 2022 scoring)
  interleaved/r{1,5}              story so far + next sentence -> the next frame among all test frames (an
                                  MMC4 file: document so far + an image's sentence -> that image among all
                                  the file's images, document_queries)
  vqa/acc, vqa/<type>             exact match of the generated answer after normalize_answer (all; count,
                                  colour, shape, size, relation questions, or a LLaVA file's "type")
  vqa/relation_{left_right,above_below}   the built-in world's relation questions per axis
  pope/{acc,precision,recall,f1,yes_ratio}   object-existence yes/no questions (POPE, Li et al., EMNLP 2023),
                                  each answer read by POPE's rule (a "no" or "not" in it: no; else yes)
  pope/one_word                   the share of those answers that are just "yes" or "no"
  rag/acc, rag/acc_without_retrieval   name questions about test objects whose names never occur in training:
                                  answered with the top-k knowledge-base entries that the model itself
                                  retrieves (question text -> entry image), and with no context at all.
                                  The retriever (--rag-retriever): the method's embeddings, or, for a
                                  checkpoint with no trained embedding (the base, generative), the
                                  likelihood of the question given each entry image, less the image's mean
                                  likelihood of a fixed bank of training questions (--rag-prior)
  rag/acc_oracle_context, rag/retrieval_r1   the two halves of rag/acc: answering with the right entry given,
                                  and how often the right entry is retrieved first
  speed/embeddings_per_s          embeddings a second over the retrieval, compositional, Winoground and
                                  interleaved suites
  oracle/<suite>/...              the retrieval, compositional, Winoground and interleaved suites scored
                                  with the teacher features instead of the model (TeacherEmbedder): the
                                  ceiling on this world (interleaved: what the new sentence alone determines)

Run:
    python eval.py --ckpt out.pt                      # a table of every metric
    python eval.py --ckpt out.pt --json metrics.json  # and a flat JSON object metric -> number
    python eval.py --ckpt out.pt --data sugarcrepe_replace_att.json   # a user's file (its format's metrics)
    python eval.py --ckpt out.pt --data coco_karpathy.json --data-split val   # a Karpathy file's val records
    python eval.py --ckpt out.pt --data llava_test.json,pope_random.jsonl     # vqa/* and pope/* of two files
    python eval.py --ckpt out.pt --data mmc4_docs.jsonl,winoground.jsonl      # interleaved/* and winoground/*
    python eval.py --ckpt out.pt --blank-images 1     # the same with black images: what the image contributes
    python eval.py --ckpt out.pt --answers answers.jsonl   # and each VQA / POPE question's generated answer
    python eval.py --ckpt out.pt --rag-retriever likelihood   # RAG retrieves by likelihood whatever the method
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

import data
from unimllm import MLLM, load_checkpoint, output_problem


@dataclass
class EvalArgs:
    ckpt: str = "out.pt"
    json: str = ""
    data: str = ""            # a user's file; empty: the built-in world's test split
    data_split: str = "test"  # the Karpathy records of --data scored: test | val | train (+ restval) | all
    n_test: int = 200         # built-in world: test scenes (stories, Winoground pairs and KB scale with it)
    test_seed: int = 1
    batch: int = 64
    rag_k: int = 1            # knowledge-base entries put into the prompt
    embedding: str = "auto"   # auto (the checkpoint's method) | summary | prefix
    rag_retriever: str = "auto"  # auto | embedding | likelihood (auto: likelihood where no embedding is trained)
    rag_prior: int = 48       # likelihood retrieval: minus each image's mean log-likelihood of N training-split
                              # VQA questions (prior_questions; 0: none)
    blank_images: int = 0     # 1: test images replaced by zeros (how much of a score comes from the image)
    answers: str = ""         # a JSON-lines file: every VQA / POPE question with its answer and the generated one


def parse_args(argv: list[str] | None = None) -> EvalArgs:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data.add_flags(p, EvalArgs)
    args = EvalArgs(**vars(p.parse_args(argv)))
    if args.embedding not in ("auto", "summary", "prefix"):
        raise SystemExit(f"eval.py: --embedding must be auto, summary or prefix, got {args.embedding!r}")
    if args.rag_retriever not in ("auto", "embedding", "likelihood"):
        raise SystemExit(f"eval.py: --rag-retriever must be auto, embedding or likelihood, "
                         f"got {args.rag_retriever!r}")
    if args.data_split not in data.KARPATHY_SPLITS:
        raise SystemExit(f"eval.py: --data-split must be one of {', '.join(data.KARPATHY_SPLITS)}, "
                         f"got {args.data_split!r}")
    for name in ("n_test", "batch", "rag_k"):
        if getattr(args, name) < 1:
            raise SystemExit(f"eval.py: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.rag_prior < 0:
        raise SystemExit(f"eval.py: --rag-prior must be >= 0, got {args.rag_prior}")
    if args.blank_images not in (0, 1):
        raise SystemExit(f"eval.py: --blank-images must be 0 or 1, got {args.blank_images}")
    for flag, path in (("--json", args.json), ("--answers", args.answers)):
        why = output_problem(Path(path)) if path else None
        if why:  # checked now, not after the whole evaluation
            raise SystemExit(f"eval.py: {flag} {path} {why}")
    return args


# ------------------------------------------------------------------------------------------------------------
# Metrics on score matrices (pure functions; tests/test_eval.py checks each on cases with known answers)


class NonFiniteError(ValueError):
    """NaN / inf embeddings or scores: every comparison with NaN is False, so a ranking built on them would
    count each query as a hit; no metric is computed from them."""


def require_finite(what: str, *xs: Tensor) -> None:
    for x in xs:
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise NonFiniteError(f"{what}: {bad} of {x.numel()} values are NaN or infinite")


def recall_at_k(scores: Tensor, positive: Tensor, ks: tuple[int, ...]) -> dict[int, float]:
    """scores (Q, C), positive (Q, C) bool -> {k: fraction of queries with a positive among their top k}.
    Ties are broken against the query (a positive tied with a negative counts as ranked below it)."""
    if scores.shape != positive.shape or not bool(positive.any(1).all()):
        raise ValueError("recall_at_k: scores and positive must match in shape and every query "
                         "needs a positive")
    require_finite("recall_at_k: scores", scores)
    best_pos = scores.masked_fill(~positive, -math.inf).max(1).values  # (Q,)
    # (Q,) negatives ranked above the best hit
    n_neg_above = ((scores >= best_pos[:, None]) & ~positive).sum(1)
    return {k: float((n_neg_above < k).float().mean()) for k in ks}


def pairwise_accuracy(pos: Tensor, neg: Tensor) -> float:
    """Fraction of items whose positive strictly outscores its negative (SugarCrepe)."""
    require_finite("pairwise_accuracy: scores", pos, neg)
    return float((pos > neg).float().mean())


def winoground_scores(s: Tensor) -> dict[str, float]:
    """s (N, 2, 2): s[n, i, j] = score(image i, caption j) of pair n; caption i matches image i.
    text: each image prefers its caption; image: each caption prefers its image; group: both (Thrush et
    al.)."""
    require_finite("winoground_scores: scores", s)
    text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
    image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
    return {"text": float(text.float().mean()), "image": float(image.float().mean()),
            "group": float((text & image).float().mean())}


def pope_answer(answer: str) -> str:
    """POPE's reading of a free-form answer (Li et al., EMNLP 2023, their evaluation script): the words of its
    first sentence, commas removed; "no" if one of them is "no" or "not", otherwise "yes". Case-insensitive
    (ours; the script matches "No", "no" and "not")."""
    words = answer.split(".")[0].replace(",", "").lower().split()
    return "no" if "no" in words or "not" in words else "yes"


def yes_no_metrics(pred: list[str], truth: list[str]) -> dict[str, float]:
    """POPE: accuracy, precision, recall and F1 with "yes" as the positive class, and the share of "yes"
    answers (0.5 is unbiased), all five from one reading of each answer (`pope_answer`, POPE's rule, so
    "no no no" is a no and "yes small red square" a yes); one_word: the share of answers that are just "yes"
    or "no" (normalize_answer), which shows what that reading forgives."""
    p = torch.tensor([pope_answer(x) == "yes" for x in pred])
    t = torch.tensor([normalize_answer(x) == "yes" for x in truth])
    tp, fp, fn = float((p & t).sum()), float((p & ~t).sum()), float((~p & t).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    return {"acc": float((p == t).float().mean()),
            "precision": tp / (tp + fp) if tp + fp else 0.0,
            "recall": tp / (tp + fn) if tp + fn else 0.0, "f1": f1, "yes_ratio": float(p.float().mean()),
            "one_word": sum(normalize_answer(x) in ("yes", "no") for x in pred) / len(pred)}


NUMBER_WORDS = {w: str(n) for n, w in enumerate(("zero", "one", "two", "three", "four", "five", "six",
                                                 "seven", "eight", "nine", "ten"))}
PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(answer: str) -> str:
    """The VQA answer normalisation (Antol et al., ICCV 2015), simplified (our rules): lower case, punctuation
    removed, the articles a / an / the dropped, number words zero..ten written as digits, whitespace
    collapsed."""
    words = PUNCTUATION.sub("", answer.lower()).split()
    return " ".join(NUMBER_WORDS.get(w, w) for w in words if w not in ("a", "an", "the"))


def exact_match(pred: list[str], truth: list[str]) -> float:
    """The share of predictions equal to their reference after normalize_answer."""
    return sum(normalize_answer(a) == normalize_answer(b) for a, b in zip(pred, truth)) / len(truth)


# ------------------------------------------------------------------------------------------------------------
# Embeddings and generation from the model


class Embedder:
    """Embeds data.py samples with one of the two methods' embeddings, in batches, without gradient. pool:
    how a prefix embedding pools an image's tokens, as the checkpoint was trained (train.py --sugar-pool)."""

    def __init__(self, model: MLLM, tok: data.Tokenizer, batch: int, device: torch.device,
                 pool: str = "mean") -> None:
        self.model, self.tok, self.batch, self.device, self.pool = model, tok, batch, device, pool
        self.count = 0  # embeddings computed (the throughput figure)

    @torch.no_grad()
    def __call__(self, samples: list[data.Sample], kind: str, side: str) -> Tensor:
        out = torch.cat([self._batch(samples[i:i + self.batch], kind, side)
                         for i in range(0, len(samples), self.batch)])  # (N, d)
        require_finite(f"{kind} embeddings of {len(samples)} {side} samples", out)  # guards RAG's top-k too
        self.count += len(samples)
        return out

    def _batch(self, samples: list[data.Sample], kind: str, side: str) -> Tensor:
        m, tok = self.model, self.tok
        if kind == "prefix":
            samples = [data.Sample(s.segments, [len(s.segments) - 1]) for s in samples]
        batch = data.collate(samples, tok, m.n_image_tokens, m.cfg.llm.max_seq_len)
        ids, lengths = batch["input_ids"], batch["attention_mask"].sum(1)  # (B, T), (B,)
        images = None if batch["images"] is None else batch["images"].to(self.device)
        if kind == "prefix":
            _, hidden = m(ids.to(self.device), images)
            keys = ("seg_batch", "seg_start", "seg_end", "seg_is_image", "prefix_seg")
            segs = (batch[k].to(self.device) for k in keys)
            return m.prefix_embeddings(hidden, *segs, self.pool).cpu()
        soft = tok.soft_image_id if side == "image" else tok.soft_text_id
        k = m.cfg.n_soft_tokens
        rows = [data.summary_row(r[:n], soft, k) for r, n in zip(ids.tolist(), lengths.tolist())]
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r, _ in rows], True, tok.pad_id)  # (B, T')
        _, hidden = m(ids.to(self.device), images)
        return m.summary_embedding(hidden, torch.tensor([p for _, p in rows], device=self.device)).cpu()


class TeacherEmbedder:
    """The oracle row: embeds a sample by the cross-modal teacher feature of its last segment, the exact
    featuriser of the ground truth that Sugar's targets are built from (data.py: one fixed random vector per
    fact, summed and normalised; an image's vector holds every fact of its scene, a caption's the facts it
    states). Its scores are what the discriminative suites allow on this world when an embedding knows
    everything: a short caption truly describes several images, so its retrieval recall stays below 1. The
    interleaved query's last segment is the new sentence alone, so its row is what the sentence determines
    (the whole story determines the frame: 1.0)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, samples: list[data.Sample], kind: str, side: str) -> Tensor:
        last = [s.segments[-1].cross for s in samples]
        if any(c is None for c in last):
            raise ValueError("the teacher embedder needs samples whose last segment carries teacher features")
        self.count += len(samples)
        return torch.stack(last)  # (N, CROSS_DIM), unit vectors


@torch.no_grad()
def generate_answers(model: MLLM, tok: data.Tokenizer, prompts: list[data.Sample], device: torch.device,
                     batch: int, max_new_tokens: int = 6, desc: str = "generate") -> list[str]:
    """Greedy answers to prompts (text segments without loss); prompts of equal token length share a batch, so
    no padding ever sits between a prompt and its answer."""
    rows = [data.collate([p], tok, model.n_image_tokens, model.cfg.llm.max_seq_len) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_len.setdefault(r["input_ids"].shape[1], []).append(i)
    answers = [""] * len(prompts)
    groups = [idx[j:j + batch] for idx in by_len.values() for j in range(0, len(idx), batch)]
    for idx in tqdm(groups, desc=desc, leave=False, file=sys.stderr):
        ids = torch.cat([rows[i]["input_ids"] for i in idx]).to(device)
        imgs = [rows[i]["images"] for i in idx if rows[i]["images"] is not None]
        images = torch.cat(imgs).to(device) if imgs else None
        # >= 1: a file's prompt is shorter than its checked sample
        room = model.cfg.llm.max_seq_len - ids.shape[1]
        new = model.generate(ids, images, max_new_tokens=min(max_new_tokens, room), eos_id=tok.eos_id).cpu()
        for i, row in zip(idx, new.tolist()):
            row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
            answers[i] = tok.decode(row).strip()
    return answers


@torch.no_grad()
def text_log_likelihoods(model: MLLM, tok: data.Tokenizer, pairs: list[tuple[Tensor, str]], device: torch.device,
                         batch: int, desc: str = "likelihood") -> Tensor:
    """log p(text | image) for each (image, text) pair: the summed log-probabilities of the text's tokens and
    its end-of-turn token after `[bos] <image>*n`, the tokens the next-token loss scores on a caption, with
    logits computed at those positions only (train.predicting, as the loss does). (N,)"""
    from train import predicting
    out = []
    for i in tqdm(range(0, len(pairs), batch), desc=desc, leave=False, file=sys.stderr):
        b = data.collate([data.Sample([data.image_seg(x), data.text_seg(t, True)]) for x, t in pairs[i:i + batch]],
                         tok, model.n_image_tokens, model.cfg.llm.max_seq_len)
        labels = b["labels"]  # (B, T)
        predict = predicting(labels)  # (P,) flat positions; position t predicts the token at t + 1
        logits, _ = model(b["input_ids"].to(device), b["images"].to(device), predict.to(device))  # (P, V)
        token_logp = -F.cross_entropy(logits.float(), labels.flatten()[predict + 1].to(device), reduction="none")
        row = (predict // labels.shape[1]).to(device)  # (P,) the pair each position belongs to
        out.append(token_logp.new_zeros(len(labels)).index_add_(0, row, token_logp).cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------------------
# The evaluation suites of the built-in world


def embedding_kinds(method: str, choice: str) -> dict[str, str]:
    """Which embedding each discriminative suite uses. The unified model has both heads: image-text suites use
    the contrastively trained summaries, the interleaved suite the structure-trained prefix embeddings (our
    choice)."""
    if choice != "auto":
        return {"pairs": choice, "interleaved": choice}
    if method == "sugar":
        return {"pairs": "prefix", "interleaved": "prefix"}
    if method == "unified":
        return {"pairs": "summary", "interleaved": "prefix"}
    return {"pairs": "summary", "interleaved": "summary"}


def img(x: Tensor, cross: Tensor | None = None) -> data.Sample:
    return data.Sample([data.image_seg(x, cross=cross)])


def txt(x: str, cross: Tensor | None = None) -> data.Sample:
    return data.Sample([data.text_seg(x, False, cross=cross)])


def phrase_features(phrase: data.Phrase) -> Tensor:
    return data.cross_features(data.cross_facts_phrase(phrase))


def cosine(a: Tensor, b: Tensor) -> Tensor:
    return a @ b.T  # embeddings are unit vectors


def eval_retrieval(pairs: list, emb: Embedder, kind: str) -> dict[str, float]:
    """Image <-> caption recall@K over data.Scene items (one short caption each) or data.Pair items (every
    caption of the record: a Karpathy file's five, the COCO / Flickr30k protocol). A caption is correct for
    an image when it says what one of the image's own captions says: the same string, or on the built-in
    world the same facts ("a red cross above a purple triangle" is "a purple triangle below a red cross";
    scored as a wrong caption, it would outrank the right one under every embedding that reads meaning).
    i2t: an image hits when a correct caption is in its top K; t2i: every caption against every image."""
    images, texts, text_keys, image_keys = [], [], [], []
    for s in pairs:
        # teacher features ride along where the items have them (the built-in world; the oracle row reads them)
        images.append(img(s.image, getattr(s, "cross_image", None)))
        if isinstance(s, data.Scene):
            caps = [(txt(s.short_caption, s.cross_short), frozenset(data.cross_facts_phrase(s.phrase)))]
        else:
            caps = [(txt(c), c) for c in s.captions]
        texts += [t for t, _ in caps]
        text_keys += [key for _, key in caps]
        image_keys.append({key for _, key in caps})
    i = emb(images, kind, "image")  # (N, d)
    t = emb(texts, kind, "text")  # (M, d)
    correct = torch.tensor([[key in keys for key in text_keys] for keys in image_keys])  # (N, M)
    out = {}
    for name, scores, positive in (("i2t", cosine(i, t), correct), ("t2i", cosine(t, i), correct.T)):
        for k, v in recall_at_k(scores, positive, (1, 5, 10)).items():
            out[f"retrieval/{name}_r{k}"] = v
    return out


def eval_compositional(world: data.World, emb: Embedder, kind: str) -> dict[str, float]:
    i = emb([img(s.image, s.cross_image) for s in world.scenes], kind, "image")  # (N, d)
    items = [(n, s.phrase, neg, cat) for n, s in enumerate(world.scenes)
             for cat, neg in s.negative_phrases.items()]
    pos = emb([txt(p.text(), phrase_features(p)) for _, p, _, _ in items], kind, "text")
    neg = emb([txt(q.text(), phrase_features(q)) for _, _, q, _ in items], kind, "text")
    idx = torch.tensor([n for n, _, _, _ in items])
    pos_s, neg_s = (i[idx] * pos).sum(1), (i[idx] * neg).sum(1)
    out = {}
    for cat in data.CATEGORIES:
        mask = torch.tensor([c == cat for *_, c in items])
        if bool(mask.any()):
            out[f"compositional/{cat}"] = pairwise_accuracy(pos_s[mask], neg_s[mask])
    out["compositional/mean"] = sum(out.values()) / len(out)
    return out


def eval_winoground(world: data.World, emb: Embedder, kind: str) -> dict[str, float]:
    pairs = world.winoground
    images = [img(x, data.cross_features(data.cross_facts_graph(graph))) for p in pairs
              for x, graph in ((p.image_a, p.graph_a), (p.image_b, p.graph_b))]
    captions = [txt(ph.text(), phrase_features(ph)) for p in pairs for ph in (p.phrase_a, p.phrase_b)]
    return winoground_suite(images, captions, emb, kind)


def winoground_suite(images: list[data.Sample], captions: list[data.Sample], emb: Embedder,
                     kind: str) -> dict[str, float]:
    """images, captions: 2N samples, example n's image k and caption k at 2n + k (caption k fits image k)."""
    n = len(images) // 2
    ims = emb(images, kind, "image").view(n, 2, -1)  # (N, 2, d)
    caps = emb(captions, kind, "text").view(n, 2, -1)  # (N, 2, d)
    s = torch.einsum("nid,njd->nij", ims, caps)  # (N, 2, 2)
    return {f"winoground/{k}": v for k, v in winoground_scores(s).items()}


def eval_interleaved(world: data.World, emb: Embedder, kind: str) -> dict[str, float]:
    """Query: frames 0..k-1 with their sentences, then sentence k; target: frame k, among every test frame (a
    frame with the same scene graph as the target counts as a hit too)."""
    frames = [f for st in world.stories for f in st.frames]
    queries, targets = [], []
    for st in world.stories:
        for k in range(1, len(st)):
            segs = [seg for f in st.frames[:k]
                    for seg in (data.image_seg(f.image), data.text_seg(f.sentence, False))]
            nxt = st.frames[k]
            queries.append(data.Sample(segs + [data.text_seg(nxt.sentence, False, nxt.uni_text,
                                                             nxt.cross_text)]))
            targets.append(data.canonical(st.frames[k].graph))
    return interleaved_suite(queries, targets, [img(f.image, f.cross_image) for f in frames],
                             [data.canonical(f.graph) for f in frames], emb, kind)


def interleaved_suite(queries: list[data.Sample], targets: list[object], candidates: list[data.Sample],
                      keys: list[object], emb: Embedder, kind: str) -> dict[str, float]:
    """recall@1, @5 of each query's next image among the candidates; a candidate whose key equals the query's
    target key is a hit."""
    cands = emb(candidates, kind, "image")  # (F, d)
    q = emb(queries, kind, "text")  # (Q, d)
    positive = torch.tensor([[t == key for key in keys] for t in targets])  # (Q, F)
    return {f"interleaved/r{k}": v for k, v in recall_at_k(cosine(q, cands), positive, (1, 5)).items()}


def document_queries(
        docs: list[data.Sample],
) -> tuple[list[tuple[int, data.Sample]], list[int], list[data.Sample], list[int]]:
    """The interleaved suite on MMC4 documents (data.read_mmc4 puts each image right before its matched
    sentence). As on the built-in stories, a query is the document before an image (its images and sentences)
    followed by the image's matched sentence (the first sentence after it), and the target is that image among
    every image of the file's documents. Two things the stories have and documents lack, and what stands in:
    - a scene graph, which makes two frames the same picture: here two images with identical pixels (as
      loaded) are the same, so a repeated image is a hit wherever it occurs;
    - a frame before every query: an image with nothing before it in its document is no query (as frame 0).
    Returns (document index, query) pairs, their target keys, the candidate images and their keys."""
    key_of: dict[bytes, int] = {}
    queries, targets, cands, keys = [], [], [], []
    for d, doc in enumerate(docs):
        segs = [data.image_seg(s.image) if s.kind == "image" else data.text_seg(s.text, False)
                for s in doc.segments]  # loss off, as the stories' queries
        for p, seg in enumerate(segs):
            if seg.kind != "image":
                continue
            key = key_of.setdefault(seg.image.numpy().tobytes(), len(key_of))
            cands.append(img(seg.image))
            keys.append(key)
            if p > 0:
                sentence = next(s for s in segs[p + 1:] if s.kind == "text")  # read_mmc4: one follows
                queries.append((d, data.Sample(segs[:p] + [sentence])))
                targets.append(key)
    return queries, targets, cands, keys


def fit_context(query: data.Sample, tok: data.Tokenizer, n_image_tokens: int,
                room: int) -> data.Sample | None:
    """The query with its oldest segments dropped until its tokens fit `room` (our choice: a document that
    fits the context for training can exceed it once the summary's soft prompt is appended); None if even its
    last segment does not fit."""
    segs = query.segments
    while data.sample_lengths([data.Sample(segs)], tok, n_image_tokens)[0] > room:
        if len(segs) == 1:
            return None
        segs = segs[1:]
    return data.Sample(segs)


def qa_prompt(image: Tensor, question: str) -> data.Sample:
    return data.Sample([data.image_seg(image), data.text_seg(data.format_question(question), False)])


def question_type(question: str) -> str:
    """The built-in world's VQA templates: how many / what colour / what shape / what size / a relation."""
    for prefix, name in (("how many", "count"), ("what colour", "colour"), ("what shape", "shape"),
                         ("what size", "size")):
        if question.startswith(prefix):
            return name
    return "relation"


def answer_record(kind: str, qtype: str | None, question: str, answer: str, generated: str) -> dict[str, Any]:
    """One line of --answers; correct is what the metrics count (exact_match, or POPE's yes / no reading)."""
    right = ((pope_answer(generated) == "yes") == (normalize_answer(answer) == "yes") if kind == "pope"
             else normalize_answer(generated) == normalize_answer(answer))
    return {"kind": kind, "type": qtype, "question": question, "answer": answer, "generated": generated,
            "correct": right}


def eval_vqa_pope(world: data.World, model: MLLM, tok: data.Tokenizer, device: torch.device,
                  batch: int, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """vqa/* and pope/* of the built-in world's scenes, from greedy answers; records, if given, gets one
    answer_record per question (--answers)."""
    vqa = [(s.image, q, a) for s in world.scenes for q, a in s.vqa]
    pope = [(s.image, q, a) for s in world.scenes for q, a in s.pope]
    answers = generate_answers(model, tok, [qa_prompt(i, q) for i, q, _ in vqa + pope], device, batch,
                               desc="vqa+pope")
    if records is not None:
        records += [answer_record("vqa", question_type(q), q, a, g) for (_, q, a), g in zip(vqa, answers)]
        records += [answer_record("pope", None, q, a, g) for (_, q, a), g in zip(pope, answers[len(vqa):])]
    out = {"vqa/acc": exact_match(answers[:len(vqa)], [a for *_, a in vqa])}
    for kind in ("count", "colour", "shape", "size", "relation"):
        idx = [k for k, (_, q, _) in enumerate(vqa) if question_type(q) == kind]
        out[f"vqa/{kind}"] = exact_match([answers[k] for k in idx], [vqa[k][2] for k in idx])
    # relations per axis: a model that reads the cells along one axis only answers that axis's questions
    for axis, asks in (("left_right", "left or right of"), ("above_below", "above or below")):
        idx = [k for k, (_, q, _) in enumerate(vqa) if asks in q]
        if idx:
            out[f"vqa/relation_{axis}"] = exact_match([answers[k] for k in idx], [vqa[k][2] for k in idx])
    out.update({f"pope/{k}": v for k, v in yes_no_metrics(answers[len(vqa):], [a for *_, a in pope]).items()})
    return out


Retriever = Callable[[list[str], list[Tensor]], Tensor]  # (questions, images) -> scores (Q, E)


def embedding_retriever(emb: Embedder, kind: str) -> Retriever:
    """Cosine of the question's text embedding and each entry image's embedding (the method's own)."""
    return lambda questions, images: cosine(emb([txt(q) for q in questions], kind, "text"),
                                            emb([img(x) for x in images], kind, "image"))


def prior_questions(n: int) -> list[str]:
    """The first n VQA questions of the built-in world's training split (data seed 0; "what colour is the
    square?"): likelihood_retriever's prior bank. None is a RAG question; all are asked of training scenes."""
    return [q for scene in data.make_world("train", max(1, n), 0).scenes for q, _ in scene.vqa][:n]


def likelihood_retriever(model: MLLM, tok: data.Tokenizer, device: torch.device, batch: int,
                         prior: list[str]) -> Retriever:
    """For a model with no trained embedding (the base, generative fine-tuning): an entry's score for a question
    is log p(question | entry image) under the model's own next-token distribution (text_log_likelihoods),
    minus the mean of log p(b | entry image) over the texts b of `prior` (empty: nothing subtracted), so the
    entry it retrieves is the image that best explains the question's words beyond what it gives any question.
    Why the prior: most of a question's log-likelihood is its opening ("what is the name of the"), which says
    nothing about the entry yet varies from image to image, as does how likely an image makes any text; a
    fixed bank of training-split questions (prior_questions) measures that per-image offset without looking at
    the questions asked (a pointwise-mutual-information-style score). One forward pass per (question, entry)
    pair and per (bank text, entry) pair. Our choice; each question is retrieved for on its own."""
    def loglik(texts: list[str], images: list[Tensor]) -> Tensor:  # (len(texts), len(images))
        pairs = [(x, t) for t in texts for x in images]
        return text_log_likelihoods(model, tok, pairs, device, batch, "rag likelihood").view(len(texts),
                                                                                           len(images))

    def scores(questions: list[str], images: list[Tensor]) -> Tensor:
        out = loglik(questions, images)  # (Q, E)
        return out - loglik(prior, images).mean(0, keepdim=True) if prior else out
    return scores


def eval_rag(world: data.World, model: MLLM, tok: data.Tokenizer, retrieve: Retriever, k: int,
             device: torch.device, batch: int) -> dict[str, float]:
    """Names of test objects never occur in training: without retrieval only a guess can answer. With
    retrieval the question's k best-scoring knowledge-base entry images (`retrieve`) put their descriptions
    first."""
    kb = world.kb
    scores = retrieve([question for question, _ in kb.questions], [e.image for e in kb.entries])  # (Q, E)
    require_finite("RAG retrieval scores", scores)
    top = scores.topk(min(k, len(kb.entries)), dim=1).indices.tolist()
    with_ctx = [data.Sample([data.text_seg(kb.entries[e].description, False) for e in reversed(top[n])]
                            + [data.text_seg(data.format_question(question), False)])
                for n, (question, _) in enumerate(kb.questions)]
    without = [data.Sample([data.text_seg(data.format_question(question), False)])
               for question, _ in kb.questions]
    oracle = [data.Sample([data.text_seg(e.description, False),
                           data.text_seg(data.format_question(question), False)])
              for e, (question, _) in zip(kb.entries, kb.questions)]
    truth = [name for _, name in kb.questions]
    answers = generate_answers(model, tok, with_ctx + without + oracle, device, batch, max_new_tokens=8,
                               desc="rag")
    n = len(truth)
    return {"rag/acc": exact_match(answers[:n], truth),
            "rag/acc_without_retrieval": exact_match(answers[n:2 * n], truth),
            "rag/acc_oracle_context": exact_match(answers[2 * n:], truth),
            "rag/retrieval_r1": float(sum(top[i][0] == i for i in range(n)) / n)}


def blank_world_images(world: data.World) -> None:
    """The diagnostic of --blank-images: every image of the test split becomes black."""
    for s in world.scenes:
        s.image = torch.zeros_like(s.image)
    for st in world.stories:
        for f in st.frames:
            f.image = torch.zeros_like(f.image)
    for w in world.winoground:
        w.image_a, w.image_b = torch.zeros_like(w.image_a), torch.zeros_like(w.image_b)
    for e in world.kb.entries:
        e.image = torch.zeros_like(e.image)


def evaluate_world(model: MLLM, tok: data.Tokenizer, method: str, args: EvalArgs, device: torch.device,
                   pool: str = "mean", records: list[dict[str, Any]] | None = None
                   ) -> tuple[dict[str, float], dict[str, str]]:
    world = data.make_world("test", args.n_test, args.test_seed, image_size=model.cfg.vision.image_size)
    if args.blank_images:
        blank_world_images(world)
    kinds = embedding_kinds(method, args.embedding)
    # RAG's retriever: auto takes the likelihood where the method trains no embedding
    likelihood = args.rag_retriever == "likelihood" or (args.rag_retriever == "auto" and method == "generative")
    kinds["rag"] = "likelihood" if likelihood else kinds["pairs"]
    emb = Embedder(model, tok, args.batch, device, pool)
    metrics: dict[str, float] = {}
    t0 = time.perf_counter()
    metrics.update(eval_discriminative(world, emb, kinds))
    metrics["speed/embeddings_per_s"] = emb.count / (time.perf_counter() - t0)
    if kinds["rag"] == "likelihood":
        retrieve = likelihood_retriever(model, tok, device, args.batch, prior_questions(args.rag_prior))
    else:
        retrieve = embedding_retriever(emb, kinds["pairs"])
    metrics.update(eval_rag(world, model, tok, retrieve, args.rag_k, device, args.batch))
    metrics.update(eval_vqa_pope(world, model, tok, device, args.batch, records))
    # the oracle row: the same suites on the teacher features, the ceiling each score is read against
    oracle = eval_discriminative(world, TeacherEmbedder(), {"pairs": "teacher", "interleaved": "teacher"})
    metrics.update({f"oracle/{k}": v for k, v in oracle.items()})
    return metrics, kinds


def eval_discriminative(world: data.World, emb: Embedder | TeacherEmbedder,
                        kinds: dict[str, str]) -> dict[str, float]:
    return {**eval_retrieval(world.scenes, emb, kinds["pairs"]),
            **eval_compositional(world, emb, kinds["pairs"]),
            **eval_winoground(world, emb, kinds["pairs"]),
            **eval_interleaved(world, emb, kinds["interleaved"])}


def evaluate_file(model: MLLM, tok: data.Tokenizer, method: str, args: EvalArgs, device: torch.device,
                  pool: str = "mean", records: list[dict[str, Any]] | None = None
                  ) -> tuple[dict[str, float], dict[str, str]]:
    """Users' files (--data, comma-separated): the union of each file's metrics (data.py lists which format
    gives which); a metric that several files give is reported once per file, as `<metric>@<file stem>`."""
    per_file = []
    for path in args.data.split(","):
        try:
            loaded = data.load_dataset(path, tok=tok, n_image_tokens=model.n_image_tokens,
                                       max_len=model.cfg.llm.max_seq_len,
                                       image_size=model.cfg.vision.image_size, split=args.data_split)
        except ValueError as e:  # data.py's DataError lists every problem of the file
            raise SystemExit(f"eval.py: {e}") from e
        first = len(records) if records is not None else 0
        metrics, kinds = evaluate_loaded(loaded, path, model, tok, method, args, device, pool, records)
        for r in (records or [])[first:]:
            r["file"] = path
        per_file.append((path, metrics))
    counts: dict[str, int] = {}
    for _, m in per_file:
        for k in m:
            counts[k] = counts.get(k, 0) + 1
    return {(k if counts[k] == 1 else f"{k}@{Path(path).stem}"): v for path, m in per_file
            for k, v in m.items()}, kinds


def evaluate_loaded(loaded: data.LoadedData, path: str, model: MLLM, tok: data.Tokenizer, method: str,
                    args: EvalArgs, device: torch.device, pool: str,
                    records: list[dict[str, Any]] | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """One file's metrics: SugarCrepe-style negatives give compositional accuracy, Karpathy pairs retrieval,
    LLaVA supervised turns VQA accuracy (greedy answers), POPE lines the yes/no metrics, MMC4 documents the
    interleaved recall (document_queries), Winoground lines the Winoground scores."""
    kinds = embedding_kinds(method, args.embedding)
    emb = Embedder(model, tok, args.batch, device, pool)
    metrics: dict[str, float] = {}
    if loaded.questions:
        metrics.update(eval_questions(loaded.questions, model, tok, device, args.batch, records))
    if loaded.negatives:
        i = emb([img(n.image) for n in loaded.negatives], kinds["pairs"], "image")
        pos = emb([txt(n.positive) for n in loaded.negatives], kinds["pairs"], "text")
        neg = emb([txt(n.negative) for n in loaded.negatives], kinds["pairs"], "text")
        metrics["compositional/file"] = pairwise_accuracy((i * pos).sum(1), (i * neg).sum(1))
    if loaded.pairs:
        metrics.update(eval_retrieval(loaded.pairs, emb, kinds["pairs"]))
    if loaded.winoground:
        w = loaded.winoground
        metrics.update(winoground_suite([img(x) for it in w for x in (it.image_0, it.image_1)],
                                        [txt(c) for it in w for c in (it.caption_0, it.caption_1)], emb,
                                        kinds["pairs"]))
    if loaded.format == "mmc4":
        metrics.update(eval_documents(loaded, path, model, tok, emb, kinds["interleaved"]))
    if not metrics:
        raise SystemExit(f"eval.py: {path} ({loaded.format}) has no pairs, negatives, questions, documents "
                         f"or Winoground pairs to evaluate")
    return metrics, kinds


def eval_documents(loaded: data.LoadedData, path: str, model: MLLM, tok: data.Tokenizer, emb: Embedder,
                   kind: str) -> dict[str, float]:
    """interleaved/r1, r5 on an MMC4 file's documents (document_queries), each query fitted to the context."""
    queries, targets, cands, keys = document_queries(loaded.samples)
    if not queries:
        raise SystemExit(f"eval.py: {path}: no image with anything before it in its document, so no "
                         f"interleaved query (the suite retrieves each image from the document before it)")
    room = model.cfg.llm.max_seq_len - (model.cfg.n_soft_tokens if kind == "summary" else 0)
    fitted = []
    for d, q in queries:
        f = fit_context(q, tok, model.n_image_tokens, room)
        if f is None:
            line = loaded.sample_records[d]
            raise SystemExit(f"eval.py: {path}: record {line}: a sentence with the summary's soft prompt "
                             f"exceeds the context of {model.cfg.llm.max_seq_len} tokens")
        fitted.append(f)
    return interleaved_suite(fitted, targets, cands, keys, emb, kind)


def prompt_text(sample: data.Sample) -> str:
    """A prompt's text, an image as <image> (--answers)."""
    return "\n".join("<image>" if seg.kind == "image" else seg.text for seg in sample.segments)


def eval_questions(questions: list[data.Question], model: MLLM, tok: data.Tokenizer, device: torch.device,
                   batch: int, records: list[dict[str, Any]] | None = None) -> dict[str, float]:
    """vqa/acc (+ vqa/<type>) over the "vqa" questions and pope/* over the "pope" ones, from greedy
    answers; records, if given, gets one answer_record per question (--answers)."""
    answers = generate_answers(model, tok, [q.prompt for q in questions], device, batch, max_new_tokens=16,
                               desc="questions")
    if records is not None:
        records += [answer_record(q.kind, q.type, prompt_text(q.prompt), q.answer, g)
                    for q, g in zip(questions, answers)]
    out = {}
    for kind in ("vqa", "pope"):
        idx = [k for k, q in enumerate(questions) if q.kind == kind]
        if not idx:
            continue
        pred, truth = [answers[k] for k in idx], [questions[k].answer for k in idx]
        if kind == "pope":
            out.update({f"pope/{k}": v for k, v in yes_no_metrics(pred, truth).items()})
            continue
        out["vqa/acc"] = exact_match(pred, truth)
        for qtype in sorted({questions[k].type for k in idx} - {None}):
            sel = [k for k in idx if questions[k].type == qtype]
            out[f"vqa/{qtype}"] = exact_match([answers[k] for k in sel], [questions[k].answer for k in sel])
    return out


def print_table(metrics: dict[str, float], kinds: dict[str, str], ckpt: str, method: str) -> None:
    print(f"checkpoint {ckpt} | method {method} | embeddings: image-text {kinds['pairs']}, "
          f"interleaved {kinds['interleaved']}" + (f", RAG retrieval {kinds['rag']}" if "rag" in kinds else ""))
    width = max(len(k) for k in metrics)
    for k, v in metrics.items():
        print(f"  {k:<{width}}  {v:8.4f}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.ckpt)
    model, tok = MLLM.from_checkpoint(ckpt, args.ckpt), data.Tokenizer.from_str(ckpt["tokenizer"])
    model = model.to(device).eval()
    method = ckpt["method"] if ckpt["stage"] == "finetune" else "generative"
    finetuned = ckpt["stage"] == "finetune"
    pool = ckpt["train_config"]["finetune"].get("sugar_pool", "mean") if finetuned else "mean"
    records: list[dict[str, Any]] | None = [] if args.answers else None
    try:
        evaluate = evaluate_file if args.data else evaluate_world
        metrics, kinds = evaluate(model, tok, method, args, device, pool, records)
    except NonFiniteError as e:
        raise SystemExit(f"eval.py: {args.ckpt}: the model's outputs are not finite ({e}); its weights are "
                         f"probably broken (a diverged run?), so no metric is reported") from e
    print_table(metrics, kinds, args.ckpt, method)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=1) + "\n")
    if records is not None:
        out = Path(args.answers)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in records))
    return metrics


if __name__ == "__main__":
    main()
