"""eval.py's suites on stand-ins whose scores are known: the teacher-feature embedder (the oracle row) against
an independent loop over the world's features, random embeddings (an anti-oracle) at chance, a generator
that answers every VQA / POPE question from the scene it is shown, which must score 1.0, and for RAG a
generator that copies the name out of the knowledge-base entry in its prompt (1.0 with the right entry, the
retrieval hit rate with retrieved ones) against one that always says the same wrong name (0). These tell "the
model cannot" from "the pipeline cannot"."""
from __future__ import annotations

import itertools
import random
import re
import sys
from pathlib import Path
from types import SimpleNamespace


import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import eval as E  # noqa: E402

TEACHER = {"pairs": "teacher", "interleaved": "teacher"}


@pytest.fixture(scope="module")
def world() -> data.World:
    return data.make_world("test", 40, 1)


def pessimistic_recall_at_1(scores: list[list[float]], positive: list[list[bool]]) -> float:
    """A hit when a positive scores strictly above every negative (ties count against the query)."""
    hits = 0
    for s, p in zip(scores, positive):
        best_neg = max((v for v, ok in zip(s, p) if not ok), default=float("-inf"))
        hits += any(ok and v > best_neg for v, ok in zip(s, p))
    return hits / len(scores)


def meaning(caption: str) -> tuple:
    """What a short caption says, read off its words: "a C S", or "a C1 S1 <relation> a C2 S2" with the
    relation turned to left-of / above, so that a caption read the other way round says the same."""
    words = caption.split()
    if len(words) == 3:
        return (words[1], words[2])
    first, second, rel = (words[1], words[2]), (words[-2], words[-1]), " ".join(words[3:-3])
    flip = {"to the right of": "to the left of", "below": "above"}
    return (second, flip[rel], first) if rel in flip else (first, rel, second)


def test_teacher_embedder_matches_a_loop_over_the_world_features():
    world = data.make_world("test", 200, 1)  # eval.py's test draw, which holds paraphrased captions
    got = E.eval_discriminative(world, E.TeacherEmbedder(), TEACHER)
    scenes = world.scenes
    dot = lambda a, b: float((a.double() * b.double()).sum())  # noqa: E731
    same = [[meaning(a.short_caption) == meaning(b.short_caption) for b in scenes] for a in scenes]
    assert any(a.short_caption != b.short_caption for a, b in itertools.combinations(scenes, 2)
               if meaning(a.short_caption) == meaning(b.short_caption))  # the suite holds such paraphrases
    i2t = [[dot(a.cross_image, b.cross_short) for b in scenes] for a in scenes]
    assert got["retrieval/i2t_r1"] == pytest.approx(pessimistic_recall_at_1(i2t, same))
    t2i = [[dot(a.cross_short, b.cross_image) for b in scenes] for a in scenes]
    assert got["retrieval/t2i_r1"] == pytest.approx(pessimistic_recall_at_1(t2i, same))
    # SugarCrepe-style: the image's cosine with its caption's features above that with the negative's
    for cat in data.CATEGORIES:
        right = [dot(s.cross_image, data.cross_features(data.cross_facts_phrase(s.phrase)))
                 > dot(s.cross_image, data.cross_features(data.cross_facts_phrase(neg)))
                 for s in scenes for c, neg in s.negative_phrases.items() if c == cat]
        if right:
            assert got[f"compositional/{cat}"] == pytest.approx(sum(right) / len(right)), cat
    assert got["retrieval/i2t_r10"] >= got["retrieval/i2t_r1"]


def test_random_embeddings_score_at_chance(world):
    g = torch.Generator().manual_seed(0)

    def anti_oracle(samples, kind, side):
        return torch.nn.functional.normalize(torch.randn(len(samples), 64, generator=g), dim=-1)

    got = E.eval_discriminative(world, anti_oracle, TEACHER)
    n_comp = sum(len(s.negative_phrases) for s in world.scenes)
    assert abs(got["compositional/mean"] - 0.5) < 4 * (0.25 / n_comp) ** 0.5 + 0.1, got
    assert got["retrieval/i2t_r1"] < 0.2 and got["retrieval/t2i_r1"] < 0.2, got
    assert got["winoground/group"] < 0.5, got


