"""data.py — everything unimllm trains and is evaluated on: the one batch format (`collate`,
`collate_pairs`) and its tokenizer, the built-in synthetic world, and readers for the formats a user brings.

The file reads in that order: segments, samples and the tokenizer, then `collate` / `collate_pairs`; then the
built-in world (scene graphs, rendering, captions, hard negatives, questions, teacher features, stories, the
RAG knowledge base, `make_world` and the sample builders); then the file readers and `check`.

Implements the data side of two papers:
- Sugar (interleaved retrieval + generation): samples are interleaved image/text *slices*; every prefix of a
  sample gets an embedding, and the structure loss (Sugar Eq. 3) compares prefixes through a GAK (Sugar Eq. 2)
  over the slices' teacher features, combined by the triple kernel (Sugar Eq. 4: uni-modal image, uni-modal
  text and cross-modal features). `collate` therefore returns every slice's boundaries, its teacher features
  and, for every prefix, which slices it covers.
- VladVA (contrastive + next-token on one LLM): an image sequence `<image>*n <soft_image>*K long caption </s>`
  and a text sequence `short caption <soft_text>*K`; `collate_pairs` builds both (VladVA Sec. 3, E5-V style
  prompts).

Batch format. A Sample is a list of Segments (an image, or a text with or without loss, each with optional
teacher features) and the indices of the segments that end a Sugar prefix. `collate` turns B samples into one
right-padded batch; with T tokens, S segments (slices) over the batch, P prefixes and L = the longest prefix,
its keys are:
  input_ids (B, T) long, pad_id after each row's end; labels (B, T) long, -100 where there is no loss
    (images, prompts, padding); attention_mask (B, T) bool, True on real tokens;
  images (N, 3, H, W) float, the batch's images in order, or None when it has none;
  seg_batch, seg_start, seg_end (S,) long: each segment's sample and token span [start, end);
    seg_is_image (S,) bool; slice_uni (S, Du), slice_cross (S, Dc) float teacher features (zeros where a
    segment has none); has_teacher (S,) bool;
  prefix_seg (P,) long: the segment (index into S) that ends each prefix; prefix_batch (P,) long: its
    sample; prefix_slices (P, L) long: the segments (indices into S) of each prefix in order, zero-padded;
    prefix_len (P,) long.
`collate_pairs` turns B (image, short caption, long caption) items into VladVA's two sequences:
  img_ids (B, Ti) long: [bos] <image>*n <soft_image>*K long_caption </s>, pad_id after each row's end;
  img_labels (B, Ti) long: the long caption and its </s>, -100 elsewhere;
  img_pos (B,) long: the position of the last <soft_image>, where the summary embedding is read;
  images (B, 3, H, W) float;
  txt_ids (B, Tt) long: [bos] short_caption <soft_text>*K, pad_id after each row's end;
  txt_pos (B,) long: the position of the last <soft_text>.

The built-in world (`make_world`) is deterministic per seed and needs no download: Pillow-drawn scenes of 1-4
shapes (4 shapes x 6 colours x 2 sizes on a 3x3 grid; within one scene every object has its own shape and its
own colour, so "the red square" always names exactly one object and every hard negative below is provably
false).

Run:
    python data.py check PATH [--tokenizer tokenizer.json] [--max-len 192] [--n-image-tokens 9]
        validates a LLaVA / Karpathy / MMC4 / SugarCrepe / POPE / Winoground / teacher-features file,
        reporting every problem at once (a .jsonl file's records are numbered by line from 1); the defaults
        are train.py's default context and image tokens.
    python data.py demo       prints one scene of the built-in world.

User formats (found by suffix and content; image paths are relative to the file; eval.py's metrics for each):
  LLaVA conversations .json (train; eval: vqa/acc, vqa/<type> from the optional "type"):
      [{"id": "0", "image": "img/0.png", "type": "colour", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "red"}]}]
  Karpathy captions .json (train; eval: retrieval/*):
      {"images": [{"filename": "img/0.png", "split": "test",
                   "sentences": [{"raw": "a red square."}, {"raw": "one red square in the middle."}]}]}
  MMC4 documents .jsonl, one per line (train; eval: interleaved/r1|r5):
      {"text_list": ["a first line.", "a second line."],
       "image_info": [{"image_name": "img/0.png", "matched_text_index": 0}]}
  SugarCrepe .json, the category from "category" or the file name (eval: compositional/file):
      {"0": {"filename": "img/0.png", "caption": "a red square.",
             "negative_caption": "a blue square."}}
  POPE questions .jsonl, one per line (train; eval: pope/acc|precision|recall|f1|yes_ratio):
      {"question_id": 1, "image": "img/0.png", "text": "Is there a red square in the image?", "label": "yes"}
      {"question_id": 2, "image": "img/0.png", "text": "Is there a cat in the image?", "label": "no"}
  Winoground pairs .jsonl, one per line, the keys of Winoground's examples.jsonl ("id" optional), image
  paths written out (its "ex_0_img_0" needs its folder and ".png") (eval: winoground/text|image|group):
      {"id": 0, "image_0": "img/0.png", "image_1": "img/1.png",
       "caption_0": "a red square left of a blue circle.", "caption_1": "a blue square left of a red circle."}
  Teacher features .safetensors (train --features): tensors "image:<path>.uni|cross",
      "text:<sha256>.uni|cross", written by
      save_features({feature_key("image", "img/0.png"): (uni, cross), ...}).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import json
import random
import re
import sys
import zlib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from torch import Tensor

# ------------------------------------------------------------------------------------------------------------
# Batch format constants
# ------------------------------------------------------------------------------------------------------------
SPECIALS = ("<pad>", "<s>", "</s>", "<image>", "<soft_image>", "<soft_text>")
IMAGE_PROMPT = "Summarize above image in one word:"
TEXT_PROMPT = "Summarize above sentence in one word:"
IMAGE_TOKEN = "<image>"
MAX_LEN = 192  # train.py's default context (--max-len); `check` measures samples against it by default
N_IMAGE_TOKENS = 9  # image tokens of train.py's default vision tower (48x48 images, 16-px patches)
# teacher feature widths of the built-in world; collate's zero features where a batch has none
UNI_DIM = 64
CROSS_DIM = 64


# ------------------------------------------------------------------------------------------------------------
# Segments and samples
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Segment:
    kind: str                  # "image" | "text"
    image: Tensor | None = None
    text: str | None = None
    loss: bool = False
    uni: Tensor | None = None
    cross: Tensor | None = None


@dataclass
class Sample:
    segments: list[Segment]
    prefixes: list[int] = field(default_factory=list)  # indices of segments that end a Sugar prefix


def image_seg(image: Tensor, uni: Tensor | None = None, cross: Tensor | None = None) -> Segment:
    return Segment("image", image=image, uni=uni, cross=cross)


def text_seg(text: str, loss: bool, uni: Tensor | None = None, cross: Tensor | None = None) -> Segment:
    return Segment("text", text=text, loss=loss, uni=uni, cross=cross)


# ------------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------------
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the ids of the special tokens unimllm needs."""

    def __init__(self, tk: "tokenizers.Tokenizer") -> None:  # noqa: F821
        self.tk = tk
        ids = {s: tk.token_to_id(s) for s in SPECIALS}
        missing = [s for s, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"Tokenizer: special tokens {missing} are missing (use "
                             "load_tokenizer to add them)")
        self.pad_id, self.bos_id, self.eos_id = ids["<pad>"], ids["<s>"], ids["</s>"]
        self.image_id, self.soft_image_id = ids["<image>"], ids["<soft_image>"]
        self.soft_text_id = ids["<soft_text>"]

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        for s in SPECIALS:
            if s in text:
                raise ValueError(f"Tokenizer.encode: text contains the special token {s!r}; pass images as "
                                 f"image segments, not as text: {text[:80]!r}")
        return self.tk.encode(text, add_special_tokens=False).ids

    def count(self, texts: Sequence[str]) -> list[int]:
        """len(encode(t)) for each text, each distinct text encoded once, in one batched call (length checks
        over a whole corpus, whose questions and captions repeat)."""
        distinct = list(dict.fromkeys(texts))
        encoded = self.tk.encode_batch(distinct, add_special_tokens=False)
        n = {t: len(e.ids) for t, e in zip(distinct, encoded)}
        return [n[t] for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=True)

    def to_str(self) -> str:
        return self.tk.to_str()

    @classmethod
    def from_str(cls, s: str) -> "Tokenizer":
        import tokenizers
        return cls(tokenizers.Tokenizer.from_str(s))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_str())


def train_tokenizer(texts: Sequence[str], vocab_size: int = 1024) -> Tokenizer:
    """Byte-level BPE trained on `texts`; with the default size every world word is a single token."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(list(texts), trainer)
    return Tokenizer(tk)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A real LLM's tokenizer.json (or one saved by Tokenizer.save); missing unimllm special tokens are
    added."""
    import tokenizers
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ValueError(f"load_tokenizer: {p} does not exist (expected a tokenizer.json)")
    try:
        tk = tokenizers.Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"load_tokenizer: {p} is not a valid tokenizer.json: {e}") from e
    missing = [s for s in SPECIALS if tk.token_to_id(s) is None]
    if missing:
        tk.add_special_tokens(missing)
    return Tokenizer(tk)


