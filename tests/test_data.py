"""Tests for data.py: the built-in world, tokenizer, collate / collate_pairs, readers and the validator.

Every caption, answer and negative is checked by an INDEPENDENT checker written here: a regex grammar of the
world's sentences evaluated against the ground-truth objects (shape, colour, size, grid row/col) — it never
calls data.py's caption/negative code. Readers round-trip fixtures this file writes in each format.

Run: .venv/bin/python -m pytest tests/test_data.py -x -q
"""
import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

import data

ROOT = Path(__file__).resolve().parents[1]
FAST = settings(max_examples=12, deadline=None)

# ---- the independent checker -------------------------------------------------------------------------------
C = "red|green|blue|yellow|purple|cyan"
S = "square|circle|triangle|cross"
NP_RE = rf"a (?:(small|large) )?({C}) ({S})"
REL_RE = "to the left of|to the right of|above|below"
PHRASE_RE = re.compile(rf"^{NP_RE}(?: ({REL_RE}) {NP_RE})?((?: and {NP_RE})*)$")
REL = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
POS = {"top left": (0, 0), "top": (0, 1), "top right": (0, 2), "left": (1, 0), "center": (1, 1),
       "right": (1, 2), "bottom left": (2, 0), "bottom": (2, 1), "bottom right": (2, 2)}
NUM = ["zero", "one", "two", "three", "four"]


def holds(a, rel, b) -> bool:
    return {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row,
            "below": a.row > b.row}[rel]


def matches(o, np_) -> bool:
    size, colour, shape = np_
    return o.colour == colour and o.shape == shape and (size is None or o.size == size)


def parse(text: str):
    m = PHRASE_RE.match(text)
    assert m, f"unparseable caption {text!r}"
    g = m.groups()
    first = (g[0], g[1], g[2])
    rel = REL[g[3]] if g[3] else None
    second = (g[4], g[5], g[6]) if g[3] else None
    extra = tuple(re.findall(NP_RE, g[7] or ""))
    extra = tuple((z or None, c, s) for z, c, s in extra)
    return first, rel, second, extra


def true_of(text: str, objs) -> bool:
    first, rel, second, extra = parse(text)
    ok = any(matches(a, first) and (rel is None or any(b is not a and matches(b, second) and holds(a, rel, b)
                                                          for b in objs)) for a in objs)
    return ok and all(any(matches(o, e) for o in objs) for e in extra)


def check_long(text: str, objs) -> None:
    sents = [s.strip() for s in text.split(".") if s.strip()]
    n = len(objs)
    assert sents[0] == ("there is one shape" if n == 1 else f"there are {NUM[n]} shapes")
    obj_sents = [s for s in sents[1:] if s.startswith("a ")]
    rel_sents = [s for s in sents[1:] if s.startswith("the ")]
    assert len(obj_sents) + len(rel_sents) == len(sents) - 1
    seen = set()
    for s in obj_sents:
        m = re.fullmatch(rf"a (small|large) ({C}) ({S}) at the (.+)", s)
        hit = [o for o in objs if (o.size, o.colour, o.shape, (o.row, o.col))
               == (m[1], m[2], m[3], POS[m[4]])]
        assert len(hit) == 1, s
        seen.add(id(hit[0]))
    assert len(seen) == n  # every object described
    n_rel = 0
    for s in rel_sents:
        m = re.fullmatch(rf"the ({C}) ({S}) is ({REL_RE}) the ({C}) ({S})", s)
        a = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])][0]
        b = [o for o in objs if (o.colour, o.shape) == (m[4], m[5])][0]
        assert holds(a, REL[m[3]], b), s
        n_rel += 1
    expect = sum((a.col != b.col) + (a.row != b.row) for i, a in enumerate(objs) for b in objs[i + 1:])
    assert n_rel == expect  # every relation stated


def answer_of(q: str, objs) -> str:
    if q == "how many shapes are there?":
        return NUM[len(objs)]
    if m := re.fullmatch(rf"what colour is the ({S})\?", q):
        return [o.colour for o in objs if o.shape == m[1]][0]
    if m := re.fullmatch(rf"what shape is the ({C}) object\?", q):
        return [o.shape for o in objs if o.colour == m[1]][0]
    if m := re.fullmatch(rf"what size is the ({C}) ({S})\?", q):
        return [o.size for o in objs if (o.colour, o.shape) == (m[1], m[2])][0]
    if m := re.fullmatch(rf"is the ({C}) ({S}) (left or right of|above or below) the ({C}) ({S})\?", q):
        a = [o for o in objs if (o.colour, o.shape) == (m[1], m[2])][0]
        b = [o for o in objs if (o.colour, o.shape) == (m[4], m[5])][0]
        opts = ("left", "right") if m[3].startswith("left") else ("above", "below")
        hits = [r for r in opts if holds(a, r, b)]
        assert len(hits) == 1, q
        return hits[0]
    if m := re.fullmatch(rf"which (row|column) is the ({C}) ({S}) in\?", q):
        o = [o for o in objs if (o.colour, o.shape) == (m[2], m[3])][0]
        return ("top", "center", "bottom")[o.row] if m[1] == "row" else ("left", "center", "right")[o.col]
    if m := re.fullmatch(rf"is there a ({C}) ({S}) in the image\?", q):
        return "yes" if any((o.colour, o.shape) == (m[1], m[2]) for o in objs) else "no"
    raise AssertionError(f"unknown question {q!r}")


def differs_as(cat: str, pos: str, neg: str) -> bool:
    (p1, pr, p2, pe), (n1, nr, n2, ne) = parse(pos), parse(neg)
    nps_p, nps_n = [p1, p2], [n1, n2]
    changed = [k for k in range(2) if nps_p[k] != nps_n[k]]
    same_frame = pr == nr and pe == ne
    if cat in ("replace_att", "replace_obj", "add_att"):
        if not (same_frame and len(changed) == 1):
            return False
        (pz, pc, ps), (nz, nc, ns) = nps_p[changed[0]], nps_n[changed[0]]
        return {"replace_att": pz == nz and ps == ns and pc != nc,
                "replace_obj": pz == nz and pc == nc and ps != ns,
                "add_att": pz is None and nz is not None and (pc, ps) == (nc, ns)}[cat]
    if cat == "replace_rel":
        return nps_p == nps_n and pe == ne and pr != nr and nr is not None
    if cat in ("swap_att", "swap_obj"):
        if not (same_frame and p2 is not None and len(changed) == 2):
            return False
        k = 1 if cat == "swap_att" else 2  # index of the swapped word in (size, colour, shape)
        keep = 2 if cat == "swap_att" else 1
        return (n1[k], n2[k]) == (p2[k], p1[k]) and (n1[keep], n2[keep]) == (p1[keep], p2[keep]) \
            and n1[0] == p1[0] and n2[0] == p2[0]
    if cat == "add_obj":
        return (n1, nr, n2) == (p1, pr, p2) and ne[:len(pe)] == pe and len(ne) == len(pe) + 1
    raise AssertionError(cat)


