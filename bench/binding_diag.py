"""Binding diagnostic: which change lets the LLM read one attribute of the object another attribute names?
Stage 0 and stage 1 of train.py at the default size (train.py's distillation betas, the length-grouped
pre-training stream), one variant switched on by a flag, then every --eval-every steps the teacher-forced
accuracy per question type (the argmax token after "answer:") on 150 test scenes of the built-in world.
Stage 1 is the full mix alone unless --lookup-steps opens it (with the two lookup questions only; train.py's
opening also holds the RAG samples). The instrument behind the README's "A model that sees", items 6-8 and
10.
A sibling of bench/grounding_diag.py, which measured the earlier items with AdamW's default betas and
ungrouped batches.

  --dense W       stage 0 also distils every image token from its grid cell's teacher vector (W: its weight;
                  the cell's facts by --facts: s shape, c colour, z size, p the cell; "empty" for an empty
                  cell), beside the pooled cross-modal feature: every attribute gets the same weight in a
                  token
  --loss sample   the next-token loss averaged per sequence, then over the batch (default: per token, as
                  train.py), so the one-word VQA answers weigh as much as a 60-token long caption
  --unfreeze 1    the vision tower keeps training in stage 1 (train.py freezes it, as LLaVA does)
  --mix vqa       the VQA / POPE conversations alone
  --mix text      no image: [long caption] question answer (the same lookups, read from text)
  --mix lookup    one question per sequence, only "what colour is the <shape>?" and "what shape is the
                  <colour> object?" ([image] question answer; data.lookup_samples)
  --caption C     the long captions' object sentences: colour (data.py's "a small yellow square at the
                  bottom."), shape (always "a square at the bottom, small and yellow."), mixed (each object
                  one of the two at random)
  --relation R    the long captions' relation sentences: first (data.py's "the yellow square is to the
                  right of the red circle."), last (both objects named before the relation: "the red circle
                  has the yellow square to its right."), mixed (each one of the two at random)
  --seed S        model initialisation, stage-0 batches and data order (default 0)
  --llm-kv-heads K  key/value heads of the LLM's 6 query heads (default 2, train.py's; 6: no sharing)
  --probe 1       after stage 0, how well a linear probe reads each object's row, column and shape off its
                  own image token (tower output; fitted on 70% of the objects, scored on the rest), for the
                  random tower and the distilled one
  --lookup-steps N  stage 1 starts with N steps of --mix lookup batches, then --steps steps of the --mix
                  (one warm-up and cosine over both)
  --lookup-rel R  the lookup questions (--mix lookup, --lookup-steps) also hold: 1 the relation questions ("is
                  the red square left or right of the blue circle?"); 2 those alone; 3 colour, shape, relation
                  and "where is the <colour> <shape>?" (answer: its cell, "top left"; scored on the first word);
                  4 relation and "where" alone; 5 with --text-context: "what is the name of the <size>
                  <colour> <shape>?" about a scene written out as "the small red square is called pevofu. ...",
                  a fresh made-up name per object and sample (scored on the name's first token), alone; 6 the
                  same with only the asked object's sentence in context (one name: copying needs no lookup)
  --rel-steps N   a two-part opening: --lookup-steps steps of the two lookup questions alone, then N steps of
                  the --lookup-rel lookups, then the mix
  --restart-lr 1  the opening and the mix each get their own warm-up and cosine (default: one over both)
  --text-context 1  with --lookup-rel 2 or 4: the lookups (and the evaluation) read the scene from text, not
                  the image: the long caption's object sentences ("a small red square at the top left. ..."), so
                  every cell is written out and nothing needs to be read off an image token
  --img-pos S     a learned embedding per image-token slot (init N(0, S^2)) added to the adapter's output
  --img-pos2d S   learned row and column embeddings (init N(0, S^2)) added to the adapter's output: the token
                  of cell (r, c) gets row[r] + col[c]
  --pos-words S   S times the sum of the LLM's input embeddings of a cell's words (" top", " left") added to
                  the adapter's output at that cell's image token: the token holds its cell in the very
                  vectors the answer words are
  --ckpt PATH     only this: a trained checkpoint teacher-forced on 150 test scenes' long captions, the
                  accuracy of the cell word after "a small yellow square at the" (its first word) and of the
                  shape word after "a small yellow"
  --oracle-tokens S  the image tokens replaced by the scene graph's own cells, no vision tower: each token the
                  sum of learned embeddings (init N(0, S^2)) of its row, its column and its object's colour,
                  shape and size (or "empty"), so every attribute, the cell included, is one clean vector; how
                  fast the LLM learns a lookup when the tokens are perfect (with --mix lookup only)
  --qk-std S      the LLM's query / key projections re-drawn from N(0, S^2): 0.02 is the init every run of
                  item 6 had (Hugging Face's initializer_range); default 0: the model's own, N(0, 1/d_in)

    python bench/binding_diag.py --steps 2000 --eval-every 250 [--dense 1 --facts scpz] [--caption mixed]
"""
import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import train as T  # noqa: E402
from unimllm import MLLM  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument('--steps', type=int, default=800)
p.add_argument('--lr', type=float, default=6e-4)
p.add_argument('--distil', type=int, default=600)
p.add_argument('--dense', type=float, default=0.0)
p.add_argument('--facts', default='scp')
p.add_argument('--eval-every', type=int, default=200)
p.add_argument('--threads', type=int, default=1)
p.add_argument('--mix', default='default', choices=['default', 'vqa', 'text', 'lookup'])
p.add_argument('--loss', default='token', choices=['token', 'sample'])
p.add_argument('--unfreeze', type=int, default=0)
p.add_argument('--caption', default='colour', choices=['colour', 'shape', 'mixed'])
p.add_argument('--relation', default='first', choices=['first', 'last', 'mixed'])
p.add_argument('--seed', type=int, default=0)
p.add_argument('--llm-kv-heads', type=int, default=2)
p.add_argument('--qk-std', type=float, default=0.0)
p.add_argument('--probe', type=int, default=0)
p.add_argument('--lookup-steps', type=int, default=0)
p.add_argument('--lookup-rel', type=int, default=0)
p.add_argument('--rel-steps', type=int, default=0)
p.add_argument('--restart-lr', type=int, default=0)
p.add_argument('--img-pos', type=float, default=0.0)
p.add_argument('--img-pos2d', type=float, default=0.0)
p.add_argument('--text-context', type=int, default=0)
p.add_argument('--pos-words', type=float, default=0.0)
p.add_argument('--ckpt', default='')
p.add_argument('--oracle-tokens', type=float, default=0.0)
a = p.parse_args()
if a.text_context and a.lookup_rel not in (2, 4, 5, 6):
    p.error('--text-context reads the relation and "where" lookups from text: give --lookup-rel 2, 4, 5 or 6')