def soft_prompt_ids(tok: Tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of IMAGE_PROMPT and TEXT_PROMPT, right-padded with pad_id to the same K (for
    init_soft_prompts)."""
    a, b = tok.encode(IMAGE_PROMPT), tok.encode(TEXT_PROMPT)
    k = max(len(a), len(b))
    return a + [tok.pad_id] * (k - len(a)), b + [tok.pad_id] * (k - len(b))


def n_soft_tokens(tok: Tokenizer) -> int:
    return len(soft_prompt_ids(tok)[0])


# ------------------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------------------
def segment_text(text: str, after_text: bool) -> str:
    """The string actually encoded for a text segment: one space separates it from a preceding text segment,
    so an answer after "answer:" is encoded as " red", the same single token as inside a caption (eval strips
    it)."""
    return " " + text if after_text and not text[:1].isspace() else text


def _segment_ids(seg: Segment, tok: Tokenizer, n_image_tokens: int, where: str,
                 after_text: bool) -> list[int]:
    if seg.kind == "image":
        if seg.image is None or seg.image.dim() != 3 or seg.image.shape[0] != 3:
            raise ValueError(f"{where}: image segment needs an image tensor (3, H, W)")
        return [tok.image_id] * n_image_tokens
    if seg.kind != "text":
        raise ValueError(f"{where}: segment kind must be 'image' or 'text', got {seg.kind!r}")
    if not seg.text or not seg.text.strip():
        raise ValueError(f"{where}: text segment is empty")
    return tok.encode(segment_text(seg.text, after_text))


def _teacher_dims(samples: Sequence[Sample]) -> tuple[int, int]:
    du = {s.uni.shape[-1] for x in samples for s in x.segments if s.uni is not None}
    dc = {s.cross.shape[-1] for x in samples for s in x.segments if s.cross is not None}
    if len(du) > 1 or len(dc) > 1:
        raise ValueError(f"collate: teacher feature widths differ within the batch: uni {du}, cross {dc}")
    return (du.pop() if du else UNI_DIM), (dc.pop() if dc else CROSS_DIM)


def ends_turn(segments: Sequence[Segment], i: int) -> bool:
    """A supervised text segment not followed by another one ends a turn and gets </s> (LLaVA: every assistant
    answer ends with </s>, so the model learns to stop after each answer, not only after the last)."""
    seg, nxt = segments[i], segments[i + 1] if i + 1 < len(segments) else None
    return seg.kind == "text" and seg.loss and not (nxt is not None and nxt.kind == "text" and nxt.loss)


def collate(samples: Sequence[Sample], tok: Tokenizer, n_image_tokens: int,
            max_len: int) -> dict[str, Tensor]:
    """Interleaved samples -> one right-padded batch. Raises on too-long samples (no truncation).

    Sequence: [bos] seg_0 seg_1 ... with [eos] after each turn of supervised text (ends_turn). The eos is
    labelled but belongs to no segment, so a text segment's last token is its own last text token (Sugar's
    slice summary). A text segment right after another text segment is encoded with a leading space
    (segment_text).
    The keys and their shapes are listed in the module docstring (Batch format)."""
    if not samples:
        raise ValueError("collate: empty batch")
    du, dc = _teacher_dims(samples)
    rows, labs = [], []
    images: list[Tensor] = []
    seg_batch, seg_start, seg_end, seg_is_image, uni, cross, has_t = [], [], [], [], [], [], []
    prefix_seg, prefix_batch, prefix_slices = [], [], []
    for b, smp in enumerate(samples):
        ids, lab = [tok.bos_id], [-100]
        first_global = len(seg_batch)
        for i, seg in enumerate(smp.segments):
            after_text = i > 0 and smp.segments[i - 1].kind == "text"
            seg_ids = _segment_ids(seg, tok, n_image_tokens, f"collate: sample {b} segment {i}", after_text)
            seg_batch.append(b)
            seg_start.append(len(ids))
            ids += seg_ids
            seg_end.append(len(ids))
            seg_is_image.append(seg.kind == "image")
            lab += seg_ids if (seg.kind == "text" and seg.loss) else [-100] * len(seg_ids)
            if seg.kind == "image":
                images.append(seg.image)
            uni.append(seg.uni if seg.uni is not None else torch.zeros(du))
            cross.append(seg.cross if seg.cross is not None else torch.zeros(dc))
            has_t.append(seg.uni is not None and seg.cross is not None)
            if ends_turn(smp.segments, i):
                ids.append(tok.eos_id)
                lab.append(tok.eos_id)
        if len(ids) > max_len:
            raise ValueError(f"collate: sample {b} has {len(ids)} tokens > max_len {max_len} "
                             f"(refusing to truncate; shorten the sample or raise max_len)")
        for p in smp.prefixes:
            if not 0 <= p < len(smp.segments):
                raise ValueError(f"collate: sample {b} prefix {p} is not a segment index "
                                 f"(0..{len(smp.segments) - 1})")
            prefix_seg.append(first_global + p)
            prefix_batch.append(b)
            prefix_slices.append(list(range(first_global, first_global + p + 1)))
        rows.append(ids)
        labs.append(lab)
    T = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)           # (B, T)
    for b, (r, l) in enumerate(zip(rows, labs)):
        input_ids[b, :len(r)] = torch.tensor(r)
        labels[b, :len(l)] = torch.tensor(l)
    L = max((len(p) for p in prefix_slices), default=0)
    slices = torch.zeros((len(prefix_slices), L), dtype=torch.long)       # (P, L)
    for k, p in enumerate(prefix_slices):
        slices[k, :len(p)] = torch.tensor(p)
    return {
        "input_ids": input_ids, "labels": labels,
        "attention_mask": torch.arange(T)[None, :] < torch.tensor([len(r) for r in rows])[:, None],  # (B, T)
        "images": _stack_images(images),
        "seg_batch": torch.tensor(seg_batch, dtype=torch.long),
        "seg_start": torch.tensor(seg_start, dtype=torch.long),
        "seg_end": torch.tensor(seg_end, dtype=torch.long), "seg_is_image": torch.tensor(seg_is_image),
        "slice_uni": torch.stack(uni).float(), "slice_cross": torch.stack(cross).float(),
        "has_teacher": torch.tensor(has_t),
        "prefix_seg": torch.tensor(prefix_seg, dtype=torch.long),
        "prefix_batch": torch.tensor(prefix_batch, dtype=torch.long),
        "prefix_slices": slices,
        "prefix_len": torch.tensor([len(p) for p in prefix_slices], dtype=torch.long),
    }


def _stack_images(images: list[Tensor]) -> Tensor | None:
    """(N, 3, H, W) or None when the batch has no image."""
    if not images:
        return None
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        raise ValueError(f"collate: images in one batch must share a size, got {sorted(shapes)}")
    return torch.stack(images).float()


def _pair_fields(item: object) -> tuple[Tensor, str, str]:
    if isinstance(item, tuple):
        if len(item) != 3:
            raise ValueError("collate_pairs: a tuple item must be (image, short_caption, long_caption)")
        return item
    return item.image, item.short_caption, item.long_caption


def summary_row(ids: list[int], soft_id: int, n_soft: int) -> tuple[list[int], int]:
    """VladVA's summary input: a sample's tokens, then the K soft-prompt tokens of its side (<soft_image>
    after an image, <soft_text> after a text); the summary embedding is read at the last of them, whose
    position is returned. Training (collate_pairs) and eval.py's embeddings build their rows here."""
    return ids + [soft_id] * n_soft, len(ids) + n_soft - 1


def collate_pairs(items: Sequence[object], tok: Tokenizer, n_image_tokens: int, n_soft: int,
                  max_len: int, n_long: int | None = None) -> dict[str, Tensor]:
    """VladVA batch from Scenes / Pairs (anything with .image .short_caption .long_caption) or (image, short,
    long).

    img_ids: [bos] <image>*n <soft_image>*K long_caption </s>   (labels on long caption + </s>)
    txt_ids: [bos] short_caption <soft_text>*K

    n_long: only the first n_long items keep their long caption (img_ids, img_labels, img_pos, images); the
    image rows of the others stop at their summary (head_ids: [bos] <image>*n <soft_image>*K, head_pos,
    head_images), the rows eval.py embeds images with. txt_ids covers every item, in order."""
    if not items:
        raise ValueError("collate_pairs: empty batch")
    img_rows, img_labs, img_pos, txt_rows, txt_pos, images = [], [], [], [], [], []
    for b, item in enumerate(items):
        image, short, long_ = _pair_fields(item)
        if not short.strip() or not long_.strip():
            raise ValueError(f"collate_pairs: item {b} has an empty caption")
        head, img_p = summary_row([tok.bos_id] + [tok.image_id] * n_image_tokens, tok.soft_image_id, n_soft)
        cap = tok.encode(long_) + [tok.eos_id]
        txt, txt_p = summary_row([tok.bos_id] + tok.encode(short), tok.soft_text_id, n_soft)
        for name, row in (("image", head + cap), ("text", txt)):
            if len(row) > max_len:
                raise ValueError(f"collate_pairs: item {b} {name} sequence has {len(row)} tokens > "
                                 f"max_len {max_len}")
        img_rows.append(head + cap)
        img_labs.append([-100] * len(head) + cap)
        img_pos.append(img_p)
        txt_rows.append(txt)
        txt_pos.append(txt_p)
        images.append(image)
    n = len(items) if n_long is None else n_long
    if not 0 < n <= len(items):
        raise ValueError(f"collate_pairs: n_long must be in 1..{len(items)} (the items), got {n_long}")
    out = {
        "img_ids": _pad(img_rows[:n], tok.pad_id), "img_labels": _pad(img_labs[:n], -100),
        "img_pos": torch.tensor(img_pos[:n], dtype=torch.long), "images": _stack_images(images[:n]),
        "txt_ids": _pad(txt_rows, tok.pad_id), "txt_pos": torch.tensor(txt_pos, dtype=torch.long),
    }
    if n < len(items):
        out.update(head_ids=_pad([row[:p + 1] for row, p in zip(img_rows[n:], img_pos[n:])], tok.pad_id),
                   head_pos=torch.tensor(img_pos[n:], dtype=torch.long), head_images=_stack_images(images[n:]))
    return out


def collate_caption_negatives(items: Sequence[object], tok: Tokenizer, n_soft: int) -> dict[str, Tensor]:
    """The text side of each pair's hard negative (train.py --pair-twins caption): its twin's short caption
    (twin_scene: the same words in another binding), as collate_pairs' txt rows. A pair without a twin gets
    its own caption as a placeholder row with neg_valid False, which the contrastive loss masks.

    neg_ids: [bos] twin_short_caption <soft_text>*K"""
    rows, pos, valid = [], [], []
    for item in items:
        twin = getattr(item, "twin", None)
        row, p = summary_row([tok.bos_id] + tok.encode((twin or item).short_caption), tok.soft_text_id, n_soft)
        rows.append(row)
        pos.append(p)
        valid.append(twin is not None)
    return {"neg_ids": _pad(rows, tok.pad_id), "neg_pos": torch.tensor(pos, dtype=torch.long),
            "neg_valid": torch.tensor(valid, dtype=torch.bool)}


def _pad(rows: list[list[int]], value: int) -> Tensor:
    T = max(len(r) for r in rows)
    out = torch.full((len(rows), T), value, dtype=torch.long)  # (B, T)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r)
    return out


# ------------------------------------------------------------------------------------------------------------
# World vocabulary
# ------------------------------------------------------------------------------------------------------------
SHAPES = ("square", "circle", "triangle", "cross")
COLOURS = {"red": (230, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 240), "yellow": (235, 215, 40),
           "purple": (160, 60, 210), "cyan": (40, 220, 220)}