# ---- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def train_world():
    return data.make_world("train", 120, 0)


@pytest.fixture(scope="module")
def tok(train_world):
    return data.train_tokenizer(data.world_texts(train_world))


# ---- the world ---------------------------------------------------------------------------------------------
@FAST
@given(seed=st.integers(0, 10**6), split=st.sampled_from(["train", "test"]))
def test_deterministic_per_seed(seed, split):
    a, b = data.make_world(split, 4, seed), data.make_world(split, 4, seed)
    for x, y in zip(a.scenes, b.scenes):
        assert torch.equal(x.image, y.image) and torch.equal(x.cross_image, y.cross_image)
        assert (x.short_caption, x.long_caption, x.vqa, x.pope, x.negatives) == \
               (y.short_caption, y.long_caption, y.vqa, y.pope, y.negatives)
    assert [f.sentence for s in a.stories for f in s] == [f.sentence for s in b.stories for f in s]
    assert [e.name for e in a.kb.entries] == [e.name for e in b.kb.entries]
    assert [w.caption_b for w in a.winoground] == [w.caption_b for w in b.winoground]


@FAST
@given(seed=st.integers(0, 10**6), split=st.sampled_from(["train", "test"]))
def test_captions_answers_negatives_true_false(seed, split):
    w = data.make_world(split, 6, seed)
    for s in w.scenes:
        objs = s.graph.objects
        assert 1 <= len(objs) <= 4
        assert true_of(s.short_caption, objs)
        check_long(s.long_caption, objs)
        for q, a in s.vqa + s.pope:
            assert answer_of(q, objs) == a and len(a.split()) == 1
        answers = [a for _, a in s.pope]
        assert answers.count("yes") == answers.count("no") == len(objs)
        expected_cats = set(data.CATEGORIES) if len(objs) >= 2 else \
            {"replace_att", "replace_obj", "add_obj", "add_att"}
        assert set(s.negatives) == expected_cats
        for cat, neg in s.negatives.items():
            assert not true_of(neg, objs), (cat, neg)
            assert differs_as(cat, s.short_caption, neg), (cat, s.short_caption, neg)


def single_questions(w: data.World, samples: list) -> list[tuple[int, str]]:
    """[image] question answer samples, each checked (loss on the answer only, its scene found by its image, the
    answer right by `answer_of`) -> (scene id, question) for each."""
    got = []
    for x in samples:
        image, q, a = x.segments
        assert image.kind == "image" and not q.loss and a.loss
        m = re.fullmatch(r"question: (.+) answer:", q.text)
        scene = [s for s in w.scenes if s.image is image.image]
        assert m and len(scene) == 1
        assert answer_of(m[1], scene[0].graph.objects) == a.text, m[1]
        got.append((id(scene[0]), m[1]))
    return got


@FAST
@given(seed=st.integers(0, 10**6))
def test_lookup_samples_are_every_colour_and_shape_question_alone(seed):
    w = data.make_world("train", 6, seed)
    got = single_questions(w, data.lookup_samples(w))
    # every "what colour is the <shape>?" / "what shape is the <colour> object?" of every scene, once
    expected = [(id(s), q) for s in w.scenes for q, _ in s.vqa
                if re.fullmatch(rf"what (colour is the ({S})|shape is the ({C}) object)\?", q)]
    assert sorted(got) == sorted(expected)
    assert len(expected) == sum(2 * len(s.graph.objects) for s in w.scenes)


@FAST
@given(seed=st.integers(0, 10**6))
def test_where_samples_are_row_column_relation_twice_and_size_questions_alone(seed):
    w = data.make_world("train", 6, seed)
    got = single_questions(w, data.where_samples(w))
    # per object its row, its column and its size; per pair of objects one relation question, twice
    expected = [(id(s), f"which {axis} is the {o.colour} {o.shape} in?")
                for s in w.scenes for o in s.graph.objects for axis in ("row", "column")]
    expected += [(id(s), f"what size is the {o.colour} {o.shape}?") for s in w.scenes for o in s.graph.objects]
    expected += [(id(s), q) for s in w.scenes for q, _ in s.vqa if q.startswith("is the ")] * 2
    assert sorted(got) == sorted(expected)
    n = [len(s.graph.objects) for s in w.scenes]
    assert len(expected) == sum(3 * k + k * (k - 1) for k in n)


@FAST
@given(seed=st.integers(0, 10**6))
def test_kb_pairs_pair_each_entry_image_with_its_question_and_no_name(seed):
    w = data.make_world("train", 1, seed, image_size=24, n_stories=0, n_winoground=0, n_kb=48)
    pairs = data.kb_pairs(w.kb, 24)
    assert len(pairs) == len(w.kb.entries) == 48
    for i, (p, e) in enumerate(zip(pairs, w.kb.entries)):
        m = re.fullmatch(rf"what is the name of the (small|large) ({C}) ({S})\?", p.short_caption)
        assert m and (m[1], m[2], m[3]) == (e.obj.size, e.obj.colour, e.obj.shape)
        assert (p.short_caption, e.name) in w.kb.questions
        assert torch.equal(p.image, e.image)  # the image eval.py retrieves for this question
        assert e.name not in p.short_caption + p.long_caption
        check_long(p.long_caption, [e.obj])
        # the caption's teacher feature is nearest to its own entry's image feature
        sims = torch.stack([q.cross_image for q in pairs]) @ p.cross_short
        assert int(sims.argmax()) == i