if a.rel_steps and not a.lookup_rel:
    p.error('--rel-steps opens with the --lookup-rel lookups: give --lookup-rel')
if a.oracle_tokens and a.mix != 'lookup':
    p.error("--oracle-tokens needs --mix lookup: the mix's stories and knowledge-base images have no scene "
            "graph here")
if a.lookup_rel in (5, 6) and not (a.text_context and a.mix == 'lookup'):
    p.error('--lookup-rel 5 and 6 (names read from text) need --text-context 1 --mix lookup')
torch.set_num_threads(a.threads)
torch.manual_seed(a.seed)


@torch.no_grad()
def next_words(model: MLLM, tok: data.Tokenizer, samples: list, max_len: int) -> list[str]:
    """The argmax word after each prompt (data.Sample without loss), in batches of 64."""
    out = []
    for i in range(0, len(samples), 64):
        b = data.collate(samples[i:i + 64], tok, model.n_image_tokens, max_len)
        logits, _ = model(b['input_ids'], b['images'])
        last = logits[torch.arange(len(b['input_ids'])), b['attention_mask'].sum(1) - 1]  # (B, V)
        out += [tok.decode([int(lg.argmax())]).strip() for lg in last]
    return out


@torch.no_grad()
def caption_words(ckpt: str) -> None:
    """A trained checkpoint, teacher-forced on the test scenes' long captions: is the argmax after "a small
    yellow square at the" the first word of the object's cell, and after "a small yellow" its shape?"""
    model, tok = T.checkpoint_model(torch.load(ckpt, weights_only=True), ckpt)
    model.eval()
    rows = []
    for sc in data.make_world('test', 200, 0, image_size=model.cfg.vision.image_size).scenes[:150]:
        for o in sc.graph.objects:
            named = f"a {o.size} {o.colour} {o.shape} at the"
            end = sc.long_caption.index(named) + len(named)
            rows += [(sc, sc.long_caption[:end], data.POSITIONS[(o.row, o.col)].split()[0], 'cell'),
                     (sc, sc.long_caption[:end - len(f" {o.shape} at the")], o.shape, 'shape')]
    got = next_words(model, tok, [data.Sample([data.image_seg(sc.image), data.text_seg(text, False)])
                                  for sc, text, _, _ in rows], model.cfg.llm.max_seq_len)
    hits: dict[str, list[bool]] = {}
    for (_, _, want, kind), word in zip(rows, got):
        hits.setdefault(kind, []).append(word == want)
    print({k: (round(sum(v) / len(v), 3), len(v)) for k, v in hits.items()}, flush=True)


