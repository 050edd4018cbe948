"""eval.py's metrics on cases whose answers are known by construction, against independent loops."""
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as E  # noqa: E402


def naive_recall(scores, positive, k):
    hits = 0
    for q in range(scores.shape[0]):
        # rank candidates by score, positives last among equal scores (the pessimistic tie rule)
        order = sorted(range(scores.shape[1]), key=lambda c: (-float(scores[q, c]), bool(positive[q, c])))
        hits += any(bool(positive[q, c]) for c in order[:k])
    return hits / scores.shape[0]


def test_perfect_embeddings_give_recall_one():
    x = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    r = E.recall_at_k(x @ x.T, torch.eye(50, dtype=torch.bool), (1, 5, 10))
    assert r == {1: 1.0, 5: 1.0, 10: 1.0}


def test_shuffled_index_gives_chance():
    # every query's positive sits at a known rank: rank i for query i -> recall@k = k / n exactly
    n = 20
    scores = torch.arange(n, 0, -1, dtype=torch.float).repeat(n, 1)  # candidate c scores n - c for every query
    positive = torch.eye(n, dtype=torch.bool)  # query q's positive is candidate q, ranked q-th
    r = E.recall_at_k(scores, positive, (1, 5, 10))
    assert r == pytest.approx({1: 1 / n, 5: 5 / n, 10: 10 / n})


def test_random_embeddings_recall_near_chance():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 8, generator=g), torch.randn(400, 8, generator=g)
    r = E.recall_at_k(a @ b.T, torch.eye(400, dtype=torch.bool), (10,))
    assert abs(r[10] - 10 / 400) < 0.03  # 4 standard deviations of a binomial(400, 0.025) mean


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.integers(0, 10_000), st.integers(1, 8))
def test_recall_matches_naive_ranking(q, c, seed, k):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (q, c), generator=g).float()  # many ties on purpose
    positive = torch.rand(q, c, generator=g) < 0.3
    positive[torch.arange(q), torch.randint(0, c, (q,), generator=g)] = True
    assert E.recall_at_k(scores, positive, (k,))[k] == pytest.approx(naive_recall(scores, positive, k))


def test_recall_needs_a_positive_per_query():
    with pytest.raises(ValueError, match="every query needs a positive"):
        E.recall_at_k(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]), (1,))


def test_pairwise_accuracy():
    assert E.pairwise_accuracy(torch.tensor([1.0, 2.0, 3.0, 0.0]), torch.tensor([0.0, 3.0, 1.0, 0.0])) == 0.5


def test_winoground_scores_known_cases():
    perfect = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert E.winoground_scores(perfect) == {"text": 1.0, "image": 1.0, "group": 1.0}
    # image 0 likes both captions most (a "bag of words" model): captions pick the right image only for caption 0
    s = torch.tensor([[[0.9, 0.8], [0.1, 0.5]]])
    # text: image0 prefers cap0 (0.9 > 0.8), image1 prefers cap1 (0.5 > 0.1) -> 1
    # image: cap0 prefers image0 (0.9 > 0.1), cap1 prefers image1? 0.5 > 0.8 no -> 0
    assert E.winoground_scores(s) == {"text": 1.0, "image": 0.0, "group": 0.0}
    constant = torch.ones(5, 2, 2)  # ties never count as correct
    assert E.winoground_scores(constant) == {"text": 0.0, "image": 0.0, "group": 0.0}


def test_yes_no_metrics():
    truth = ["yes", "no", "yes", "no"]
    assert E.yes_no_metrics(truth, truth) == {"acc": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5}
    always_yes = E.yes_no_metrics(["Yes."] * 4, truth)
    assert always_yes == {"acc": 0.5, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 * 2 / (2 * 2 + 2)),
                          "yes_ratio": 1.0}
    garbage = E.yes_no_metrics(["maybe"] * 4, truth)  # neither yes nor no: wrong, and not a "yes"
    assert garbage == {"acc": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["yes", "no"]), st.sampled_from(["yes", "no"])), min_size=1, max_size=30))
def test_yes_no_metrics_match_confusion_counts(rows):
    """Against counts from an explicit loop over the confusion matrix."""
    pred, truth = [p for p, _ in rows], [t for _, t in rows]
    c = {(p, t): sum(1 for r in rows if r == (p, t)) for p in ("yes", "no") for t in ("yes", "no")}
    tp, fp, fn, tn = c["yes", "yes"], c["yes", "no"], c["no", "yes"], c["no", "no"]
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    m = E.yes_no_metrics(pred, truth)
    assert m["acc"] == pytest.approx((tp + tn) / len(rows)) and m["yes_ratio"] == pytest.approx((tp + fp) / len(rows))
    assert m["precision"] == pytest.approx(prec) and m["recall"] == pytest.approx(rec)
    assert m["f1"] == pytest.approx(2 * prec * rec / (prec + rec) if prec + rec else 0.0)


def test_exact_match_ignores_case_and_spaces():
    assert E.exact_match([" Red", "blue ", "green"], ["red", "blue", "red"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("pred,truth,same", [("Two.", "2", True), ("the red square", "red square", True),
                                             ("A cat!", "cat", True), ("ten dogs", "10 dogs", True),
                                             ("twelve", "12", False), ("red", "read", False),
                                             ("an apple", "apple pie", False), ("theme", "me", False)])
def test_normalize_answer(pred, truth, same):
    assert (E.normalize_answer(pred) == E.normalize_answer(truth)) == same


def test_summary_row():
    import data as D
    rows = [D.summary_row(ids, 9, 2) for ids in ([5, 6, 7], [5, 6])]
    assert rows == [([5, 6, 7, 9, 9], 4), ([5, 6, 9, 9], 3)]


def test_eval_summaries_read_the_training_rows():
    """The Embedder's VladVA rows and summary positions are collate_pairs' (training's), token for token."""
    import data as D
    from types import SimpleNamespace
    scenes = D.make_world("test", 3, 0, image_size=16).scenes
    tok = D.train_tokenizer([s.short_caption + " " + s.long_caption for s in scenes], 300)
    k, n_img = D.n_soft_tokens(tok), 4
    seen = []

    class Recorder:  # stands in for the MLLM: records what the Embedder feeds it
        n_image_tokens = n_img
        cfg = SimpleNamespace(llm=SimpleNamespace(max_seq_len=256), n_soft_tokens=k)

        def __call__(self, ids, images):
            seen.append(ids)
            return None, torch.zeros(ids.shape[0], ids.shape[1], 2)

        def summary_embedding(self, hidden, pos):
            seen.append(pos)
            return torch.ones(len(pos), 2)

    emb = E.Embedder(Recorder(), tok, 8, torch.device("cpu"))
    emb([E.img(s.image) for s in scenes], "summary", "image")
    emb([E.txt(s.short_caption) for s in scenes], "summary", "text")
    b = D.collate_pairs(scenes, tok, n_img, k, 256)
    img_ids, img_pos, txt_ids, txt_pos = seen
    assert torch.equal(img_pos.cpu(), b["img_pos"]) and torch.equal(txt_pos.cpu(), b["txt_pos"])
    for row, pos, ref in zip(img_ids, img_pos, b["img_ids"]):
        assert row[:pos + 1].tolist() == ref[:pos + 1].tolist()
    assert txt_ids.tolist() == b["txt_ids"].tolist()


def test_question_types_cover_the_world_templates():
    import data as D
    w = D.make_world("test", 30, 0)
    kinds = {E.question_type(q): q for s in w.scenes for q, _ in s.vqa}
    assert set(kinds) == {"count", "colour", "shape", "size", "relation"}
    assert kinds["relation"].startswith("is the")