@FAST
@given(seed=st.integers(0, 10**6))
def test_winoground_and_stories(seed):
    w = data.make_world("test", 8, seed)
    for p in w.winoground:
        a, b = p.graph_a.objects, p.graph_b.objects
        assert true_of(p.caption_a, a) and true_of(p.caption_b, b)
        assert not true_of(p.caption_a, b) and not true_of(p.caption_b, a)
        assert sorted(p.caption_a.split()) == sorted(p.caption_b.split()) and p.caption_a != p.caption_b
        assert not torch.equal(p.image_a, p.image_b)
    for story in w.stories:
        assert len(story) == 4
        for prev, cur in zip(story.frames, story.frames[1:]):
            objs = cur.graph.objects
            s = cur.sentence
            if m := re.fullmatch(rf"a (small|large) ({C}) ({S}) appears at the (.+)\.", s):
                assert len(objs) == len(prev.graph.objects) + 1
                assert any((o.size, o.colour, o.shape, (o.row, o.col)) == (m[1], m[2], m[3], POS[m[4]])
                           for o in objs)
            elif m := re.fullmatch(rf"the ({C}) ({S}) moves to the (.+)\.", s):
                assert any((o.colour, o.shape, (o.row, o.col)) == (m[1], m[2], POS[m[3]]) for o in objs)
            else:
                m = re.fullmatch(rf"the ({C}) ({S}) turns ({C})\.", s)
                assert m and any((o.colour, o.shape) == (m[3], m[2]) for o in objs)
                assert not any((o.colour, o.shape) == (m[1], m[2]) for o in objs)
            image, sentence = cur
            assert image.shape == (3, 32, 32) and sentence == s


@FAST
@given(seed=st.integers(0, 10**6), kind=st.sampled_from(["swap_obj", "swap_att"]))
def test_twin_scene_is_a_winoground_pair_of_its_scene(seed, kind):
    """Fine-tuning's hard-negative twins: the two objects the caption names trade places / colours and nothing
    else changes; each caption is true of its own scene and false of the other, with the same words; the
    twin is a whole scene (image, long caption, answers) and never a test-split graph."""
    w = data.make_world("train", 16, seed)
    for s in w.scenes:
        twin = data.twin_scene(s, kind, w.image_size)
        first, rel, second, _ = parse(s.short_caption)
        if rel is None:
            assert twin is None
            continue
        objs = s.graph.objects
        a = next(o for o in objs if matches(o, first))
        b = next(o for o in objs if matches(o, second))
        if kind == "swap_obj":
            moved = {id(a): dataclasses.replace(a, row=b.row, col=b.col),
                     id(b): dataclasses.replace(b, row=a.row, col=a.col)}
        else:
            moved = {id(a): dataclasses.replace(a, colour=b.colour), id(b): dataclasses.replace(b, colour=a.colour)}
        expected = data.SceneGraph([moved.get(id(o), o) for o in objs])
        if twin is None:
            assert data.graph_split(expected) == "test"
            continue
        assert data.canonical(twin.graph) == data.canonical(expected) and data.graph_split(expected) == "train"
        t_objs = twin.graph.objects
        assert true_of(twin.short_caption, t_objs) and not true_of(twin.short_caption, objs)
        assert not true_of(s.short_caption, t_objs)
        assert sorted(twin.short_caption.split()) == sorted(s.short_caption.split())
        assert twin.short_caption != s.short_caption
        assert torch.equal(twin.image, data.render(expected, w.image_size))
        check_long(twin.long_caption, t_objs)
        for q, ans in twin.vqa + twin.pope:
            assert answer_of(q, t_objs) == ans
    with pytest.raises(ValueError, match="kind must be"):
        data.twin_scene(w.scenes[0], "swap_size", w.image_size)


def rendered_graphs(world):
    """Every scene graph a world renders an image of, KB entries aside (the same 48 in every KB by design)."""
    return ([s.graph for s in world.scenes] + [f.graph for st in world.stories for f in st.frames]
            + [g for w in world.winoground for g in (w.graph_a, w.graph_b)])


def test_train_test_disjoint_and_rag_names(train_world):
    """No image of the test world is an image of the training world: scenes, story frames and Winoground
    pairs alike (training stories once showed test scenes)."""
    test = data.make_world("test", 120, 0)
    key = lambda g: tuple(sorted((o.shape, o.colour, o.size, o.row, o.col) for o in g.objects))  # noqa: E731
    assert len(test.stories) == 30 and len(test.winoground) == 30
    assert not {key(g) for g in rendered_graphs(train_world)} & {key(g) for g in rendered_graphs(test)}
    words = set(" ".join(data.world_texts(train_world)).replace(".", " ").replace("?", " ").split())
    test_names = {e.name for e in test.kb.entries}
    assert test_names and not test_names & words
    assert not any(n in t for n in test_names for t in data.world_texts(train_world))
    for (q, name), e in zip(test.kb.questions, test.kb.entries):
        assert name == e.name and name in e.description.split(" ")[-1]
        assert q == f"what is the name of the {e.obj.size} {e.obj.colour} {e.obj.shape}?"


def test_rag_answer_tokens_occur_in_the_description():
    """Answering a RAG question is copying: the answer's tokens (as collate encodes an answer after the
    question, with a leading space) are a contiguous run of the description's tokens, with the tokenizer of
    the world's texts, for test names never seen in training."""
    tok = data.train_tokenizer(data.world_texts(data.make_world("train", 200, 0)), 1024)
    for e in data.make_world("test", 40, 0).kb.entries:
        ans = tok.encode(data.segment_text(e.name, after_text=True))
        ctx = tok.encode(e.description)
        assert any(ctx[i:i + len(ans)] == ans for i in range(len(ctx))), (e.description, ans, ctx)


def test_images_render_the_graph():
    w = data.make_world("train", 20, 3)
    for s in w.scenes:
        img = s.image
        assert img.shape == (3, 32, 32) and 0 <= img.min() and img.max() <= 1
        # the cell centre has the object's colour (all our shapes cover their centre)
        for o in s.graph.objects:
            y, x = int((o.row + 0.5) * 32 / 3), int((o.col + 0.5) * 32 / 3)
            want = torch.tensor(data.COLOURS[o.colour], dtype=torch.float32) / 255
            assert (img[:, y, x] - want).abs().max() < 0.15


# Rendered size and shape, from data.py's description of the drawing: objects centred in their cell of a 3x3
# grid, "~14 px (large) / ~9 px (small) wide" of a 16-px cell, i.e. 0.9 and 0.56 of a cell; a square fills
# its box, a circle is inscribed in it (pi/4 of it), a triangle has the box's bottom edge as base and its top
# centre as apex (1/2 of it, centroid a sixth of the box below its centre), a cross is two bars across the box
# (with arms 1/4 to 1/2 of the box wide, 2a - a^2: 7/16 to 3/4 of it).
WIDTH = {"large": 0.9, "small": 0.56}  # of a cell
FILL = {"square": (1.0, 1.0), "circle": (math.pi / 4, math.pi / 4), "triangle": (0.5, 0.5),
        "cross": (7 / 16, 3 / 4)}  # area / box area, (at least, at most)