def test_a_generator_that_reads_the_scene_scores_vqa_and_pope_one(world):
    texts = [data.format_question(q) + " " + a for s in world.scenes for q, a in s.vqa + s.pope]
    tok = data.train_tokenizer(texts, 400)
    answers = {(s.image.numpy().tobytes(), data.format_question(q)): a
               for s in world.scenes for q, a in s.vqa + s.pope}

    class SceneReader:  # what generate_answers needs of an MLLM, answering from the scene graph
        n_image_tokens = 4
        cfg = SimpleNamespace(llm=SimpleNamespace(max_seq_len=128))

        def generate(self, ids, images, max_new_tokens, eos_id):
            rows = []
            for row, image in zip(ids.tolist(), images):
                question = tok.decode([t for t in row if t != tok.image_id]).strip()
                rows.append(tok.encode(" " + answers[(image.numpy().tobytes(), question)]) + [eos_id])
            width = max(map(len, rows))
            return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])

    got = E.eval_vqa_pope(world, SceneReader(), tok, torch.device("cpu"), 16)
    assert got["vqa/acc"] == 1.0 and got["pope/acc"] == 1.0, got
    assert got["vqa/relation_left_right"] == got["vqa/relation_above_below"] == 1.0, got


def test_a_generator_that_reads_one_axis_scores_it_alone(world):
    """Right about left / right, always "above" when asked above or below: the per-axis relation scores are 1
    and the share of "above" among the vertical questions, counted here off the scene graphs."""
    relations = [(s.image, q) for s in world.scenes for q, _ in s.vqa if q.startswith("is the ")]
    texts = [data.format_question(q) + " " + a for s in world.scenes for q, a in s.vqa + s.pope]
    tok = data.train_tokenizer(texts + ["answer: above"], 400)
    colours, shapes = "|".join(data.COLOURS), "|".join(data.SHAPES)
    pattern = re.compile(rf"question: is the ({colours}) ({shapes}) (left or right of|above or below) "
                         rf"the ({colours}) ({shapes})\? answer:")
    graphs = {s.image.numpy().tobytes(): s.graph for s in world.scenes}
    above, vertical = 0, 0

    class OneAxis:
        n_image_tokens = 4
        cfg = SimpleNamespace(llm=SimpleNamespace(max_seq_len=128))

        def generate(self, ids, images, max_new_tokens, eos_id):
            rows = []
            for row, image in zip(ids.tolist(), images):
                m = pattern.fullmatch(tok.decode([t for t in row if t != tok.image_id]).strip())
                if m is None:  # not a relation
                    rows.append([eos_id])
                    continue
                g = graphs[image.numpy().tobytes()]
                a, b = g.find(m[1], m[2]), g.find(m[4], m[5])
                said = ("left" if a.col < b.col else "right") if m[3].startswith("left") else "above"
                rows.append(tok.encode(" " + said) + [eos_id])
            width = max(map(len, rows))
            return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])

    for image, q in relations:
        if "above or below" in q:
            m = pattern.fullmatch(data.format_question(q))
            g = graphs[image.numpy().tobytes()]
            vertical += 1
            above += g.find(m[1], m[2]).row < g.find(m[4], m[5]).row
    records = []  # eval.py --answers
    got = E.eval_vqa_pope(world, OneAxis(), tok, torch.device("cpu"), 16, records)
    assert vertical > 0 and 0 < above < vertical
    assert got["vqa/relation_left_right"] == 1.0 and got["vqa/relation_above_below"] == above / vertical, got
    assert len(records) == sum(len(s.vqa) + len(s.pope) for s in world.scenes)
    asked = [r for r in records if "above or below" in r["question"]]
    assert len(asked) == vertical and sum(r["correct"] for r in asked) == above
    assert all(r["generated"] == "above" and r["type"] == "relation" for r in asked)