SIZES = ("small", "large")
# a 3x3 grid: shapes ~14 px (large) / ~9 px (small) wide at train.py's 48x48, one 16-px patch per cell
GRID = 3
POSITIONS = {(0, 0): "top left", (0, 1): "top", (0, 2): "top right", (1, 0): "left", (1, 1): "center",
             (1, 2): "right", (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right"}
REL_WORDS = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBERS = ("zero", "one", "two", "three", "four")
CATEGORIES = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj", "add_obj", "add_att")
BACKGROUND = (16, 16, 16)
SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges keep shapes recognisable at 32x32
# a scene graph belongs to the test split iff crc32(graph) % 4 == 0 (content-disjoint splits)
TEST_FRACTION = 4
# RAG names: three consonant-vowel syllables; a hash of the whole name decides its split (name_split), so test
# names are new names made of known syllables.
NAME_CONSONANTS = "bdfgklmprtvz"
NAME_VOWELS = "aeiou"


# ------------------------------------------------------------------------------------------------------------
# Scene graphs
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    row: int
    col: int


@dataclass
class SceneGraph:
    objects: list[Obj]

    @property
    def relations(self) -> list[tuple[int, str, int]]:
        """Every (i, rel, j) that holds, rel in left/right/above/below (grid columns / rows differ)."""
        out = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i != j:
                    out += [(i, r, j) for r in _relations_between(a, b)]
        return out

    def find(self, colour: str, shape: str) -> Obj | None:
        for o in self.objects:
            if o.colour == colour and o.shape == shape:
                return o
        return None


def _relations_between(a: Obj, b: Obj) -> list[str]:
    rels = []
    if a.col != b.col:
        rels.append("left" if a.col < b.col else "right")
    if a.row != b.row:
        rels.append("above" if a.row < b.row else "below")
    return rels


def canonical(graph: SceneGraph) -> str:
    """A scene graph as a string, the same for the same objects in any order (split and matching key)."""
    return ";".join(sorted(f"{o.shape},{o.colour},{o.size},{o.row},{o.col}" for o in graph.objects))


def graph_split(graph: SceneGraph) -> str:
    """Content-based split: train and test scene graphs are disjoint sets, not just drawn from different
    seeds."""
    return "test" if zlib.crc32(canonical(graph).encode()) % TEST_FRACTION == 0 else "train"


def _random_graph(rng: random.Random, n_min: int = 1, n_max: int = 4) -> SceneGraph:
    k = rng.randint(n_min, n_max)
    shapes = rng.sample(SHAPES, k)
    colours = rng.sample(list(COLOURS), k)
    cells = rng.sample(sorted(POSITIONS), k)
    return SceneGraph([Obj(s, c, rng.choice(SIZES), r, q) for s, c, (r, q) in zip(shapes, colours, cells)])


# ------------------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------------------
def render(graph: SceneGraph, image_size: int = 32) -> Tensor:
    """Draw the scene: (3, H, W) float in [0, 1]."""
    big = image_size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = big / GRID
    for o in graph.objects:
        cx, cy = (o.col + 0.5) * cell, (o.row + 0.5) * cell
        r = cell * (0.45 if o.size == "large" else 0.28)
        fill = COLOURS[o.colour]
        if o.shape == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
        else:
            t = r * 0.38
            draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=fill)
            draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=fill)
    img = img.resize((image_size, image_size), Image.BOX)
    return pil_to_tensor(img)


def pil_to_tensor(img: Image.Image) -> Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W)


# ------------------------------------------------------------------------------------------------------------
# Captions: a tiny phrase grammar  NP [REL NP] {and NP};  NP = "a" [size] colour shape
# ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NP:
    colour: str
    shape: str
    size: str | None = None

    def text(self) -> str:
        return " ".join(w for w in ("a", self.size, self.colour, self.shape) if w)


@dataclass(frozen=True)
class Phrase:
    first: NP
    rel: str | None = None
    second: NP | None = None
    extra: tuple[NP, ...] = ()

    def text(self) -> str:
        out = self.first.text()
        if self.rel is not None and self.second is not None:
            out += f" {REL_WORDS[self.rel]} {self.second.text()}"
        for np_ in self.extra:
            out += f" and {np_.text()}"
        return out


def _short_phrase(graph: SceneGraph, rng: random.Random) -> Phrase:
    objs = graph.objects
    if len(objs) == 1:
        return Phrase(NP(objs[0].colour, objs[0].shape))
    i, j = rng.sample(range(len(objs)), 2)
    rel = rng.choice(_relations_between(objs[i], objs[j]))
    return Phrase(NP(objs[i].colour, objs[i].shape), rel, NP(objs[j].colour, objs[j].shape))


def _long_caption(graph: SceneGraph) -> str:
    n = len(graph.objects)
    parts = [f"there is {NUMBERS[n]} shape." if n == 1 else f"there are {NUMBERS[n]} shapes."]
    for o in graph.objects:
        parts.append(f"a {o.size} {o.colour} {o.shape} at the {POSITIONS[(o.row, o.col)]}.")
    for i, a in enumerate(graph.objects):
        for b in graph.objects[i + 1:]:
            for rel in _relations_between(a, b):
                parts.append(f"the {a.colour} {a.shape} is {REL_WORDS[rel]} the {b.colour} {b.shape}.")
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------------------
# SugarCrepe-style hard negatives. Every negative is false because (colour, shape) pairs are unique in a
# scene: a changed colour/shape/size names an object that does not exist, an opposite relation cannot hold.
# Categories that a scene cannot support (relations/swaps need 2 objects) are left out of its dict.
# ------------------------------------------------------------------------------------------------------------
def _absent_np(graph: SceneGraph, rng: random.Random) -> NP:
    present = {(o.colour, o.shape) for o in graph.objects}
    options = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    c, s = rng.choice(options)
    return NP(c, s)


def _replace_np(phrase: Phrase, which: int, new: NP) -> Phrase:
    if which == 0:
        return Phrase(new, phrase.rel, phrase.second, phrase.extra)
    return Phrase(phrase.first, phrase.rel, new, phrase.extra)


def make_negatives(graph: SceneGraph, phrase: Phrase, rng: random.Random) -> dict[str, Phrase]:
    nps = [phrase.first] + ([phrase.second] if phrase.second is not None else [])
    which = rng.randrange(len(nps))
    target = nps[which]
    obj = graph.find(target.colour, target.shape)
    assert obj is not None, "positive phrase must name scene objects"
    out: dict[str, Phrase] = {}
    colours = [c for c in COLOURS if graph.find(c, target.shape) is None]
    out["replace_att"] = _replace_np(phrase, which, NP(rng.choice(colours), target.shape, target.size))
    shapes = [s for s in SHAPES if graph.find(target.colour, s) is None]
    out["replace_obj"] = _replace_np(phrase, which, NP(target.colour, rng.choice(shapes), target.size))
    if phrase.second is not None and phrase.rel is not None:
        a, b = phrase.first, phrase.second
        out["replace_rel"] = Phrase(a, OPPOSITE[phrase.rel], b, phrase.extra)
        out["swap_att"] = Phrase(NP(b.colour, a.shape, a.size), phrase.rel, NP(a.colour, b.shape, b.size))
        out["swap_obj"] = Phrase(NP(a.colour, b.shape, a.size), phrase.rel, NP(b.colour, a.shape, b.size))
    out["add_obj"] = Phrase(phrase.first, phrase.rel, phrase.second, phrase.extra + (_absent_np(graph, rng),))
    wrong_size = "small" if obj.size == "large" else "large"
    out["add_att"] = _replace_np(phrase, which, NP(target.colour, target.shape, wrong_size))
    return out


# ------------------------------------------------------------------------------------------------------------
# VQA and POPE
# ------------------------------------------------------------------------------------------------------------
def format_question(question: str) -> str:
    """The prompt text segment put before a single-word answer (train and eval must agree on it)."""
    return f"question: {question} answer:"


def _vqa(graph: SceneGraph, rng: random.Random) -> list[tuple[str, str]]:
    objs = graph.objects
    qa = [("how many shapes are there?", NUMBERS[len(objs)])]
    for o in objs:
        qa.append((f"what colour is the {o.shape}?", o.colour))
        qa.append((f"what shape is the {o.colour} object?", o.shape))
        qa.append((f"what size is the {o.colour} {o.shape}?", o.size))
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            rel = rng.choice(_relations_between(first, second))
            pair = "left or right of" if rel in ("left", "right") else "above or below"
            q = f"is the {first.colour} {first.shape} {pair} the {second.colour} {second.shape}?"
            qa.append((q, rel))
    return qa


def _pope(graph: SceneGraph, rng: random.Random) -> list[tuple[str, str]]:
    """POPE-style object existence: one "yes" per object, as many "no" about absent (colour, shape)
    objects."""
    present = [(o.colour, o.shape) for o in graph.objects]
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    qs = [(f"is there a {c} {s} in the image?", "yes") for c, s in present]
    qs += [(f"is there a {c} {s} in the image?", "no") for c, s in rng.sample(absent, len(present))]
    rng.shuffle(qs)
    return qs


# ------------------------------------------------------------------------------------------------------------
# Teacher features. For the built-in world an EXACT featuriser of the ground-truth scene graph stands in for
# the frozen encoders of the papers (DINOv2 for uni-modal image, BGE for uni-modal text, CLIP for
# cross-modal): each feature is a sum of fixed random Gaussian vectors, one per discrete fact ("red square",
# "square at top left", "red square left of blue circle"...), then L2-normalised. A random projection
# preserves the overlap of the fact sets, so scenes/sentences sharing facts get similar vectors; image and
# text share one cross-modal fact space, so a long caption (which states every fact) has exactly its image's
# cross-modal vector.
# ------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _fact_vec(space: str, fact: str, dim: int) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(f"{space}|{fact}".encode()))
    return rng.standard_normal(dim)


def featurise(space: str, facts: Sequence[str], dim: int) -> Tensor:
    """Unit vector (dim,) of a multiset of facts; sorted so equal multisets give bit-identical vectors."""
    if not facts:
        raise ValueError(f"featurise: no facts for space {space!r}")
    v = np.zeros(dim)
    for f in sorted(facts):
        v += _fact_vec(space, f, dim)
    return torch.tensor(v / np.linalg.norm(v), dtype=torch.float32)


def _obj_facts(colour: str, shape: str, size: str | None) -> list[str]:
    facts = [f"cs:{colour}:{shape}", f"c:{colour}", f"s:{shape}"]
    return facts + ([f"z:{size}:{colour}:{shape}"] if size else [])


def _rel_fact(a: NP | Obj, rel: str, b: NP | Obj) -> str:
    # canonical direction: "a left of b" and "b right of a" are the same fact
    if rel in ("right", "below"):
        a, b, rel = b, a, OPPOSITE[rel]
    return f"r:{a.colour}:{a.shape}:{rel}:{b.colour}:{b.shape}"


def cross_facts_graph(graph: SceneGraph) -> list[str]:
    facts = [f"n:{len(graph.objects)}"]
    for o in graph.objects:
        facts += _obj_facts(o.colour, o.shape, o.size) + [f"p:{o.row}{o.col}:{o.colour}:{o.shape}"]
    for i, a in enumerate(graph.objects):
        for b in graph.objects[i + 1:]:
            facts += [_rel_fact(a, r, b) for r in _relations_between(a, b)]
    return facts