PERIMETER = {"square": 4.0, "circle": math.pi, "triangle": 1 + 5 ** 0.5, "cross": 4.0}  # of a box of width 1


def coverage(img: torch.Tensor, colour: str) -> torch.Tensor:
    """(3, H, W) -> (H, W): the fraction of each pixel the object covers, read off the channel where the
    colour differs most from the background (the box filter mixes the two linearly)."""
    bg = torch.tensor(data.BACKGROUND) / 255
    col = torch.tensor(data.COLOURS[colour]) / 255
    c = int((col - bg).abs().argmax())
    return (img[c] - bg[c]) / (col[c] - bg[c])


@pytest.mark.parametrize("image_size", [32, 40, 64])
def test_rendered_area_box_and_centroid(image_size):
    # Drawn at SUPERSAMPLE x and box-filtered, so the coverage summed over the pixels is the area of the 4x
    # raster in output pixels (up to the 1/255 rounding). Each edge of that raster lies within one 4x pixel,
    # d = 1/4 output px, of the true edge (vertices rounded to the grid, boundary pixels filled), so the area
    # is within perimeter * d (+ 4 d^2 at corners) of the true area and the centroid within d of the true one.
    d = 1 / data.SUPERSAMPLE
    cell = image_size / data.GRID
    yy, xx = torch.meshgrid(torch.arange(image_size) + 0.5, torch.arange(image_size) + 0.5, indexing="ij")
    areas = {}
    for shape in data.SHAPES:
        for size in data.SIZES:
            for row, col in data.POSITIONS:
                img = data.render(data.SceneGraph([data.Obj(shape, "blue", size, row, col)]), image_size)
                assert img.shape == (3, image_size, image_size)
                cov = coverage(img, "blue")
                assert float(cov.min()) > -0.01 and float(cov.max()) < 1.01
                w = WIDTH[size] * cell
                area = float(cov.sum())
                lo, hi = FILL[shape]
                slack = PERIMETER[shape] * w * d + 4 * d * d
                where = (shape, size, row, col, area, w * w)
                assert lo * w * w - slack <= area <= hi * w * w + slack, where
                ys, xs = torch.nonzero(cov > 0.01, as_tuple=True)  # the box: every pixel the object touches
                for first, last, centre in ((ys.min(), ys.max(), (row + 0.5) * cell),
                                            (xs.min(), xs.max(), (col + 0.5) * cell)):
                    # each side in the pixel holding the true edge (or one 4x pixel off it)
                    assert centre - w / 2 - 1 - d < float(first) <= centre - w / 2 + d, where
                    assert centre + w / 2 - d <= float(last) + 1 < centre + w / 2 + 1 + d, where
                cy, cx = float((cov * yy).sum()) / area, float((cov * xx).sum()) / area
                drop = w / 6 if shape == "triangle" else 0.0  # a triangle's centroid: 2/3 of the way down
                assert abs(cx - (col + 0.5) * cell) <= d, (where, cx)
                assert abs(cy - (row + 0.5) * cell - drop) <= d, (where, cy)
                areas.setdefault((shape, size), []).append(area)
    for shape in data.SHAPES:  # a small object is smaller than a large one of the same shape everywhere
        assert max(areas[shape, "small"]) < min(areas[shape, "large"])


def test_teacher_features(train_world):
    sc = train_world.scenes
    for s in sc:
        for v in (s.uni_image, s.cross_image, s.uni_short, s.cross_short):
            assert v.shape[-1] in (train_world.uni_dim, train_world.cross_dim)
            assert abs(float(v.norm()) - 1) < 1e-5
        assert torch.equal(s.cross_long, s.cross_image)
    img = torch.stack([s.cross_image for s in sc])
    txt = torch.stack([s.cross_short for s in sc])
    sim = img @ txt.T  # (N, N)
    # the matching caption is the best of all captions for most images (retrieval R@1 of the teacher)
    assert (sim.argmax(1) == torch.arange(len(sc))).float().mean() > 0.6
    assert sim.diag().mean() > sim.mean() + 0.3
    # similar scenes: the same graph gives the same uni feature; one changed object keeps it close
    g = sc[0].graph
    moved = data.SceneGraph([data.Obj(g.objects[0].shape, g.objects[0].colour, g.objects[0].size,
                                      (g.objects[0].row + 1) % 3, g.objects[0].col)] + g.objects[1:])
    unrelated = torch.stack([s.uni_image for s in sc[1:]])
    near = float(data.uni_image_features(moved) @ sc[0].uni_image)
    assert near > float((unrelated @ sc[0].uni_image).mean()) + 0.2


# ---- tokenizer ---------------------------------------------------------------------------------------------
def test_tokenizer_words_single_tokens_and_roundtrip(tok, train_world, tmp_path):
    names = {e.name for e in train_world.kb.entries}
    for t in data.world_texts(train_world):
        # every word and punctuation mark: one token
        if not any(n in t for n in names) and "Summarize" not in t:
            assert len(tok.encode(t)) == len(re.findall(r"\w+|[^\w\s]", t)), t
    for a in {a for s in train_world.scenes for _, a in s.vqa + s.pope}:  # answers as collate encodes them
        assert len(tok.encode(data.segment_text(a, after_text=True))) == 1, a
    for t in data.world_texts(train_world)[:200]:
        assert tok.decode(tok.encode(t)) == t
    assert len({tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id, tok.soft_image_id, tok.soft_text_id}) == 6
    tok2 = data.Tokenizer.from_str(tok.to_str())
    assert tok2.encode("a red square") == tok.encode("a red square") and tok2.vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="special token"):
        tok.encode("look <image> here")