if a.ckpt:
    caption_words(a.ckpt)
    sys.exit()
cfg = T.TrainConfig()
cfg.model.llm_kv_heads = a.llm_kv_heads
corpus = T.builtin_corpus(cfg)
# the reordered relation sentences: "x has y to its left" says "y is to the left of x"
LAST = {"left": "to its left", "right": "to its right", "above": "above it", "below": "below it"}
reorder = a.caption != 'colour' or a.relation != 'first'
# the reordered sentences bring words data.py's texts lack
tok = data.train_tokenizer(corpus.texts + ([', and'] if a.caption != 'colour' else [])
                           + (list(LAST.values()) if a.relation != 'first' else []), 1024)
scenes = corpus.pairs  # the built-in world's training scenes, as builtin_corpus built them
test = data.make_world('test', 200, 0, image_size=cfg.model.image_size)


def qtype(q: str) -> str:
    if q.startswith('where'):
        return 'where'
    if q.startswith('what is the name'):
        return 'name'
    return q.split()[1] if q.startswith('what') else ('count' if q.startswith('how')
                                                      else ('pope' if 'in the image' in q else 'rel'))


def cell_targets(graph: data.SceneGraph) -> torch.Tensor:
    """(GRID * GRID, CROSS_DIM): one teacher vector per grid cell, in the tower's row-major token order (one
    token per cell at the default 48-px images and 16-px patches)."""
    out = []
    for r in range(data.GRID):
        for c in range(data.GRID):
            o = next((o for o in graph.objects if (o.row, o.col) == (r, c)), None)
            f = [f'cell:{r}:{c}'] if 'p' in a.facts else []
            if o is None:
                f.append('empty')
            else:
                f += [x for k, x in (('s', f's:{o.shape}'), ('c', f'c:{o.colour}'), ('z', f'z:{o.size}'))
                      if k in a.facts]
            out.append(data.featurise('patch', f, data.CROSS_DIM))
    return torch.stack(out)


model = MLLM(T.model_config(cfg.model, tok))
if a.qk_std:
    for layer in model.llm.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            torch.nn.init.normal_(proj.weight, std=a.qk_std)