def cross_facts_phrase(phrase: Phrase) -> list[str]:
    facts = []
    for np_ in (phrase.first, phrase.second, *phrase.extra):
        if np_ is not None:
            facts += _obj_facts(np_.colour, np_.shape, np_.size)
    if phrase.rel is not None and phrase.second is not None:
        facts.append(_rel_fact(phrase.first, phrase.rel, phrase.second))
    return facts


def uni_facts_graph(graph: SceneGraph) -> list[str]:
    # a layout-aware visual descriptor (DINOv2 stand-in): what is drawn where
    facts = []
    for o in graph.objects:
        cell = f"{o.row}{o.col}"
        facts += [f"c:{o.colour}", f"s:{o.shape}", f"z:{o.size}", f"cs:{o.colour}:{o.shape}",
                  f"at:{cell}:{o.colour}", f"at:{cell}:{o.shape}", f"at:{cell}:{o.size}"]
    return facts


def uni_facts_text(text: str) -> list[str]:
    # a lexical sentence descriptor (BGE stand-in): words and word bigrams
    words = text.replace(".", " ").replace("?", " ").split()
    return [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]


def uni_image_features(graph: SceneGraph) -> Tensor:
    return featurise("uni_image", uni_facts_graph(graph), UNI_DIM)


def uni_text_features(text: str) -> Tensor:
    return featurise("uni_text", uni_facts_text(text), UNI_DIM)


def cross_features(facts: Sequence[str]) -> Tensor:
    return featurise("cross", facts, CROSS_DIM)


# ------------------------------------------------------------------------------------------------------------
# World objects
# ------------------------------------------------------------------------------------------------------------
@dataclass
class Scene:
    image: Tensor                      # (3, H, W) in [0, 1]
    graph: SceneGraph
    short_caption: str
    long_caption: str
    vqa: list[tuple[str, str]]
    pope: list[tuple[str, str]]
    negatives: dict[str, str]          # only the categories this scene supports (see make_negatives)
    uni_image: Tensor                  # (UNI_DIM,)
    cross_image: Tensor                # (CROSS_DIM,)
    uni_short: Tensor
    cross_short: Tensor
    uni_long: Tensor
    cross_long: Tensor                 # == cross_image: the long caption states every fact of the scene
    phrase: Phrase                     # the structure behind short_caption
    negative_phrases: dict[str, Phrase]
    twin: "Scene | None" = None        # a hard-negative partner (twin_scene, train.py --pair-twins swap)


@dataclass
class Frame:
    image: Tensor
    sentence: str
    graph: SceneGraph
    uni_image: Tensor
    cross_image: Tensor
    uni_text: Tensor
    cross_text: Tensor

    def __iter__(self) -> Iterator:
        return iter((self.image, self.sentence))


@dataclass
class Story:
    frames: list[Frame]

    def __iter__(self) -> Iterator[Frame]:
        return iter(self.frames)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, i: int) -> Frame:
        return self.frames[i]


@dataclass
class WinoPair:
    image_a: Tensor
    caption_a: str
    image_b: Tensor
    caption_b: str
    graph_a: SceneGraph
    graph_b: SceneGraph
    # "swap_obj" (the two objects trade places) | "swap_att" (trade colours)
    kind: str
    phrase_a: Phrase                   # the structures behind caption_a / caption_b (their teacher features)
    phrase_b: Phrase

    def __iter__(self) -> Iterator:
        return iter((self.image_a, self.caption_a, self.image_b, self.caption_b))


@dataclass
class KBEntry:
    name: str
    description: str
    image: Tensor
    obj: Obj

    def __iter__(self) -> Iterator:
        return iter((self.name, self.description, self.image))


@dataclass
class KB:
    entries: list[KBEntry]
    questions: list[tuple[str, str]]   # (prompt, answer_name)


@dataclass
class World:
    split: str
    seed: int
    image_size: int
    scenes: list[Scene]
    stories: list[Story]
    winoground: list[WinoPair]
    kb: KB
    uni_dim: int = UNI_DIM
    cross_dim: int = CROSS_DIM


def _make_scene(graph: SceneGraph, rng: random.Random, image_size: int, phrase: Phrase | None = None) -> Scene:
    phrase = _short_phrase(graph, rng) if phrase is None else phrase
    neg = make_negatives(graph, phrase, rng)
    short, long_ = phrase.text(), _long_caption(graph)
    return Scene(
        image=render(graph, image_size), graph=graph, short_caption=short, long_caption=long_,
        vqa=_vqa(graph, rng), pope=_pope(graph, rng), negatives={k: p.text() for k, p in neg.items()},
        uni_image=uni_image_features(graph), cross_image=cross_features(cross_facts_graph(graph)),
        uni_short=uni_text_features(short), cross_short=cross_features(cross_facts_phrase(phrase)),
        uni_long=uni_text_features(long_), cross_long=cross_features(cross_facts_graph(graph)),
        phrase=phrase, negative_phrases=neg)


def twin_scene(scene: Scene, kind: str, image_size: int) -> Scene | None:
    """The scene's Winoground-style twin, a hard negative for the contrastive loss (train.py --pair-twins swap;
    measured, not the default): the two objects its short caption names trade places (kind "swap_obj") or
    colours ("swap_att"), and the twin's caption says so with the same words in another binding ("a red square
    above a blue circle" -> "a blue circle above a red square" / "a blue square above a red circle"). Each
    caption is false of the other's image: swapped places reverse the relation on every axis, swapped colours
    name a (colour, shape) the other scene lacks. The other objects stay. None when the caption names one
    object, or when the twin's graph belongs to the test split (the splits stay content-disjoint). Our choice
    (neither paper; NegCLIP, Yuksekgonul et al. ICLR 2023, adds swapped captions as negatives; here the twin's
    image comes with it, so the pair is a negative both ways)."""
    if kind not in ("swap_obj", "swap_att"):
        raise ValueError(f"twin_scene: kind must be 'swap_obj' or 'swap_att', got {kind!r}")
    p = scene.phrase
    if p.rel is None or p.second is None:
        return None
    a, b = scene.graph.find(p.first.colour, p.first.shape), scene.graph.find(p.second.colour, p.second.shape)
    assert a is not None and b is not None, "a short caption names objects of its scene"
    if kind == "swap_obj":
        new_a, new_b = replace(a, row=b.row, col=b.col), replace(b, row=a.row, col=a.col)
        phrase = Phrase(NP(b.colour, b.shape), p.rel, NP(a.colour, a.shape))
    else:
        new_a, new_b = replace(a, colour=b.colour), replace(b, colour=a.colour)
        phrase = Phrase(NP(b.colour, a.shape), p.rel, NP(a.colour, b.shape))
    graph = SceneGraph([new_a if o is a else new_b if o is b else o for o in scene.graph.objects])
    if graph_split(graph) != "train":
        return None
    return _make_scene(graph, random.Random(f"twin:{canonical(graph)}"), image_size, phrase)


def _scene_for_split(split: str, rng: random.Random, n_min: int = 1, n_max: int = 4) -> SceneGraph:
    while True:
        graph = _random_graph(rng, n_min, n_max)
        if graph_split(graph) == split:
            return graph


def _frame(graph: SceneGraph, sentence: str, facts: list[str], image_size: int) -> Frame:
    return Frame(render(graph, image_size), sentence, graph, uni_image_features(graph),
                 cross_features(cross_facts_graph(graph)), uni_text_features(sentence), cross_features(facts))


def _story_step(graph: SceneGraph, rng: random.Random) -> tuple[SceneGraph, str, list[str]]:
    """One event: an object appears, moves, or changes colour. Returns the new graph, its sentence and its
    facts."""
    objs = list(graph.objects)
    free = [p for p in sorted(POSITIONS) if all((o.row, o.col) != p for o in objs)]
    used_c, used_s = {o.colour for o in objs}, {o.shape for o in objs}
    events = ["move", "recolour"] + (["add"] if len(objs) < len(SHAPES) else [])
    event = rng.choice(events)
    if event == "add":
        s = rng.choice([x for x in SHAPES if x not in used_s])
        c = rng.choice([x for x in COLOURS if x not in used_c])
        r, q = rng.choice(free)
        new = Obj(s, c, rng.choice(SIZES), r, q)
        return (SceneGraph(objs + [new]), f"a {new.size} {c} {s} appears at the {POSITIONS[(r, q)]}.",
                _obj_facts(c, s, new.size) + [f"p:{r}{q}:{c}:{s}"])
    k = rng.randrange(len(objs))
    o = objs[k]
    if event == "move":
        r, q = rng.choice(free)
        objs[k] = Obj(o.shape, o.colour, o.size, r, q)
        return (SceneGraph(objs), f"the {o.colour} {o.shape} moves to the {POSITIONS[(r, q)]}.",
                _obj_facts(o.colour, o.shape, None) + [f"p:{r}{q}:{o.colour}:{o.shape}"])
    c = rng.choice([x for x in COLOURS if x not in used_c])
    objs[k] = Obj(o.shape, c, o.size, o.row, o.col)
    return SceneGraph(objs), f"the {o.colour} {o.shape} turns {c}.", _obj_facts(c, o.shape, None)


STORY_TRIES = 200  # events drawn for one story step before the story starts over (_make_story)


def _make_story(rng: random.Random, n_frames: int, image_size: int, split: str) -> Story:
    """Every frame's graph belongs to `split`, as every scene's does (a training story never shows a test
    scene): each event is redrawn until its new graph is in the split, and in the rare dead end (no such
    event in STORY_TRIES draws) the story starts over."""
    while True:
        graph = _scene_for_split(split, rng, 1, 2)
        first = " and ".join(f"a {o.size} {o.colour} {o.shape} at the {POSITIONS[(o.row, o.col)]}"
                             for o in graph.objects)
        frames = [_frame(graph, f"there is {first}.", cross_facts_graph(graph), image_size)]
        while len(frames) < n_frames:
            for _ in range(STORY_TRIES):
                new, sentence, facts = _story_step(graph, rng)
                if graph_split(new) == split:
                    break
            else:
                break
            graph = new
            frames.append(_frame(graph, sentence, facts, image_size))
        if len(frames) == n_frames:
            return Story(frames)