def test_load_tokenizer_adds_specials(tmp_path):
    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers
    hf = HF(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.train_from_iterator(["a red square", "a blue circle"] * 5,
                           trainers.BpeTrainer(special_tokens=["<unk>", "<s>"]))
    p = tmp_path / "tokenizer.json"
    hf.save(str(p))
    t = data.load_tokenizer(p)
    assert t.bos_id == hf.token_to_id("<s>")  # an existing special keeps its id
    assert t.vocab_size == hf.get_vocab_size() + 5
    assert t.encode("a red square") == hf.encode("a red square").ids
    with pytest.raises(ValueError, match="does not exist"):
        data.load_tokenizer(tmp_path / "nope.json")


# ---- collate -----------------------------------------------------------------------------------------------
seg_strategy = st.one_of(
    st.tuples(st.just("image"), st.booleans()),
    st.tuples(st.sampled_from(["a red square", "what colour is the circle?", "blue", "the cross moves."]),
              st.booleans()))


@settings(max_examples=25, deadline=None)
@given(specs=st.lists(st.lists(seg_strategy, min_size=1, max_size=6), min_size=1, max_size=4),
       data_=st.data())
def test_collate_invariants(tok, specs, data_):
    n_img = 4
    samples, expected = [], []
    for spec in specs:
        segs, ids, labs = [], [tok.bos_id], [-100]
        for k, (what, flag) in enumerate(spec):
            if what == "image":
                segs.append(data.image_seg(torch.rand(3, 8, 8), torch.ones(5) / 5 ** .5, None))
                ids += [tok.image_id] * n_img
                labs += [-100] * n_img
            else:
                segs.append(data.text_seg(what, flag))
                t = tok.encode((" " if k and spec[k - 1][0] != "image" else "") + what)
                ids += t
                labs += t if flag else [-100] * len(t)
            nxt = spec[k + 1] if k + 1 < len(spec) else ("image", False)
            if what != "image" and flag and not (nxt[0] != "image" and nxt[1]):  # eos ends each answer turn
                ids.append(tok.eos_id)
                labs.append(tok.eos_id)
        prefixes = sorted(data_.draw(st.sets(st.integers(0, len(spec) - 1))))
        samples.append(data.Sample(segs, prefixes))
        expected.append((ids, labs))
    b = data.collate(samples, tok, n_img, 512)
    B, T = b["input_ids"].shape
    assert T == max(len(i) for i, _ in expected)
    for r, (ids, labs) in enumerate(expected):
        assert b["input_ids"][r, :len(ids)].tolist() == ids and b["labels"][r, :len(labs)].tolist() == labs
        assert (b["input_ids"][r, len(ids):] == tok.pad_id).all()
        assert (b["labels"][r, len(ids):] == -100).all()
        assert b["attention_mask"][r].sum() == len(ids)
    assert (b["labels"][b["input_ids"] == tok.image_id] == -100).all()
    n_images = sum(w == "image" for spec in specs for w, _ in spec)
    assert (b["images"] is None) == (n_images == 0)
    if n_images:
        assert b["images"].shape[0] == n_images == int((b["input_ids"] == tok.image_id).sum()) // n_img
    # segment boundaries: each segment's tokens are exactly its content
    g = 0
    for r, (smp, spec) in enumerate(zip(samples, specs)):
        for k, (what, _) in enumerate(spec):
            assert b["seg_batch"][g] == r and b["seg_is_image"][g] == (what == "image")
            toks = b["input_ids"][r, b["seg_start"][g]:b["seg_end"][g]].tolist()
            if what == "image":
                assert toks == [tok.image_id] * n_img
                assert b["has_teacher"][g] == False  # noqa: E712 (no cross)
                assert b["slice_uni"][g].sum() > 0
            else:
                assert tok.decode(toks).strip() == what and not b["slice_uni"][g].any()
            g += 1
        # prefixes: global last segment and the slices it covers
    assert g == len(b["seg_batch"])
    first = {r: int((b["seg_batch"] == r).nonzero()[0]) for r in range(B)}
    rows = [(r, p) for r, smp in enumerate(samples) for p in smp.prefixes]
    assert b["prefix_seg"].tolist() == [first[r] + p for r, p in rows]
    assert b["prefix_batch"].tolist() == [r for r, _ in rows]
    for k, (r, p) in enumerate(rows):
        assert b["prefix_len"][k] == p + 1
        assert b["prefix_slices"][k, :p + 1].tolist() == list(range(first[r], first[r] + p + 1))
        assert not b["prefix_slices"][k, p + 1:].any()


def test_collate_errors(tok):
    img = torch.rand(3, 8, 8)
    with pytest.raises(ValueError, match="max_len"):
        data.collate([data.Sample([data.image_seg(img), data.text_seg("a red square", True)])], tok, 16, 10)
    with pytest.raises(ValueError, match="empty"):
        data.collate([data.Sample([data.text_seg("  ", True)])], tok, 4, 64)
    with pytest.raises(ValueError, match="share a size"):
        data.collate([data.Sample([data.image_seg(img), data.image_seg(torch.rand(3, 4, 4))])], tok, 4, 64)
    with pytest.raises(ValueError, match="prefix"):
        data.collate([data.Sample([data.text_seg("a", True)], [3])], tok, 4, 64)


def test_world_builders_collate(tok, train_world):
    n_img = 16
    pre = data.pretrain_samples(train_world)
    b = data.collate(pre[:32], tok, n_img, 512)
    assert b["slice_uni"].shape[1] == train_world.uni_dim
    assert b["slice_cross"].shape[1] == train_world.cross_dim
    st_ = data.story_samples(train_world)
    b = data.collate(st_[:4], tok, n_img, 512)
    assert b["has_teacher"].all() and len(b["prefix_seg"]) == 4 * 8
    assert data.collate(data.rag_samples(train_world), tok, n_img, 512)["images"] is None
    # short captions stay under 30 tokens (VladVA's contrastive captions)
    assert max(len(tok.encode(s.short_caption)) for s in train_world.scenes) < 30


def test_collate_pairs(tok, train_world):
    K = data.n_soft_tokens(tok)
    ia, ta = data.soft_prompt_ids(tok)
    assert len(ia) == len(ta) == K
    assert ia[:len(tok.encode(data.IMAGE_PROMPT))] == tok.encode(data.IMAGE_PROMPT)
    sc = train_world.scenes[:5]
    items = sc[:3] + [(s.image, s.short_caption, s.long_caption) for s in sc[3:]]
    b = data.collate_pairs(items, tok, 16, K, 512)
    for r, s in enumerate(sc):
        ids, lab = b["img_ids"][r].tolist(), b["img_labels"][r].tolist()
        cap = tok.encode(s.long_caption) + [tok.eos_id]
        assert ids[:1 + 16 + K] == [tok.bos_id] + [tok.image_id] * 16 + [tok.soft_image_id] * K
        assert ids[17 + K:17 + K + len(cap)] == cap and lab[17 + K:17 + K + len(cap)] == cap
        assert all(x == -100 for x in lab[:17 + K] + lab[17 + K + len(cap):])
        assert b["img_pos"][r] == 16 + K
        txt = [tok.bos_id] + tok.encode(s.short_caption) + [tok.soft_text_id] * K
        assert b["txt_ids"][r, :len(txt)].tolist() == txt and b["txt_pos"][r] == len(txt) - 1
        assert torch.equal(b["images"][r], s.image)
    with pytest.raises(ValueError, match="max_len"):
        data.collate_pairs(sc[:1], tok, 16, K, 40)


# The batch layout written out by hand from the rules in data.py's docstrings (collate, collate_pairs,
# ends_turn, segment_text), in a word-level vocabulary whose ids are the numbers below (Ġ: a leading space).
VOCAB = ["<pad>", "<s>", "</s>", "<image>", "<soft_image>", "<soft_text>", "<unk>",  # 0..6
         "question", "Ġquestion", ":", "Ġwhat", "Ġcolour", "Ġis", "Ġit", "?", "Ġanswer",  # 7..15
         "Ġred", "Ġhow", "Ġmany", "Ġtwo", "a", "Ġsquare", ".", "Ġa", "Ġblue", "Ġcircle"]  # 16..25
PAD, BOS, EOS, IMG, SOFT_IMG, SOFT_TXT, NO = 0, 1, 2, 3, 4, 5, -100


def literal_tokenizer() -> data.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(data.SPECIALS))
    return data.Tokenizer(tk)