n_img, max_len = model.n_image_tokens, cfg.model.max_len
if a.img_pos:  # a learned embedding per image-token slot, added to the adapter's output
    class PosAdapter(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.pos = torch.nn.Parameter(torch.randn(n_img, cfg.model.llm_width) * a.img_pos)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + self.pos
    model.adapter = PosAdapter(model.adapter)
if a.img_pos2d:  # factorised 2D position: row[r] + col[c] on the token of cell (r, c)
    class Pos2dAdapter(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.row = torch.nn.Parameter(torch.randn(data.GRID, 1, cfg.model.llm_width) * a.img_pos2d)
            self.col = torch.nn.Parameter(torch.randn(1, data.GRID, cfg.model.llm_width) * a.img_pos2d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + (self.row + self.col).flatten(0, 1)
    model.adapter = Pos2dAdapter(model.adapter)
if a.pos_words:  # each image token plus the input embeddings of its cell's words (tied to the output ones)
    class WordPosAdapter(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.cells = [tok.encode(' ' + data.POSITIONS[(r, c)])
                          for r in range(data.GRID) for c in range(data.GRID)]  # row-major, as the tokens

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            emb = model.llm.embed_tokens.weight
            return self.inner(x) + a.pos_words * torch.stack([emb[ids].sum(0) for ids in self.cells])
    model.adapter = WordPosAdapter(model.adapter)
if a.oracle_tokens:  # the scene graph's cells as tokens (the images of every scene used are looked up)
    graphs = {s.image.numpy().tobytes(): s.graph for s in scenes + test.scenes}

    class OracleTokens(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            d, n = cfg.model.llm_width, data.GRID
            sizes = {'row': n, 'col': n, 'colour': len(data.COLOURS), 'shape': len(data.SHAPES) + 1, 'size': 2}
            self.emb = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.randn(v, d) * a.oracle_tokens)
                                               for k, v in sizes.items()})  # shape's last row: "empty"

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            out = []
            for img in images:
                cells = {(o.row, o.col): o for o in graphs[img.numpy().tobytes()].objects}
                toks = []
                for r in range(data.GRID):
                    for c in range(data.GRID):
                        t = self.emb['row'][r] + self.emb['col'][c]
                        o = cells.get((r, c))
                        if o is None:
                            t = t + self.emb['shape'][len(data.SHAPES)]
                        else:
                            t = (t + self.emb['colour'][list(data.COLOURS).index(o.colour)]
                                 + self.emb['shape'][data.SHAPES.index(o.shape)]
                                 + self.emb['size'][int(o.size == 'large')])
                        toks.append(t)
                out.append(torch.stack(toks))
            return torch.stack(out)  # (N, 9, D)
    model.oracle = OracleTokens()
    object.__setattr__(model, 'image_tokens', model.oracle)  # instance attribute: shadows the method
T.pretrain_trainable(model, vision_frozen=False)
imgs = torch.stack([s.image for s in scenes])
tgt = torch.stack([s.cross_image for s in scenes])
cells = torch.stack([cell_targets(s.graph) for s in scenes])  # (N, 9, C)
head = torch.nn.Linear(cfg.model.vision_width, data.CROSS_DIM)
dense_head = torch.nn.Linear(cfg.model.vision_width, data.CROSS_DIM)
params = list(model.vision.parameters()) + list(head.parameters()) + list(dense_head.parameters())
dopt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95))
g = torch.Generator().manual_seed(a.seed)


def probe(tower: str) -> None:
    """Linear probes from an object's own image token (tower output, standardised) to its row, column and
    shape: fitted on the first 70% of the training scenes' objects, scored on the rest."""
    with torch.no_grad():
        f = torch.cat([model.vision_features(imgs[i:i + 256]) for i in range(0, len(imgs), 256)])  # (N, 9, D)
    objs = [(i, o) for i, s in enumerate(scenes) for o in s.graph.objects]
    x = torch.stack([f[i, o.row * data.GRID + o.col] for i, o in objs])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n, got = int(0.7 * len(x)), {}
    for name, y in (('row', [o.row for _, o in objs]), ('column', [o.col for _, o in objs]),
                    ('shape', [data.SHAPES.index(o.shape) for _, o in objs])):
        y = torch.tensor(y)
        lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
        popt = torch.optim.Adam(lin.parameters(), 1e-2)
        for _ in range(300):
            loss = F.cross_entropy(lin(x[:n]), y[:n])
            popt.zero_grad()
            loss.backward()
            popt.step()
        got[name] = round(float((lin(x[n:]).argmax(-1) == y[n:]).float().mean()), 3)
    print('probe', tower, got, flush=True)


if a.probe:
    probe('random tower')