def _make_wino(rng: random.Random, image_size: int, kind: str, split: str) -> WinoPair:
    """Both images' graphs belong to `split` (redrawn until they do), so a test pair is never a training
    scene."""
    while True:
        ga = _random_graph(rng, 2, 2)
        a, b = ga.objects
        if kind == "swap_obj":  # the objects trade places; caption B names them in swapped order
            gb = SceneGraph([Obj(a.shape, a.colour, a.size, b.row, b.col),
                             Obj(b.shape, b.colour, b.size, a.row, a.col)])
            nps_b = NP(b.colour, b.shape), NP(a.colour, a.shape)
        else:  # the objects trade colours; caption B has the colour words swapped
            gb = SceneGraph([Obj(a.shape, b.colour, a.size, a.row, a.col),
                             Obj(b.shape, a.colour, b.size, b.row, b.col)])
            nps_b = NP(b.colour, a.shape), NP(a.colour, b.shape)
        if graph_split(ga) == split and graph_split(gb) == split:
            break
    rel = rng.choice(_relations_between(a, b))
    phrase_a = Phrase(NP(a.colour, a.shape), rel, NP(b.colour, b.shape))
    phrase_b = Phrase(nps_b[0], rel, nps_b[1])
    return WinoPair(render(ga, image_size), phrase_a.text(), render(gb, image_size), phrase_b.text(), ga, gb,
                    kind, phrase_a, phrase_b)


def name_split(name: str) -> str:
    """The split a made-up name belongs to: test iff crc32(name) % TEST_FRACTION == 0. Both splits draw names
    from the same syllables (so the tokens of a test name are known, and copying it from a retrieved
    description is learnable), but no test name is ever a training name, so only retrieval can answer a test
    question."""
    return "test" if zlib.crc32(name.encode()) % TEST_FRACTION == 0 else "train"


def make_name(rng: random.Random, split: str) -> str:
    while True:
        name = "".join(rng.choice(NAME_CONSONANTS) + rng.choice(NAME_VOWELS) for _ in range(3))
        if name_split(name) == split:
            return name


def _make_kb(rng: random.Random, split: str, n: int, image_size: int) -> KB:
    types = [(s, c, z) for s in SHAPES for c in COLOURS for z in SIZES]
    chosen = rng.sample(types, min(n, len(types)))
    names: set[str] = set()
    entries, questions = [], []
    for s, c, z in chosen:
        name = make_name(rng, split)
        while name in names:
            name = make_name(rng, split)
        names.add(name)
        obj = Obj(s, c, z, 1, 1)
        # the name follows a space, as in the answer " name": BPE gives both the same tokens, so answering is
        # copying them (a name opening the description is split differently, without the leading space)
        entries.append(KBEntry(name, f"the {z} {c} {s} is called {name}.",
                               render(SceneGraph([obj]), image_size), obj))
        questions.append((f"what is the name of the {z} {c} {s}?", name))
    return KB(entries, questions)