def test_collate_layout_written_out():
    tok = literal_tokenizer()
    im = torch.rand(3, 8, 8)
    vqa = data.Sample([data.image_seg(im), data.text_seg("question: what colour is it? answer:", False),
                       data.text_seg("red", True), data.text_seg("question: how many? answer:", False),
                       data.text_seg("two", True)])
    captions = data.Sample([data.text_seg("a blue circle.", True), data.text_seg("a red square.", True)])
    b = data.collate([vqa, captions], tok, 3, 64)
    # bos, 3 image tokens, the question (no space after an image), the answer with a space (after text) and
    # </s> ending the turn, the next question with a space; only answers and their </s> carry labels
    ids0 = [BOS, IMG, IMG, IMG, 7, 9, 10, 11, 12, 13, 14, 15, 9, 16, EOS, 8, 9, 17, 18, 14, 15, 9, 19, EOS]
    lab0 = [NO] * 13 + [16, EOS] + [NO] * 7 + [19, EOS]
    # two supervised segments in a row are one turn: one </s>, after the second; then right padding
    ids1 = [BOS, 20, 24, 25, 22, 23, 16, 21, 22, EOS] + [PAD] * 14
    lab1 = [NO, 20, 24, 25, 22, 23, 16, 21, 22, EOS] + [NO] * 14
    assert b["input_ids"].tolist() == [ids0, ids1]
    assert b["labels"].tolist() == [lab0, lab1]
    assert b["attention_mask"].tolist() == [[True] * 24, [True] * 10 + [False] * 14]
    # a segment spans its own tokens: bos and </s> belong to no segment
    assert b["seg_batch"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert b["seg_start"].tolist() == [1, 4, 13, 15, 22, 1, 5]
    assert b["seg_end"].tolist() == [4, 13, 14, 22, 23, 5, 9]
    assert b["seg_is_image"].tolist() == [True, False, False, False, False, False, False]
    assert torch.equal(b["images"], im[None])


def test_collate_pairs_layout_written_out():
    tok = literal_tokenizer()
    ims = torch.rand(2, 3, 8, 8)
    b = data.collate_pairs([(ims[0], "a red square.", "a red square. a blue circle."),
                            (ims[1], "a circle.", "a blue circle.")], tok, 3, 2, 64)
    # [bos] <image>*3 <soft_image>*2 long caption </s>: labels on the long caption and </s> only
    head = [BOS, IMG, IMG, IMG, SOFT_IMG, SOFT_IMG]
    assert b["img_ids"].tolist() == [head + [20, 16, 21, 22, 23, 24, 25, 22, EOS],
                                     head + [20, 24, 25, 22, EOS] + [PAD] * 4]
    assert b["img_labels"].tolist() == [[NO] * 6 + [20, 16, 21, 22, 23, 24, 25, 22, EOS],
                                        [NO] * 6 + [20, 24, 25, 22, EOS] + [NO] * 4]
    assert b["img_pos"].tolist() == [5, 5]  # the last <soft_image>
    # [bos] short caption <soft_text>*2, no labels; the summary is read at the last <soft_text>
    assert b["txt_ids"].tolist() == [[BOS, 20, 16, 21, 22, SOFT_TXT, SOFT_TXT],
                                     [BOS, 20, 25, 22, SOFT_TXT, SOFT_TXT, PAD]]
    assert b["txt_pos"].tolist() == [6, 5]
    assert torch.equal(b["images"], ims) and "head_ids" not in b


def test_collate_pairs_with_n_long_cuts_the_other_image_rows_at_their_summary_written_out():
    """train.py --caption-batch: only the first n_long pairs keep their long caption; the image rows of the
    others end at the last <soft_image>, where the summary is read; the text rows cover every pair."""
    tok = literal_tokenizer()
    ims = torch.rand(3, 3, 8, 8)
    b = data.collate_pairs([(ims[0], "a red square.", "a red square. a blue circle."),
                            (ims[1], "a circle.", "a blue circle."),
                            (ims[2], "a blue square.", "a blue square. a red circle.")], tok, 3, 2, 64, n_long=1)
    head = [BOS, IMG, IMG, IMG, SOFT_IMG, SOFT_IMG]
    assert b["img_ids"].tolist() == [head + [20, 16, 21, 22, 23, 24, 25, 22, EOS]]
    assert b["img_labels"].tolist() == [[NO] * 6 + [20, 16, 21, 22, 23, 24, 25, 22, EOS]]
    assert b["img_pos"].tolist() == [5] and torch.equal(b["images"], ims[:1])
    assert b["head_ids"].tolist() == [head, head] and b["head_pos"].tolist() == [5, 5]
    assert torch.equal(b["head_images"], ims[1:])
    assert b["txt_ids"].tolist() == [[BOS, 20, 16, 21, 22, SOFT_TXT, SOFT_TXT],
                                     [BOS, 20, 25, 22, SOFT_TXT, SOFT_TXT, PAD],
                                     [BOS, 20, 24, 21, 22, SOFT_TXT, SOFT_TXT]]
    assert b["txt_pos"].tolist() == [6, 5, 6]
    for bad in (0, 4):
        with pytest.raises(ValueError, match="n_long must be in 1..3"):
            data.collate_pairs([(ims[0], "a circle.", "a blue circle.")] * 3, tok, 3, 2, 64, n_long=bad)


# ---- readers -----------------------------------------------------------------------------------------------
def write_png(path: Path, seed: int) -> torch.Tensor:
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255


@pytest.fixture()
def imgs(tmp_path):
    (tmp_path / "img").mkdir()
    return {f"img/{k}.png": write_png(tmp_path / f"img/{k}.png", k) for k in range(3)}


def test_llava_roundtrip(tmp_path, imgs):
    recs = [{"id": "0", "image": "img/0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a square"}]},
        {"id": "1", "image": ["img/1.png", "img/2.png"], "conversations": [
            {"from": "human", "value": "<image> then <image> compare"}, {"from": "gpt", "value": "same"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    p = tmp_path / "llava.json"
    p.write_text(json.dumps(recs))
    d = data.load_dataset(p)
    assert d.format == "llava" and len(d.samples) == 3
    s0 = d.samples[0].segments
    assert [(s.kind, s.text, s.loss) for s in s0] == [("image", None, False),
                                                      ("text", "What colour is it?", False),
                                                      ("text", "red", True),
                                                      ("text", "And the shape?", False),
                                                      ("text", "a square", True)]
    assert torch.allclose(s0[0].image, imgs["img/0.png"], atol=1 / 255)
    kinds = [(s.kind, s.text) for s in d.samples[1].segments]
    assert kinds == [("image", None), ("text", "then"), ("image", None), ("text", "compare"),
                     ("text", "same")]
    assert torch.allclose(d.samples[1].segments[2].image, imgs["img/2.png"], atol=1 / 255)


def test_llava_questions_are_the_conversation_before_each_answer(tmp_path, imgs):
    recs = [{"image": "img/0.png", "type": "colour", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "a square"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    p = tmp_path / "llava.json"
    p.write_text(json.dumps(recs))
    qs = data.load_dataset(p).questions
    got = [([(s.kind, s.text) for s in q.prompt.segments], q.answer, q.kind, q.type) for q in qs]
    assert got == [([("image", None), ("text", "What colour is it?")], "red", "vqa", "colour"),
                   ([("image", None), ("text", "What colour is it?"), ("text", "red"),
                     ("text", "And the shape?")],
                    "a square", "vqa", "colour"),
                   ([("text", "hi")], "hello", "vqa", None)]
    p.write_text(json.dumps([{**recs[1], "type": 3}]))
    assert [str(x) for x in data.check(p)] == ["record 0: field 'type': a non-empty question type "
                                               "string, got integer"]


def test_pope_roundtrip_and_problems(tmp_path, imgs):
    lines = [{"question_id": 1, "image": "img/0.png", "text": "Is there a cat in the image?", "label": "no"},
             {"question_id": 2, "image": "img/1.png", "text": "Is there a dog?", "label": "Yes"}]
    p = tmp_path / "pope.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    d = data.load_dataset(p)
    assert d.format == "pope" and [(q.answer, q.kind) for q in d.questions] == [("no", "pope"),
                                                                                ("yes", "pope")]
    assert [(s.kind, s.text, s.loss) for s in d.samples[1].segments] == [
        ("image", None, False), ("text", "Is there a dog?", False), ("text", "yes", True)]
    assert torch.allclose(d.questions[1].prompt.segments[0].image, imgs["img/1.png"], atol=1 / 255)
    bad = [{"question_id": 1, "image": "img/nope.png", "text": "Is there?", "label": "no"},
           {"question_id": 2, "image": "img/0.png", "text": "Is there?", "label": "maybe"},
           {"question_id": 3, "image": "img/0.png", "label": "yes"}]
    p.write_text("\n".join(json.dumps(x) for x in bad) + "\n")
    problems = [str(x) for x in data.check(p)]
    assert len(problems) == 3 and "record 1: field 'image'" in problems[0]
    assert problems[1] == "record 2: field 'label': 'yes' or 'no', got 'maybe'"
    assert problems[2] == "record 3: field 'text': a required field 'text' (missing)"


def test_karpathy_roundtrip(tmp_path, imgs):
    root = {"dataset": "coco", "images": [
        {"filepath": "img", "filename": "0.png", "split": "test",
         "sentences": [{"raw": "A dog."}, {"raw": "A pet"}]},
        {"filename": "img/1.png", "split": "restval", "sentences": [{"raw": "A cat."}]}]}
    p = tmp_path / "karpathy.json"
    p.write_text(json.dumps(root))
    d = data.load_dataset(p)
    assert d.format == "karpathy" and len(d.pairs) == 2 and len(d.samples) == 3
    assert d.pairs[0].captions == ["A dog.", "A pet"] and d.pairs[0].short_caption == "A dog."
    assert d.pairs[0].long_caption == "A dog. A pet."
    assert torch.allclose(d.pairs[1].image, imgs["img/1.png"], atol=1 / 255)
    assert [p_.split for p_ in data.load_dataset(p, split="train").pairs] == ["restval"]


def test_mmc4_and_features_roundtrip(tmp_path, imgs):
    docs = [{"text_list": ["first sentence.", "second one."], "image_info": [
        {"image_name": "img/0.png", "matched_text_index": 1},
        {"image_name": "img/1.png", "matched_text_index": 0}]}]
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in docs) + "\n")
    unit = lambda k, d: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(d, generator=torch.Generator().manual_seed(k)), dim=0)
    feats = {data.feature_key("image", "img/0.png"): (unit(0, 6), unit(1, 4)),
             data.feature_key("text", "second one."): (unit(2, 6), unit(3, 4))}
    fp = tmp_path / "feats.safetensors"
    data.save_features(fp, feats)
    d = data.load_dataset(p, features=fp)
    segs = d.samples[0].segments
    assert [(s.kind, s.text) for s in segs] == [("image", None), ("text", "first sentence."), ("image", None),
                                                ("text", "second one.")]
    assert d.samples[0].prefixes == [0, 1, 2, 3]
    assert torch.allclose(segs[0].image, imgs["img/1.png"], atol=1 / 255)
    assert segs[0].uni is None
    assert torch.equal(segs[2].uni, unit(0, 6)) and torch.equal(segs[3].cross, unit(3, 4))
    assert data.load_dataset(fp).format == "features" and data.check(fp) == []


def test_sugarcrepe_roundtrip(tmp_path, imgs):
    recs = {"0": {"filename": "img/0.png", "caption": "a dog on grass", "negative_caption": "a grass on dog"}}
    p = tmp_path / "swap_obj.json"
    p.write_text(json.dumps(recs))
    d = data.load_dataset(p)
    assert d.format == "sugarcrepe" and len(d.negatives) == 1
    n = d.negatives[0]
    assert (n.positive, n.negative, n.category) == ("a dog on grass", "a grass on dog", "swap_obj")
    assert torch.allclose(n.image, imgs["img/0.png"], atol=1 / 255)


def test_winoground_roundtrip(tmp_path, imgs):
    recs = [{"id": 0, "image_0": "img/0.png", "image_1": "img/1.png", "caption_0": "a mug in some grass",
             "caption_1": "some grass in a mug ", "tag": "Object"},
            {"image_0": "img/2.png", "image_1": "img/0.png", "caption_0": "a dog bites a man",
             "caption_1": "a man bites a dog"}]
    p = tmp_path / "examples.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    d = data.load_dataset(p)
    assert d.format == "winoground" and not d.samples and data.check(p) == []
    assert [(w.caption_0, w.caption_1) for w in d.winoground] == [
        ("a mug in some grass", "some grass in a mug"), ("a dog bites a man", "a man bites a dog")]
    for w, (i0, i1) in zip(d.winoground, [("img/0.png", "img/1.png"), ("img/2.png", "img/0.png")]):
        assert torch.allclose(w.image_0, imgs[i0], atol=1 / 255)
        assert torch.allclose(w.image_1, imgs[i1], atol=1 / 255)
    assert "a man bites a dog" in data.data_texts(d)  # a tokenizer trained on --data covers its captions


def test_every_problem_reported_at_once(tmp_path, imgs, tok):
    (tmp_path / "img/bad.png").write_bytes(b"not a png at all")
    (tmp_path / "img/dir.png").mkdir()
    recs = [
        {"image": "img/missing.png", "conversations": [{"from": "human", "value": "<image> hi"},
                                                       {"from": "gpt", "value": "x"}]},           # 0 missing
        {"image": "img/bad.png", "conversations": [{"from": "human", "value": "<image> hi"},
                                                   {"from": "gpt", "value": "x"}]},               # 1 corrupt
        {"image": "img/0.png"},                                                                   # 2 no field
        {"image": "img/0.png",
         "conversations": "hello"},                                         # 3 wrong type
        {"image": "img/0.png", "conversations": [{"from": "human", "value": "no placeholder"},
                                                 {"from": "gpt", "value": "x"}]},                 # 4 count
        {"conversations": [{"from": "human", "value": "  "},
                           {"from": "gpt", "value": "x"}]},     # 5 empty text
        {"conversations": [{"from": "human", "value": "red " * 300},
                           {"from": "gpt", "value": "x"}]},  # 6 too long
        {"image": "img/dir.png", "conversations": [{"from": "human", "value": "<image> hi"},
                                                   # 7 unreadable
                                                   {"from": "gpt", "value": "x"}]},
        {"image": "img/1.png", "conversations": [{"from": "human", "value": "<image> fine"},
                                                 {"from": "gpt", "value": "ok"}]}]                # 8 fine
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(recs))
    probs = data.check(p, tok, n_image_tokens=16, max_len=128)
    got = {(pr.index, pr.field): pr.expected for pr in probs}
    assert "missing image" in got[(0, "image[0]")]
    assert "corrupt image" in got[(1, "image[0]")]
    assert "missing" in got[(2, "conversations")]
    assert "type list" in got[(3, "conversations")]
    assert "placeholder" in got[(4, "conversations")]
    assert "non-empty" in got[(5, "conversations[0].value")]
    assert "at most 128 tokens" in got[(6, "<sample>")]
    assert "unreadable image" in got[(7, "image[0]")]
    assert not any(pr.index == 8 for pr in probs)
    with pytest.raises(data.DataError) as e:
        data.load_dataset(p, tok=tok, max_len=128)
    assert len(e.value.problems) == len(probs) and "record 4" in str(e.value)
    # MMC4 / Karpathy / SugarCrepe / features errors
    q = tmp_path / "bad.jsonl"
    q.write_text('{"text_list": ["a"], "image_info": [{"image_name": "img/0.png", '
                 '"matched_text_index": 5}]}\n'
                 "{broken\n" + '{"image_info": []}\n')
    got = {(pr.index, pr.field) for pr in data.check(q, tok)}
    assert got == {(1, "image_info[0].matched_text_index"), (2, "<line>"), (3, "text_list")}  # lines
    k = tmp_path / "k.json"
    k.write_text(json.dumps({"images": [{"filename": "img/0.png", "sentences": [{"raw": ""}]},
                                        {"filename": 3}]}))
    assert {(pr.index, pr.field) for pr in data.check(k, tok)} == {(0, "sentences[0].raw"), (1, "filename"),
                                                                   (1, "sentences")}
    s = tmp_path / "sc.json"
    s.write_text(json.dumps([{"filename": "img/0.png", "caption": "x"}]))
    assert [(pr.index, pr.field) for pr in data.check(s, tok)] == [(0, "negative_caption")]
    f = tmp_path / "f.safetensors"
    data.save_features(f, {"image:a.png": (torch.ones(3), torch.ones(2) / 2 ** .5)})
    assert [(pr.index, pr.field) for pr in data.check(f)] == [("image:a.png.uni", "uni")]
    g = tmp_path / "garbage.safetensors"
    g.write_bytes(b"\x00" * 5)
    assert data.check(g)[0].field == "<root>"


def test_check_cli(tmp_path, imgs):
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"image": "img/0.png", "conversations": [
        {"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "red"}]}]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "img/nope.png", "conversations": [{"from": "human", "value": ""}]}]))
    run = lambda p: subprocess.run([sys.executable, str(ROOT / "data.py"), "check", str(p)],  # noqa: E731
                                   capture_output=True, text=True, cwd=ROOT, timeout=120)
    r = run(good)
    assert r.returncode == 0 and "OK" in r.stdout
    r = run(bad)
    assert r.returncode == 1
    assert "record 0" in r.stdout and "missing image" in r.stdout and "non-empty" in r.stdout