# ---- RAG: a stand-in copies names out of the knowledge-base entries a set ranking retrieves ----
NAMED = re.compile(r"the (\w+ \w+ \w+) is called (\w+)\.")  # "the <size colour shape> is called <name>."
ASKED = re.compile(r"what is the name of the (\w+ \w+ \w+)\?")


class EntryCopier:
    """What generate_answers needs of an MLLM: it answers a name question by copying the name out of the
    context entry that describes the object asked about, else out of the last entry (the one next to the
    question), and says nothing (</s> at once) when the prompt has no entry. `fixed`: always answer that."""
    n_image_tokens = 4
    cfg = SimpleNamespace(llm=SimpleNamespace(max_seq_len=128))

    def __init__(self, tok: data.Tokenizer, fixed: str | None = None) -> None:
        self.tok, self.fixed = tok, fixed

    def answer(self, prompt: str) -> str:
        if self.fixed is not None:
            return self.fixed
        entries = NAMED.findall(prompt)
        if not entries:
            return ""
        asked = ASKED.search(prompt).group(1)
        return next((name for obj, name in entries if obj == asked), entries[-1][1])

    def generate(self, ids, images, max_new_tokens, eos_id):
        assert images is None  # RAG prompts are text only
        rows = []
        for row in ids.tolist():
            said = self.answer(self.tok.decode(row))
            rows.append((self.tok.encode(" " + said) if said else [])[:max_new_tokens - 1] + [eos_id])
        width = max(map(len, rows))
        return torch.tensor([r + [eos_id] * (width - len(r)) for r in rows])


def ranked_embedder(world: data.World, runner_up: set[int]):
    """Entry images embed as one-hot vectors; question n embeds on its own entry, except for n in `runner_up`,
    where it embeds closer to entry n+1 and ranks its own entry second: retrieval@1 = 1 - |runner_up| / E."""
    entries = world.kb.entries
    index = {e.image.numpy().tobytes(): i for i, e in enumerate(entries)}
    asked = {q: n for n, (q, _) in enumerate(world.kb.questions)}
    eye = torch.eye(len(entries))

    def embed(samples, kind, side):
        if side == "image":
            return eye[[index[s.segments[0].image.numpy().tobytes()] for s in samples]]
        out = []
        for s in samples:
            n = asked[s.segments[0].text]
            v = eye[(n + 1) % len(entries)] + 0.5 * eye[n] if n in runner_up else eye[n]
            out.append(torch.nn.functional.normalize(v, dim=0))
        return torch.stack(out)

    return embed


@pytest.fixture(scope="module")
def world_tok(world) -> data.Tokenizer:
    return data.train_tokenizer(data.world_texts(world))


@pytest.mark.parametrize("k", [1, 2])
def test_rag_copier_scores_its_retrieval_and_one_with_the_right_entry(world, world_tok, k):
    n = len(world.kb.entries)
    runner_up = set(range(0, n, 3))
    emb = ranked_embedder(world, runner_up)
    got = E.eval_rag(world, EntryCopier(world_tok), world_tok, E.embedding_retriever(emb, "summary"), k,
                     torch.device("cpu"), 4)
    hit_at_1 = 1 - len(runner_up) / n
    assert got["rag/retrieval_r1"] == pytest.approx(hit_at_1)
    assert got["rag/acc_oracle_context"] == 1.0  # the right entry given: a copier cannot miss
    assert got["rag/acc_without_retrieval"] == 0.0  # test names never occur outside the KB
    # k = 1: the entry is right exactly when retrieval is; k = 2: the own entry is always among the two
    assert got["rag/acc"] == pytest.approx(hit_at_1 if k == 1 else 1.0), got


def test_rag_fixed_wrong_name_scores_zero(world, world_tok):
    wrong = data.make_name(random.Random(0), "train")  # no test name is ever a training name
    emb = ranked_embedder(world, set())
    copier = EntryCopier(world_tok, wrong)
    got = E.eval_rag(world, copier, world_tok, E.embedding_retriever(emb, "summary"), 1, torch.device("cpu"), 4)
    assert got["rag/retrieval_r1"] == 1.0
    assert got["rag/acc"] == got["rag/acc_without_retrieval"] == got["rag/acc_oracle_context"] == 0.0, got