def make_world(split: str, n: int, seed: int, image_size: int = 32, n_stories: int | None = None,
               n_winoground: int | None = None, n_kb: int | None = None, story_len: int = 4) -> World:
    """The built-in world: n scenes (+ n//4 stories, n//4 Winoground pairs, a KB of min(48, max(4, n//4))
    names).

    Deterministic per (split, seed); every random stream is seeded with a string naming the split, so train
    and test never share a seed, and every graph drawn (scenes, story frames, Winoground images) is also
    content-disjoint (graph_split). The KB entry images are the exception by design: every KB, train or test,
    shows the same 48 objects (only the names differ; see kb_pairs)."""
    if split not in ("train", "test"):
        raise ValueError(f"make_world: split must be 'train' or 'test', got {split!r}")
    if n < 1 or image_size < GRID * 4:
        raise ValueError(f"make_world: need n >= 1 and image_size >= {GRID * 4}, got n={n}, "
                         f"image_size={image_size}")
    n_stories = max(1, n // 4) if n_stories is None else n_stories
    n_winoground = max(1, n // 4) if n_winoground is None else n_winoground
    n_kb = min(48, max(4, n // 4)) if n_kb is None else n_kb
    scenes = []
    for i in range(n):
        rng = random.Random(f"scene:{split}:{seed}:{i}")
        scenes.append(_make_scene(_scene_for_split(split, rng), rng, image_size))
    stories = [_make_story(random.Random(f"story:{split}:{seed}:{i}"), story_len, image_size, split)
               for i in range(n_stories)]
    wino = [_make_wino(random.Random(f"wino:{split}:{seed}:{i}"), image_size, ("swap_obj", "swap_att")[i % 2],
                       split) for i in range(n_winoground)]
    kb = _make_kb(random.Random(f"kb:{split}:{seed}"), split, n_kb, image_size)
    return World(split, seed, image_size, scenes, stories, wino, kb)


def world_texts(world: World) -> list[str]:
    """Every text the world can put in a sample (for tokenizer training and leakage tests)."""
    out: list[str] = []
    for s in world.scenes:
        out += [s.short_caption, s.long_caption, *s.negatives.values()]
        out += [f"{format_question(q)} {a}"  # as collate joins the two segments
                for q, a in s.vqa + s.pope + where_questions(s.graph)]
    for st in world.stories:
        out += [f.sentence for f in st.frames]
    for w in world.winoground:
        out += [w.caption_a, w.caption_b]
    out += [e.description for e in world.kb.entries]
    out += [f"{format_question(q)} {a}" for q, a in world.kb.questions]
    return out + [IMAGE_PROMPT, TEXT_PROMPT]


# ------------------------------------------------------------------------------------------------------------
# Sample builders for the built-in world
# ------------------------------------------------------------------------------------------------------------
def turn_objects(graph: SceneGraph, question: str, answer: str) -> frozenset[int]:
    """The scene objects a (question, answer) turn names: those whose colour or shape word occurs in
    either."""
    words = set(f"{question} {answer}".replace("?", " ").split())
    return frozenset(i for i, o in enumerate(graph.objects) if o.colour in words or o.shape in words)


def conversations(graph: SceneGraph, qa: Sequence[tuple[str, str]], rng: random.Random,
                  max_turns: int) -> list[list[tuple[str, str]]]:
    """Pack (question, answer) turns into conversations of <= max_turns in which no two turns name the same
    object.

    Why: a turn gives away what it names. After "what colour is the square? red", the turn "what shape is the
    red object?" is answered by copying "square" from the context, and "is there a red square in the image?"
    by seeing it named: the image is never needed, so the model never learns to read shape from it (and learns
    that an object not yet named is absent, i.e. POPE always "no"). Evaluation asks one question at a time, so
    every training turn must be answerable from the image and its own question only. Our choice; LLaVA's
    multi-turn data has the same hazard, hidden by the variety of real conversations."""
    turns = list(qa)
    rng.shuffle(turns)
    packed: list[tuple[set[int], list[tuple[str, str]]]] = []
    for q, a in turns:
        named = turn_objects(graph, q, a)
        for used, conv in packed:
            if len(conv) < max_turns and not used & named:
                used |= named
                conv.append((q, a))
                break
        else:
            packed.append((set(named), [(q, a)]))
    return [conv for _, conv in packed]


def pretrain_samples(world: World, max_turns: int = 4) -> list[Sample]:
    """LLaVA-style: per scene one caption sample [image, short caption] and conversations of <= max_turns
    (question, single-word answer) turns covering all VQA and POPE pairs, packed so that no turn can be
    answered from an earlier one (`conversations`); loss on captions and answers only."""
    out = []
    for i, s in enumerate(world.scenes):
        img = image_seg(s.image, s.uni_image, s.cross_image)
        out.append(Sample([img, text_seg(s.short_caption, True, s.uni_short, s.cross_short)]))
        rng = random.Random(f"conversations:{world.split}:{world.seed}:{i}")
        for conv in conversations(s.graph, s.vqa + s.pope, rng, max_turns):
            segs = [image_seg(s.image, s.uni_image, s.cross_image)]
            for q, a in conv:
                segs += [text_seg(format_question(q), False), text_seg(a, True)]
            out.append(Sample(segs))
    return out


def lookup_samples(world: World) -> list[Sample]:
    """[image] question answer, one question per sample, for the two questions that read one attribute of
    the object another attribute names: "what colour is the <shape>?" and "what shape is the <colour>
    object?". train.py opens pre-training with them (`--lookup-steps`): in the full mix, the long captions
    always name the colour before the shape, so they teach the second lookup and never the first, and the
    first is often not learned at all (README, "A model that sees", item 7). Our choice."""
    return [Sample([image_seg(s.image, s.uni_image, s.cross_image), text_seg(format_question(q), False),
                    text_seg(a, True)])
            for s in world.scenes for q, a in s.vqa if q.startswith(("what colour is", "what shape is"))]


def where_questions(graph: SceneGraph) -> list[tuple[str, str]]:
    """For each object, "which row is the <colour> <shape> in?" (top / center / bottom) and "which column is
    the <colour> <shape> in?" (left / center / right): training questions (`where_samples`), not among the VQA
    questions eval.py scores. One question per axis, so that each axis is a one-word answer of its own: asked
    "where is the red square?" instead (answer "top left", the row's word first in six cells of nine), the
    model learned the vertical relations (above / below 0.97) and left / right stayed at chance (0.46-0.59; README,
    "A model that sees", item 11). Our choice."""
    rows, cols = ("top", "center", "bottom"), ("left", "center", "right")
    return [qa for o in graph.objects for qa in ((f"which row is the {o.colour} {o.shape} in?", rows[o.row]),
                                                 (f"which column is the {o.colour} {o.shape} in?", cols[o.col]))]


def where_samples(world: World) -> list[Sample]:
    """[image] question answer, one question per sample: the two `where_questions` of each object, the scene's
    relation questions ("is the red square left or right of the blue circle?") twice and its size questions
    ("what size is the red square?") once. train.py's opening adds them to `lookup_samples` in its second part
    (`--where-steps`). A relation needs both objects' cells, and the LLM learns to compare two cells only once
    it reads one: asked the relations alone it does not within 3,000 steps; the relations twice over raise
    their share of the part to about a third and were learned sooner (README, "A model that sees", items 10
    and 11). The size lookup is of the colour lookup's kind, but left to the full mix it was not learned at
    two pre-training seeds of four; asked here, it is at all four, and once keeps the relations' share (twice
    lost the relation at one seed; README, "Size questions in the opening"). Our choice."""
    out = []
    for s in world.scenes:
        relations = [(q, a) for q, a in s.vqa if q.startswith("is the ")]
        sizes = [(q, a) for q, a in s.vqa if q.startswith("what size is ")]
        out += [Sample([image_seg(s.image, s.uni_image, s.cross_image), text_seg(format_question(q), False),
                        text_seg(a, True)]) for q, a in where_questions(s.graph) + relations * 2 + sizes]
    return out


def kb_pairs(kb: KB, image_size: int) -> list[Scene]:
    """Retrieval pairs for fine-tuning's contrastive and structure losses: each knowledge-base entry's image
    (one object at the centre) with its name question as the short caption ("what is the name of the small
    red triangle?", the query eval.py retrieves with) and the entry's scene caption as the long one. Without
    them the contrastive loss only ever sees scene captions, which never state a size, and the questions find
    their entry 2% of the time (README). The questions and images hold no name, so they are the same in every
    knowledge base; test names stay unseen. Our choice."""
    rng = random.Random(f"kb_pairs:{image_size}")
    out = []
    for e, (question, _) in zip(kb.entries, kb.questions):
        scene = _make_scene(SceneGraph([e.obj]), rng, image_size)
        out.append(replace(scene, short_caption=question, uni_short=uni_text_features(question),
                           cross_short=cross_features(_obj_facts(e.obj.colour, e.obj.shape, e.obj.size)),
                           phrase=Phrase(NP(e.obj.colour, e.obj.shape, e.obj.size))))
    return out


def story_samples(world: World) -> list[Sample]:
    """Sugar interleaved samples: image_0 sentence_0 image_1 sentence_1 ...; every segment ends a prefix; loss
    on the sentences."""
    out = []
    for st in world.stories:
        segs = []
        for f in st.frames:
            segs += [image_seg(f.image, f.uni_image, f.cross_image), text_seg(f.sentence, True, f.uni_text,
                                                                               f.cross_text)]
        out.append(Sample(segs, list(range(len(segs)))))
    return out


def rag_samples(world: World) -> list[Sample]:
    """Retrieval-augmented generation with the right KB description in context (oracle retrieval for
    training)."""
    out = []
    for e, (q, name) in zip(world.kb.entries, world.kb.questions):
        out.append(Sample([text_seg(e.description, False), text_seg(format_question(q), False),
                           text_seg(name, True)]))
    return out


# ------------------------------------------------------------------------------------------------------------
# Readers for user data, with a validator that collects every problem
# ------------------------------------------------------------------------------------------------------------
KARPATHY_SPLITS = ("train", "val", "test", "all")  # "train" takes restval too (Karpathy's extra train images)


@dataclass
class Problem:
    index: int | str
    field: str
    expected: str

    def __str__(self) -> str:
        return f"record {self.index}: field {self.field!r}: {self.expected}"


class DataError(ValueError):
    """A data file has problems; `.problems` lists all of them."""

    def __init__(self, path: str | Path, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(f"{path}: {len(problems)} problem(s){numbering(path)}:\n  {lines}")


def numbering(path: str | Path) -> str:
    """How a file's records are numbered in its problems: a .jsonl file's by line from 1 (jsonl_records), the
    others by position from 0."""
    return " (records numbered by line)" if Path(path).suffix == ".jsonl" else ""


@dataclass
class Pair:
    image: Tensor
    short_caption: str
    long_caption: str
    captions: list[str]
    split: str = ""


@dataclass
class NegativeItem:
    image: Tensor
    positive: str
    negative: str
    category: str


@dataclass
class Question:
    """A question with one reference answer, for eval.py: `prompt` is everything the model sees before
    answering (a LLaVA conversation up to a supervised turn; a POPE image + question); kind: "vqa" |
    "pope"."""
    prompt: Sample
    answer: str
    kind: str
    type: str | None = None  # the record's question type, where the file gives one (vqa/<type>)


@dataclass
class WinoItem:
    """A Winoground example: caption_k describes image_k; the captions hold the same words, reordered."""
    image_0: Tensor
    image_1: Tensor
    caption_0: str
    caption_1: str


@dataclass
class LoadedData:
    format: str                      # llava | karpathy | mmc4 | sugarcrepe | pope | winoground | features
    samples: list[Sample] = field(default_factory=list)       # for collate (NTP / Sugar)
    pairs: list[Pair] = field(default_factory=list)           # for collate_pairs (VladVA); Karpathy only
    negatives: list[NegativeItem] = field(default_factory=list)  # SugarCrepe-style evaluation items
    # LLaVA turns and POPE lines (eval.py: vqa/, pope/)
    questions: list[Question] = field(default_factory=list)
    winoground: list[WinoItem] = field(default_factory=list)  # eval.py: winoground/; never trained on
    features: "Features | None" = None
    sample_records: list[int | str] = field(default_factory=list)  # file record of each sample (for messages)
    pair_records: list[int | str] = field(default_factory=list)

    def add_sample(self, record: int | str, sample: Sample) -> None:
        self.samples.append(sample)
        self.sample_records.append(record)


def load_image(path: Path, image_size: int) -> Tensor:
    """(3, image_size, image_size) in [0, 1]; ValueError saying missing / unreadable / corrupt / too large."""
    if not path.exists():
        raise ValueError(f"missing image file {path}")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = _to_rgb(im)
    except Image.DecompressionBombError as e:
        raise ValueError(f"image {path} is too large to decode safely ({e})") from e
    except UnidentifiedImageError as e:
        raise ValueError(f"corrupt image {path} (not a decodable image): {e}") from e
    except (OSError, SyntaxError) as e:
        if isinstance(e, (PermissionError, IsADirectoryError)):
            raise ValueError(f"unreadable image {path}: {e}") from e
        raise ValueError(f"corrupt image {path}: {e}") from e
    return pil_to_tensor(rgb.resize((image_size, image_size), Image.BICUBIC)).clamp(0, 1)


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. Pillow opens 16-bit greyscale PNGs in the integer modes "I;16*" / "I", whose convert("RGB")
    clips every value above 255 to white: those are scaled from 0..65535 to 0..255 first."""
    if im.mode.startswith("I"):
        grey = np.asarray(im, dtype=np.float64) / 257.0  # (H, W) 65535 -> 255
        im = Image.fromarray(np.clip(grey, 0, 255).round().astype(np.uint8), "L")
    return im.convert("RGB")


class _Ctx:
    """Shared state of one read: where images live, the problem list, and an image cache."""

    def __init__(self, path: Path, image_root: Path | None, image_size: int) -> None:
        self.path, self.root, self.image_size = path, image_root or path.parent, image_size
        self.problems: list[Problem] = []
        self.seen: set[tuple[str, str, str]] = set()
        self.cache: dict[str, Tensor] = {}

    def bad(self, index: int | str, fld: str, expected: str) -> None:
        """Record a problem once (a record that is not an object fails every field lookup the same way)."""
        key = (str(index), fld, expected)
        if key not in self.seen:
            self.seen.add(key)
            self.problems.append(Problem(index, fld, expected))

    def image(self, index: int | str, fld: str, rel: object) -> Tensor | None:
        if not isinstance(rel, str) or not rel:
            self.bad(index, fld, f"a non-empty image path string, got {_json_type(rel)}")
            return None
        if rel not in self.cache:
            try:
                self.cache[rel] = load_image(self.root / rel, self.image_size)
            except ValueError as e:
                self.bad(index, fld, str(e))
                return None
        return self.cache[rel]

    def text(self, index: int | str, fld: str, value: object) -> str | None:
        if not isinstance(value, str):
            self.bad(index, fld, f"a string, got {_json_type(value)}")
            return None
        if not value.strip():
            self.bad(index, fld, "non-empty text")
            return None
        for s in SPECIALS:
            if s != IMAGE_TOKEN and s in value:
                self.bad(index, fld, f"text without the reserved token {s}")
                return None
        return value


JSON_TYPES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "boolean",
              type(None): "null"}


def _json_type(value: object) -> str:
    """A value's type as the JSON file spells it (null, not NoneType)."""
    return JSON_TYPES.get(type(value), type(value).__name__)


def _need(ctx: _Ctx, rec: object, index: int | str, key: str, typ: type) -> object | None:
    if not isinstance(rec, dict):
        ctx.bad(index, "<record>", f"a JSON object, got {_json_type(rec)}")
        return None
    if key not in rec:
        ctx.bad(index, key, f"a required field {key!r} (missing)")
        return None
    value = rec[key]
    if not isinstance(value, typ) or typ is int and isinstance(value, bool):  # JSON true is not an index
        ctx.bad(index, key, f"type {JSON_TYPES[typ]}, got {_json_type(value)}")
        return None
    return value


def _split_image_text(text: str) -> list[str | None]:
    """'<image>\\nWhat is it?' -> [None, 'What is it?'] (None marks an image slot); whitespace-only pieces
    dropped."""
    out: list[str | None] = []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k > 0:
            out.append(None)
        if piece.strip():
            out.append(piece.strip())
    return out


def read_llava(ctx: _Ctx, records: object) -> LoadedData:
    """LLaVA conversation JSON: [{"id", "image": path | [paths] (optional), "type": str (optional),
    "conversations": [{"from": "human"|"gpt", "value": str}, ...]}]; <image> placeholders in human turns mark
    where images go, in order. Every supervised (gpt) turn is also a Question: the conversation before it, its
    text the answer."""
    data = LoadedData("llava")
    if not isinstance(records, list):
        ctx.bad("<file>", "<root>", "a JSON list of conversation records")
        return data
    for i, rec in enumerate(records):
        conv = _need(ctx, rec, i, "conversations", list)
        if conv is None:
            continue
        paths = rec.get("image", [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list):
            ctx.bad(i, "image", f"a path string or a list of paths, got {_json_type(paths)}")
            continue
        imgs = [ctx.image(i, f"image[{k}]", p) for k, p in enumerate(paths)]
        segs: list[Segment] = []
        n_slots, ok = 0, True
        for t, turn in enumerate(conv):
            who = _need(ctx, turn, f"{i}.conversations[{t}]", "from", str)
            val = _need(ctx, turn, f"{i}.conversations[{t}]", "value", str)
            if who is None or val is None:
                ok = False
                continue
            if who not in ("human", "gpt", "user", "assistant", "system"):
                ctx.bad(i, f"conversations[{t}].from", f"human/gpt/user/assistant/system, got {who!r}")
                ok = False
                continue
            if ctx.text(i, f"conversations[{t}].value", val.replace(IMAGE_TOKEN, " x ")) is None:
                ok = False
                continue
            for piece in _split_image_text(val):
                if piece is None:
                    if n_slots < len(imgs) and imgs[n_slots] is not None:
                        segs.append(image_seg(imgs[n_slots]))
                    n_slots += 1
                else:
                    segs.append(text_seg(piece, who in ("gpt", "assistant")))
        if n_slots != len(paths):
            ctx.bad(i, "conversations", f"{len(paths)} <image> placeholder(s) for {len(paths)} image(s), "
                                        f"found {n_slots}")
            ok = False
        qtype = rec.get("type")
        if qtype is not None and (not isinstance(qtype, str) or not qtype.strip()):
            ctx.bad(i, "type", f"a non-empty question type string, got {_json_type(qtype)}")
            ok = False
        if ok and all(im is not None for im in imgs):
            data.add_sample(i, Sample(segs))
            data.questions += [Question(Sample(segs[:k]), seg.text, "vqa", qtype)
                               for k, seg in enumerate(segs)
                               if seg.loss and k > 0 and not segs[k - 1].loss]
    return data


def read_karpathy(ctx: _Ctx, root: object, split: str | None = None) -> LoadedData:
    """COCO/Flickr Karpathy JSON: {"images": [{"filename", "filepath"?, "split", "sentences": [{"raw"}...]}]}.
    Samples: one [image, caption] per sentence; pairs: (image, first sentence, all sentences joined).
    `split` keeps the records of one split ("train" takes "restval" too); None or "all" keeps every record."""
    data = LoadedData("karpathy")
    images = _need(ctx, root, "<file>", "images", list)
    wanted = None if split in (None, "all") else split
    found: dict[str, int] = {}  # records per split, for the message when the wanted split has none
    for i, rec in enumerate(images or []):
        fn = _need(ctx, rec, i, "filename", str)
        sents = _need(ctx, rec, i, "sentences", list)
        if fn is None or sents is None:
            continue
        rec_split = rec.get("split", "")
        if not isinstance(rec_split, str):
            ctx.bad(i, "split", f"a string (train, restval, val or test), got {_json_type(rec_split)}")
            continue
        found[rec_split] = found.get(rec_split, 0) + 1
        if wanted is not None and rec_split.replace("restval", "train") != wanted:
            continue
        rel = f"{rec['filepath']}/{fn}" if isinstance(rec.get("filepath"), str) else fn
        img = ctx.image(i, "filename", rel)
        raws = [_need(ctx, s, f"{i}.sentences[{k}]", "raw", str) for k, s in enumerate(sents)]
        caps = [None if r is None else ctx.text(i, f"sentences[{k}].raw", r) for k, r in enumerate(raws)]
        if not sents:
            ctx.bad(i, "sentences", "at least one sentence")
        if img is None or not sents or any(c is None for c in caps):
            continue
        caps = [c.strip() for c in caps]
        data.pairs.append(Pair(img, caps[0], " ".join(c if c.endswith(".") else c + "." for c in caps), caps,
                               rec_split))
        data.pair_records.append(i)
        for c in caps:
            data.add_sample(i, Sample([image_seg(img), text_seg(c, True)]))
    if found and wanted is not None and not any(k.replace("restval", "train") == wanted for k in found):
        have = ", ".join(f"{n} {k or '(no split field)'}" for k, n in sorted(found.items()))
        ctx.bad("<file>", "split", f"records of split {wanted!r}, found {have} (train.py / eval.py "
                                   f"--data-split picks another: {', '.join(KARPATHY_SPLITS)})")
    return data


def jsonl_records(ctx: _Ctx, lines: list[str]) -> Iterator[tuple[int, object]]:
    """(line number from 1, as editors count, parsed record) for each non-empty line; a line that is not JSON
    is reported as a problem and skipped."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            ctx.bad(i, "<line>", f"valid JSON ({e.msg})")


def read_mmc4(ctx: _Ctx, lines: list[str]) -> LoadedData:
    """MMC4-style JSONL: one document per line, {"text_list": [str], "image_info": [{"image_name",
    "matched_text_index"}]}; each image goes right before its matched sentence; every segment ends a
    prefix."""
    data = LoadedData("mmc4")
    for i, rec in jsonl_records(ctx, lines):
        texts = _need(ctx, rec, i, "text_list", list)
        infos = _need(ctx, rec, i, "image_info", list)
        if texts is None or infos is None:
            continue
        before: dict[int, list[Tensor]] = {}
        ok = True
        for k, info in enumerate(infos):
            name = _need(ctx, info, f"{i}.image_info[{k}]", "image_name", str)
            idx = _need(ctx, info, f"{i}.image_info[{k}]", "matched_text_index", int)
            if name is None or idx is None:
                ok = False
                continue
            if not 0 <= idx < len(texts):
                ctx.bad(i, f"image_info[{k}].matched_text_index",
                        f"an index into text_list (0..{len(texts) - 1})")
                ok = False
            img = ctx.image(i, f"image_info[{k}].image_name", name)
            if img is None:
                ok = False
            else:
                before.setdefault(idx, []).append(img)
        segs = []
        for t, txt in enumerate(texts):
            if ctx.text(i, f"text_list[{t}]", txt) is None:
                ok = False
                continue
            segs += [image_seg(im) for im in before.get(t, [])] + [text_seg(txt.strip(), True)]
        if not texts:
            ctx.bad(i, "text_list", "at least one sentence")
            ok = False
        if ok:
            data.add_sample(i, Sample(segs, list(range(len(segs)))))
    return data


POPE_LABELS = ("yes", "no")


def read_pope(ctx: _Ctx, lines: list[str]) -> LoadedData:
    """POPE question JSONL (Li et al., EMNLP 2023): one {"question_id", "image", "text", "label": "yes"|"no"}
    per line. Each line is a Question (kind "pope") and a training sample [image, question, answer]."""
    data = LoadedData("pope")
    for i, rec in jsonl_records(ctx, lines):
        name, text, label = (_need(ctx, rec, i, k, str) for k in ("image", "text", "label"))
        if "question_id" not in rec:
            _need(ctx, rec, i, "question_id", int)
        if label is not None and label.strip().lower() not in POPE_LABELS:
            ctx.bad(i, "label", f"'yes' or 'no', got {label!r}")
            label = None
        img = ctx.image(i, "image", name) if name is not None else None
        text = ctx.text(i, "text", text) if text is not None else None
        if img is None or text is None or label is None:
            continue
        prompt = [image_seg(img), text_seg(text.strip(), False)]
        data.questions.append(Question(Sample(prompt), label.strip().lower(), "pope"))
        data.add_sample(i, Sample(prompt + [text_seg(label.strip().lower(), True)]))
    return data


def read_sugarcrepe(ctx: _Ctx, root: object, category: str) -> LoadedData:
    """SugarCrepe JSON: {"0": {"filename", "caption", "negative_caption"}, ...} (or a list of such records);
    the category comes from each record's "category" field, else from the file name (e.g. swap_att.json)."""
    data = LoadedData("sugarcrepe")
    recs = (list(root.items()) if isinstance(root, dict)
            else list(enumerate(root)) if isinstance(root, list) else None)
    if recs is None:
        ctx.bad("<file>", "<root>", "a JSON object or list of records")
        return data
    for i, rec in recs:
        fn = _need(ctx, rec, i, "filename", str)
        pos = _need(ctx, rec, i, "caption", str)
        neg = _need(ctx, rec, i, "negative_caption", str)
        if fn is None or pos is None or neg is None:
            continue
        img = ctx.image(i, "filename", fn)
        pos, neg = ctx.text(i, "caption", pos), ctx.text(i, "negative_caption", neg)
        cat = rec.get("category", category)
        if img is not None and pos is not None and neg is not None:
            data.negatives.append(NegativeItem(img, pos, neg, cat))
    return data


def read_winoground(ctx: _Ctx, lines: list[str]) -> LoadedData:
    """Winoground JSONL (Thrush et al., CVPR 2022): one {"id" (optional), "image_0", "image_1", "caption_0",
    "caption_1"} per line, caption_k describing image_k. Evaluation items only: no training sample comes from
    it. Two identical images or captions are refused: the scores' tie rule fails them whatever the model."""
    data = LoadedData("winoground")
    for i, rec in jsonl_records(ctx, lines):
        names = [_need(ctx, rec, i, f"image_{k}", str) for k in (0, 1)]
        caps = [_need(ctx, rec, i, f"caption_{k}", str) for k in (0, 1)]
        ims = [None if n is None else ctx.image(i, f"image_{k}", n) for k, n in enumerate(names)]
        caps = [None if c is None else ctx.text(i, f"caption_{k}", c) for k, c in enumerate(caps)]
        if None not in names and names[0] == names[1]:
            ctx.bad(i, "image_1", f"an image other than image_0, got {names[1]!r} twice")
            continue
        if None not in caps and caps[0].strip() == caps[1].strip():
            ctx.bad(i, "caption_1", "a caption other than caption_0, got the same text twice")
            continue
        if None not in ims and None not in caps:
            data.winoground.append(WinoItem(ims[0], ims[1], caps[0].strip(), caps[1].strip()))
    return data


# ---- teacher features for real data ------------------------------------------------------------------------
# File format: safetensors with two float tensors per slice, "<key>.uni" (Du,) and "<key>.cross" (Dc,), unit
# norm. <key> is "image:<path as written in the data file>" for an image, "text:<sha256 hex of the UTF-8
# text>" for text.
def feature_key(kind: str, ident: str) -> str:
    if kind == "image":
        return f"image:{ident}"
    if kind == "text":
        return "text:" + hashlib.sha256(ident.encode()).hexdigest()
    raise ValueError(f"feature_key: kind must be 'image' or 'text', got {kind!r}")


@dataclass
class Features:
    uni: dict[str, Tensor]
    cross: dict[str, Tensor]

    def lookup(self, kind: str, ident: str) -> tuple[Tensor, Tensor] | None:
        k = feature_key(kind, ident)
        return (self.uni[k], self.cross[k]) if k in self.uni and k in self.cross else None


def save_features(path: str | Path, features: dict[str, tuple[Tensor, Tensor]]) -> None:
    """features: key (from feature_key) -> (uni (Du,), cross (Dc,))."""
    from safetensors.torch import save_file
    flat = {}
    for k, (u, c) in features.items():
        flat[f"{k}.uni"], flat[f"{k}.cross"] = u.float().contiguous(), c.float().contiguous()
    save_file(flat, str(path))


def read_features(ctx: _Ctx) -> LoadedData:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        flat = load_file(str(ctx.path))
    except (SafetensorError, OSError) as e:
        ctx.bad("<file>", "<root>", f"a readable safetensors file ({e})")
        return LoadedData("features")
    uni, cross = {}, {}
    for name, t in flat.items():
        key, _, part = name.rpartition(".")
        if part not in ("uni", "cross") or not key.startswith(("image:", "text:")):
            ctx.bad(name, "<key>", "'image:<path>.uni|cross' or 'text:<sha256>.uni|cross'")
            continue
        if t.dim() != 1 or not torch.isfinite(t).all() or abs(float(t.norm()) - 1) > 1e-3:
            ctx.bad(name, part, "a finite unit-norm vector (D,)")
            continue
        (uni if part == "uni" else cross)[key] = t
    rejected = {str(p.index).rpartition(".")[0] for p in ctx.problems}  # a bad vector is reported once, above
    for k in (set(uni) ^ set(cross)) - rejected:
        ctx.bad(k, "uni" if k not in uni else "cross", "both a .uni and a .cross vector")
    for name, d in (("uni", uni), ("cross", cross)):
        widths = {t.shape[0] for t in d.values()}
        if len(widths) > 1:
            ctx.bad("<file>", name, f"one width for every .{name} vector, got {sorted(widths)}")
    return LoadedData("features", features=Features(uni, cross))


def detect_format(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "features"
    if path.suffix == ".jsonl":
        keys = _first_jsonl_keys(path)
        if keys >= {"image_0", "image_1", "caption_0", "caption_1"}:
            return "winoground"
        return "pope" if keys >= {"question_id", "text", "label"} else "mmc4"
    if path.suffix != ".json":
        raise ValueError(f"{path}: unknown format (expected .json, .jsonl or .safetensors)")
    root = read_json(path)
    if isinstance(root, dict) and "images" in root:
        return "karpathy"
    first = root[0] if isinstance(root, list) and root else next(iter(root.values()), None) \
        if isinstance(root, dict) else None
    if isinstance(first, dict) and "conversations" in first:
        return "llava"
    if path.stem in CATEGORIES or isinstance(first, dict) and ("negative_caption" in first
                                                               or "caption" in first):
        return "sugarcrepe"
    raise ValueError(f"{path}: cannot tell the format: expected LLaVA records with 'conversations', a "
                     f"Karpathy object with 'images', or SugarCrepe records with 'negative_caption'")


def _first_jsonl_keys(path: Path) -> set[str]:
    """The keys of a JSONL file's first record (empty when it is not an object): POPE, Winoground and MMC4
    share .jsonl."""
    try:
        with open(path) as f:
            first = next((line for line in f if line.strip()), "")
        rec = json.loads(first) if first else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return set()
    return set(rec) if isinstance(rec, dict) else set()


def read_json(path: Path) -> object:
    """A JSON file (the readers here, and unimllm.py's Hugging Face configs): FileNotFoundError for a missing
    file, ValueError naming the file, line and column for an unreadable or invalid one."""
    if not path.is_file():
        raise FileNotFoundError(f"missing file {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable: {e}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def _attach_features(ctx: _Ctx, data: LoadedData, feats: Features) -> None:
    """Give every slice found in the features file its (uni, cross); images are matched by their path in the
    file."""
    path_of = {id(t): rel for rel, t in ctx.cache.items()}  # each path is loaded once, so tensors are shared
    for smp in data.samples:
        for seg in smp.segments:
            if seg.kind == "image":
                hit = feats.lookup("image", path_of[id(seg.image)]) if id(seg.image) in path_of else None
            else:
                hit = feats.lookup("text", seg.text)
            if hit is not None:
                seg.uni, seg.cross = hit


def sample_lengths(samples: Sequence[Sample], tok: Tokenizer, n_image_tokens: int) -> list[int]:
    """The tokens `collate` gives each sample: <s>, each segment, one </s> per answer turn."""
    texts = [segment_text(s.text, k > 0 and smp.segments[k - 1].kind == "text")
             for smp in samples for k, s in enumerate(smp.segments) if s.kind == "text"]
    n_text = iter(tok.count(texts))
    out = []
    for smp in samples:
        n = 1 + sum(n_image_tokens if s.kind == "image" else next(n_text) for s in smp.segments)
        out.append(n + sum(ends_turn(smp.segments, k) for k in range(len(smp.segments))))
    return out


def pair_lengths(items: Sequence[object], tok: Tokenizer, n_image_tokens: int) -> list[int]:
    """The longer of the two sequences `collate_pairs` gives each pair: the image side (with its long caption)
    or the text side."""
    parts = [_pair_fields(item) for item in items]
    k = n_soft_tokens(tok)
    return [max(1 + n_image_tokens + k + n_long + 1, 1 + n_short + k)
            for n_short, n_long in zip(tok.count([p[1] for p in parts]), tok.count([p[2] for p in parts]))]


def length_problems(data: LoadedData, tok: Tokenizer, n_image_tokens: int, max_len: int) -> list[Problem]:
    """Samples and pairs of a read file that do not fit a context of max_len tokens (nothing is truncated)."""
    samples = zip(data.sample_records, sample_lengths(data.samples, tok, n_image_tokens))
    pairs = zip(data.pair_records, pair_lengths(data.pairs, tok, n_image_tokens))
    return ([Problem(i, "<sample>", f"at most {max_len} tokens (the context), has {n}")
             for i, n in samples if n > max_len]
            + [Problem(i, "<pair>", f"at most {max_len} tokens with its long caption, has {n}")
               for i, n in pairs if n > max_len])


def load_dataset(path: str | Path, tok: Tokenizer | None = None, n_image_tokens: int = N_IMAGE_TOKENS,
                 max_len: int = MAX_LEN, image_size: int = 32, image_root: str | Path | None = None,
                 features: "str | Path | Features | None" = None, split: str | None = None) -> LoadedData:
    """Detect the format of `path` and read it (train.py --data). Every problem in the file is collected and
    raised together as one DataError; nothing is dropped or truncated silently. With `tok`, samples longer
    than max_len are problems too. `features`: teacher features (a safetensors file, see feature_key, or its
    loaded Features) attached to text slices and to image slices by path. `split`: which Karpathy records to
    keep (read_karpathy)."""
    if split is not None and split not in KARPATHY_SPLITS:
        raise ValueError(f"split must be one of {', '.join(KARPATHY_SPLITS)}, got {split!r}")
    data, ctx = _read_any(Path(path), tok, n_image_tokens, max_len, image_size, image_root, split)
    if ctx.problems:
        raise DataError(path, ctx.problems)
    if features is not None:
        feats = features if isinstance(features, Features) else load_dataset(features).features
        if feats is None:
            raise ValueError(f"{features}: not a teacher-features file (expected .safetensors, see data.py)")
        _attach_features(ctx, data, feats)
        data.features = feats
    return data


def _read_any(path: Path, tok: Tokenizer | None, n_image_tokens: int, max_len: int, image_size: int,
              image_root: str | Path | None, split: str | None) -> tuple[LoadedData, _Ctx]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    fmt = detect_format(path)
    ctx = _Ctx(path, Path(image_root) if image_root else None, image_size)
    if fmt == "features":
        data = read_features(ctx)
        if not ctx.problems and not data.features.uni:
            ctx.bad("<file>", "<root>", "at least one feature vector (the file has none)")
        return data, ctx
    if fmt in ("mmc4", "pope", "winoground"):
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable: {e}") from e
        data = {"mmc4": read_mmc4, "pope": read_pope, "winoground": read_winoground}[fmt](ctx, lines)
    elif fmt == "llava":
        data = read_llava(ctx, read_json(path))
    elif fmt == "karpathy":
        data = read_karpathy(ctx, read_json(path), split)
    else:
        data = read_sugarcrepe(ctx, read_json(path), path.stem if path.stem in CATEGORIES else "unknown")
    if not ctx.problems and not (data.samples or data.pairs or data.negatives or data.winoground):
        ctx.bad("<file>", "<root>", "at least one record (the file has none)")
    if tok is not None:
        ctx.problems += length_problems(data, tok, n_image_tokens, max_len)
    return data, ctx


def data_texts(data: LoadedData) -> list[str]:
    out = [s.text for smp in data.samples for s in smp.segments if s.kind == "text"]
    return (out + [t for n in data.negatives for t in (n.positive, n.negative)]
            + [t for w in data.winoground for t in (w.caption_0, w.caption_1)])


def check(path: str | Path, tok: Tokenizer | None = None, n_image_tokens: int = N_IMAGE_TOKENS,
          max_len: int = MAX_LEN, image_size: int = 32,
          image_root: str | Path | None = None) -> list[Problem]:
    """Every problem of a data file (empty list: the file is fine), every record whatever its split. Without
    `tok`, lengths are measured with the byte-level BPE a from-scratch `train.py --data FILE` trains (on the
    file's own text, train.py's default vocabulary)."""
    p = Path(path)
    try:
        data, ctx = _read_any(p, None, n_image_tokens, max_len, image_size, image_root, None)
    except ValueError as e:
        return [Problem("<file>", "<file>", str(e))]
    if tok is None and data.format != "features":
        tok = train_tokenizer(data_texts(data))
    if tok is not None and data.format != "features":
        ctx.problems += length_problems(data, tok, n_image_tokens, max_len)
    return ctx.problems


def flag_of(name: str) -> str:
    """The command-line flag of a config field: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass `cls` (train.py's and eval.py's configs), in a group titled by the
    class, with the class docstring; --help shows each field's trailing `# ...` comment in the dataclass
    source (why a default is so) and its default (or the field's metadata["help"]). Fields typed bool are
    switches; `X | None` fields take an X (None: resolved later). Flags not given are absent from the parsed
    namespace (argparse.SUPPRESS), so a caller can tell a given flag from a default. Here, not in train.py,
    because eval.py must not import train.py, and data.py is the module both import that imports neither."""
    own_doc = None if cls.__doc__.startswith(cls.__name__ + "(") else cls.__doc__  # not dataclass's own
    group = parser.add_argument_group(cls.__name__, own_doc)
    helps: dict[str, str] = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?  # (.*)$", line)
        if m:
            helps[m[1]] = m[2]
    for f in fields(cls):
        text = helps.get(f.name, "").replace("%", "%%")
        if f.type == "bool":
            group.add_argument(flag_of(f.name), dest=f.name, action="store_true", default=argparse.SUPPRESS,
                               help=text)
            continue
        name = f.type.removesuffix(" | None")
        default = f.metadata.get("help", f"default {f.default!r}")
        typ = {"int": int, "float": float, "str": str}[name]
        group.add_argument(flag_of(f.name), dest=f.name, type=typ, default=argparse.SUPPRESS,
                           metavar=name.upper(), help=f"{text} ({default})".strip())


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="validate a data file and report every problem")
    c.add_argument("path")
    c.add_argument("--tokenizer", default=None, help="tokenizer.json used to measure lengths")
    c.add_argument("--max-len", type=int, default=MAX_LEN)
    c.add_argument("--n-image-tokens", type=int, default=N_IMAGE_TOKENS)
    c.add_argument("--image-size", type=int, default=32)
    c.add_argument("--image-root", default=None)
    sub.add_parser("demo", help="print one scene of the built-in world")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        s = make_world("train", 1, 0).scenes[0]
        print(s.graph, s.short_caption, s.long_caption, s.vqa, s.pope, s.negatives, sep="\n")
        return 0
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    problems = check(args.path, tok, args.n_image_tokens, args.max_len, args.image_size, args.image_root)
    for p in problems:
        print(p)
    print(f"{args.path}: {'OK' if not problems else f'{len(problems)} problem(s){numbering(args.path)}'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