t0 = time.time()
for st in range(a.distil):
    for gr in dopt.param_groups:
        gr['lr'] = T.lr_at(st, a.distil, 1e-3, 0.03)
    idx = torch.randint(len(imgs), (64,), generator=g)
    f = model.vision_features(imgs[idx])  # (64, 9, Dv)
    loss = (1 - F.cosine_similarity(head(f.mean(1)), tgt[idx], dim=-1)).mean()
    if a.dense:
        loss = loss + a.dense * (1 - F.cosine_similarity(dense_head(f), cells[idx], dim=-1)).mean()
    dopt.zero_grad()
    loss.backward()
    dopt.step()
    if st % 200 == 0:
        print('distil', st, round(loss.item(), 4), round(time.time() - t0), flush=True)
if a.probe:
    probe('distilled tower')
for p_ in model.vision.parameters():
    p_.requires_grad_(bool(a.unfreeze))
opt = T.make_optimizer(model, a.lr, 0.0)


def long_caption(graph: data.SceneGraph, rng: random.Random) -> str:
    """The long caption with its object sentences ordered by --caption, its relation sentences by
    --relation."""
    n = len(graph.objects)
    parts = [f"there is {data.NUMBERS[n]} shape." if n == 1 else f"there are {data.NUMBERS[n]} shapes."]
    for o in graph.objects:
        pos = data.POSITIONS[(o.row, o.col)]
        if a.caption == 'shape' or (a.caption == 'mixed' and rng.random() < 0.5):
            parts.append(f"a {o.shape} at the {pos}, {o.size} and {o.colour}.")
        else:
            parts.append(f"a {o.size} {o.colour} {o.shape} at the {pos}.")
    for i, x in enumerate(graph.objects):
        for y in graph.objects[i + 1:]:
            for rel in data._relations_between(x, y):
                if a.relation == 'last' or (a.relation == 'mixed' and rng.random() < 0.5):
                    parts.append(f"the {y.colour} {y.shape} has the {x.colour} {x.shape} {LAST[rel]}.")
                else:
                    parts.append(f"the {x.colour} {x.shape} is {data.REL_WORDS[rel]} "
                                 f"the {y.colour} {y.shape}.")
    return " ".join(parts)


def context(s: data.Scene) -> data.Segment:
    """What a relation / "where" lookup reads the scene from: the image, or with --text-context its objects'
    sentences."""
    if not a.text_context:
        return data.image_seg(s.image)
    return data.text_seg(" ".join(f"a {o.size} {o.colour} {o.shape} at the {data.POSITIONS[(o.row, o.col)]}."
                                  for o in s.graph.objects), False)


# data.lookup_samples' questions (train.py's opening also holds the RAG samples, which start with text)
lookups = [x for x in corpus.lookup if x.segments[0].kind == 'image']
two = list(lookups)  # the two lookup questions: --rel-steps' first part
def named(s: data.Scene, rng: random.Random, split: str) -> list[tuple[data.Segment, str, str]]:
    """--lookup-rel 5: the scene as "the small red square is called pevofu. ...", a fresh made-up name per
    object (the knowledge base's sentence form); (context, question, name) for each object. 6: each object's
    context is its own sentence alone."""
    sents = [(f"the {o.size} {o.colour} {o.shape} is called {data.make_name(rng, split)}.", o)
             for o in s.graph.objects]
    every = data.text_seg(" ".join(t for t, _ in sents), False)
    return [(every if a.lookup_rel == 5 else data.text_seg(t, False),
             f"what is the name of the {o.size} {o.colour} {o.shape}?", t.split()[-1][:-1]) for t, o in sents]


if a.lookup_rel in (5, 6):  # every scene 8 times, with fresh names each time
    rng, lookups = random.Random(a.seed), []
    for s in scenes * 8:
        lookups += [data.Sample([seg, data.text_seg(data.format_question(q), False), data.text_seg(n, True)])
                    for seg, q, n in named(s, rng, 'train')]
elif a.lookup_rel:
    lookups = [] if a.lookup_rel in (2, 4) else lookups  # 2, 4: without colour and shape
    lookups += [data.Sample([context(s), data.text_seg(data.format_question(q), False),
                             data.text_seg(ans, True)])
                for s in scenes for q, ans in s.vqa if qtype(q) == 'rel']
if a.lookup_rel in (3, 4):  # also "where is the <colour> <shape>?" -> its cell's words
    lookups += [data.Sample([context(s), data.text_seg(data.format_question(
        f"where is the {o.colour} {o.shape}?"), False), data.text_seg(data.POSITIONS[(o.row, o.col)], True)])
        for s in scenes for o in s.graph.objects]
if reorder:
    rng = random.Random(0)
    corpus.long = [data.Sample([data.image_seg(sc.image), data.text_seg(long_caption(sc.graph, rng), True)])
                   for sc in scenes]
    print(corpus.long[0].segments[1].text)
if a.mix == 'default':
    items = corpus.lm + corpus.long + corpus.stories
elif a.mix == 'lookup':
    items = lookups
elif a.mix == 'vqa':
    items = [x for x in corpus.lm
             if any(g.kind == 'text' and g.text.startswith('question:') for g in x.segments)]
else:
    rng, items = random.Random(0), []
    for sc in scenes:
        qa = sc.vqa + sc.pope
        rng.shuffle(qa)
        items += [data.Sample([data.text_seg(sc.long_caption, False),
                               data.text_seg(data.format_question(q), False), data.text_seg(ans, True)])
                  for q, ans in qa[:4]]
stream = T.Stream('pretrain', items, a.seed, data.sample_lengths(items, tok, n_img), 16)
parts = [(a.lookup_steps, two if a.rel_steps else lookups), (a.rel_steps, lookups)]
parts = [(n, T.Stream('lookup', x, a.seed, data.sample_lengths(x, tok, n_img), 16)) for n, x in parts if n]
n_open = a.lookup_steps + a.rel_steps
total = n_open + a.steps


def batch_at(step: int) -> list:
    """The opening's parts in order, then the mix."""
    for n, part in parts:
        if step < n:
            return part.batch(step, 32)
        step -= n
    return stream.batch(step, 32)


def evaluate(scenes: list) -> dict[str, float]:
    model.eval()
    qs, by = [(s, q, ans) for s in scenes for q, ans in s.vqa + s.pope], {}
    if a.lookup_rel in (5, 6):  # the same names at every evaluation; the answer is the name's first token
        rng = random.Random(1)
        qs = [(seg, q, tok.decode(tok.encode(' ' + n)[:1]).strip())
              for s in scenes for seg, q, n in named(s, rng, 'test')]
    if a.lookup_rel in (3, 4):  # the first word of the cell ("top", "bottom", "left", "center", "right")
        qs += [(s, f"where is the {o.colour} {o.shape}?", data.POSITIONS[(o.row, o.col)].split()[0])
               for s in scenes for o in s.graph.objects]
    got = next_words(model, tok, [data.Sample([s if a.lookup_rel in (5, 6)
                                               else data.text_seg(s.long_caption, False) if a.mix == 'text'
                                               else context(s),
                                               data.text_seg(data.format_question(q), False)])
                                  for s, q, _ in qs], max_len)
    for (_, q, ans), word in zip(qs, got):
        by.setdefault(qtype(q), []).append(word == ans)
    model.train()
    return {k: round(sum(v) / len(v), 3) for k, v in sorted(by.items())}


t0 = time.time()
for step in range(total):
    lr = (T.lr_at(step, total, a.lr, 0.03) if not a.restart_lr
          else T.lr_at(step, n_open, a.lr, 0.03) if step < n_open
          else T.lr_at(step - n_open, a.steps, a.lr, 0.03))
    for g_ in opt.param_groups:
        g_['lr'] = lr
    b = data.collate(batch_at(step), tok, n_img, max_len)
    logits, _ = model(b['input_ids'], b['images'])
    if a.loss == 'token':
        pred = T.predicting(b['labels'])
        s, c = T.ntp_sum(logits.flatten(0, 1)[pred], b['labels'], pred)
        loss = s / c
    else:
        lab = b['labels'][:, 1:]
        lp = F.cross_entropy(logits[:, :-1].transpose(1, 2), lab, ignore_index=-100, reduction='none')
        m = (lab != -100).float()
        loss = ((lp * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    if step % 50 == 0:
        print(f'step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s', flush=True)
    if (step + 1) % a.eval_every == 0:
        print('test', step + 1, evaluate(test.scenes[:150]), flush=True)
