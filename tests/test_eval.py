"""eval.py's metrics on cases whose answers are known by construction, against independent loops."""
import json
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
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
    # candidate c scores n - c for every query
    scores = torch.arange(n, 0, -1, dtype=torch.float).repeat(n, 1)
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
    # image 0 likes both captions most (a "bag of words" model): captions pick the right image only for
    # caption 0
    s = torch.tensor([[[0.9, 0.8], [0.1, 0.5]]])
    # text: image0 prefers cap0 (0.9 > 0.8), image1 prefers cap1 (0.5 > 0.1) -> 1
    # image: cap0 prefers image0 (0.9 > 0.1), cap1 prefers image1? 0.5 > 0.8 no -> 0
    assert E.winoground_scores(s) == {"text": 1.0, "image": 0.0, "group": 0.0}
    constant = torch.ones(5, 2, 2)  # ties never count as correct
    assert E.winoground_scores(constant) == {"text": 0.0, "image": 0.0, "group": 0.0}


def pope_script(answer: str) -> str:
    """POPE's evaluation script (Li et al., EMNLP 2023) as written, on the lower-cased answer."""
    text = answer.lower()
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def test_yes_no_metrics():
    truth = ["yes", "no", "yes", "no"]
    assert E.yes_no_metrics(truth, truth) == {"acc": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                                              "yes_ratio": 0.5, "one_word": 1.0}
    always_yes = E.yes_no_metrics(["Yes."] * 4, truth)
    assert always_yes == {"acc": 0.5, "precision": 0.5, "recall": 1.0,
                          "f1": pytest.approx(2 * 2 / (2 * 2 + 2)), "yes_ratio": 1.0, "one_word": 1.0}
    # run-on answers are read by POPE's rule, and one_word counts them out
    run_on = E.yes_no_metrics(["yes small red square", "no no no", "Yes, there is.", "There is not."], truth)
    assert run_on == {"acc": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.5, "one_word": 0.0}
    garbage = E.yes_no_metrics(["maybe"] * 4, truth)  # no "no" in it: POPE reads a yes
    assert garbage["acc"] == 0.5 and garbage["yes_ratio"] == 1.0 and garbage["one_word"] == 0.0


ANSWERS = ["yes", "no", "Yes.", "No.", "no no no", "yes small red square", "Yes, there is a cat.",
           "There is not a cat.", "not sure", "maybe", "", "nothing. no", "yes, no"]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(ANSWERS), st.sampled_from(["yes", "no"])), min_size=1, max_size=30))
def test_yes_no_metrics_match_confusion_counts(rows):
    """Against counts from an explicit loop over the confusion matrix of POPE's own script's readings."""
    pred, truth = [p for p, _ in rows], [t for _, t in rows]
    read = [(pope_script(p), t) for p, t in rows]
    c = {(p, t): sum(1 for r in read if r == (p, t)) for p in ("yes", "no") for t in ("yes", "no")}
    tp, fp, fn, tn = c["yes", "yes"], c["yes", "no"], c["no", "yes"], c["no", "no"]
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    m = E.yes_no_metrics(pred, truth)
    assert m["acc"] == pytest.approx((tp + tn) / len(rows))
    assert m["yes_ratio"] == pytest.approx((tp + fp) / len(rows))
    assert m["precision"] == pytest.approx(prec) and m["recall"] == pytest.approx(rec)
    assert m["f1"] == pytest.approx(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    assert m["one_word"] == pytest.approx(sum(p.lower().strip(".") in ("yes", "no") for p in pred) / len(pred))


def test_exact_match_ignores_case_and_spaces():
    assert E.exact_match([" Red", "blue ", "green"], ["red", "blue", "red"]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("pred,truth,same", [("Two.", "2", True), ("the red square", "red square", True),
                                             ("A cat!", "cat", True), ("ten dogs", "10 dogs", True),
                                             ("twelve", "12", False), ("red", "read", False),
                                             ("an apple", "apple pie", False), ("theme", "me", False)])
def test_normalize_answer(pred, truth, same):
    assert (E.normalize_answer(pred) == E.normalize_answer(truth)) == same


def test_summary_row():
    import data
    rows = [data.summary_row(ids, 9, 2) for ids in ([5, 6, 7], [5, 6])]
    assert rows == [([5, 6, 7, 9, 9], 4), ([5, 6, 9, 9], 3)]


def test_eval_summaries_read_the_training_rows():
    """The Embedder's VladVA rows and summary positions are collate_pairs' (training's), token for token."""
    import data
    from types import SimpleNamespace
    scenes = data.make_world("test", 3, 0, image_size=16).scenes
    tok = data.train_tokenizer([s.short_caption + " " + s.long_caption for s in scenes], 300)
    k, n_img = data.n_soft_tokens(tok), 4
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
    b = data.collate_pairs(scenes, tok, n_img, k, 256)
    img_ids, img_pos, txt_ids, txt_pos = seen
    assert torch.equal(img_pos.cpu(), b["img_pos"]) and torch.equal(txt_pos.cpu(), b["txt_pos"])
    for row, pos, ref in zip(img_ids, img_pos, b["img_ids"]):
        assert row[:pos + 1].tolist() == ref[:pos + 1].tolist()
    assert txt_ids.tolist() == b["txt_ids"].tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_karpathy_retrieval_reads_every_caption(seed):
    """A Karpathy record's every caption is a text (the COCO / Flickr30k protocol): an image hits when any of
    its captions (or the same string of another record) is in its top K, and every caption is a text query.
    Against ranks sorted by hand, with random embeddings."""
    import data
    caps = [["a dog.", "a brown dog."], ["a cat.", "a cat on a mat.", "a small cat."], ["a hen.", "a dog."],
            ["a cow."]]
    pairs = [data.Pair(torch.full((3, 8, 8), n / 10), c[0], " ".join(c), c) for n, c in enumerate(caps)]
    g = torch.Generator().manual_seed(seed)
    vec = {text: torch.randn(6, generator=g) for c in caps for text in c}
    img_vec = [torch.randn(6, generator=g) for _ in caps]

    def emb(samples, kind, role):
        seg = [x.segments[0] for x in samples]
        rows = ([img_vec[round(float(x.image.mean()) * 10)] for x in seg] if role == "image"
                else [vec[x.text.strip()] for x in seg])
        return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

    got = E.eval_retrieval(pairs, emb, "summary")
    unit = {t: v / v.norm() for t, v in vec.items()}
    texts = [t for c in caps for t in c]
    for k in (1, 5, 10):
        i2t = [any(t in c for t in sorted(texts, key=lambda t: -float(img_vec[n] / img_vec[n].norm() @ unit[t]))[:k])
               for n, c in enumerate(caps)]
        t2i = [any(t in caps[n] for n in sorted(range(len(caps)),
                                                key=lambda n: -float(img_vec[n] / img_vec[n].norm() @ unit[t]))[:k])
               for t in texts]
        assert got[f"retrieval/i2t_r{k}"] == pytest.approx(sum(i2t) / len(caps))
        assert got[f"retrieval/t2i_r{k}"] == pytest.approx(sum(t2i) / len(texts))


def test_question_types_cover_the_world_templates():
    import data
    w = data.make_world("test", 30, 0)
    kinds = {E.question_type(q): q for s in w.scenes for q, _ in s.vqa}
    assert set(kinds) == {"count", "colour", "shape", "size", "relation"}
    assert kinds["relation"].startswith("is the")


# ---- users' MMC4 and Winoground files through eval.py's entry point ----------------------------------------
SHADES = {"a": 10, "b": 40, "c": 70, "d": 100, "e": 130}  # image name -> red level of a uniform PNG


def write_shades(tmp_path: Path) -> None:
    from PIL import Image
    for name, red in SHADES.items():
        Image.new("RGB", (32, 32), (red, 0, 0)).save(tmp_path / f"{name}.png")


def shade(image: torch.Tensor) -> str:
    red = round(float(image[0].mean()) * 255)
    return next(n for n, v in SHADES.items() if v == red)


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def doc(sentences: list[str], images: dict[str, int]) -> dict:
    return {"text_list": sentences, "image_info": [{"image_name": f"{n}.png", "matched_text_index": k}
                                                   for n, k in images.items()]}


class KnownScores:
    """An embedder stand-in: an image embeds as the one-hot vector of its shade, a text as the vector `texts`
    gives its last segment; every sample it embeds is recorded as (names of images | texts)."""

    def __init__(self, texts: dict[str, list[float]]) -> None:
        self.texts, self.seen = texts, []

    def __call__(self, samples, kind, side):
        rows = []
        for s in samples:
            self.seen.append([shade(x.image) if x.kind == "image" else x.text for x in s.segments])
            last = s.segments[-1]
            if last.kind == "image":
                rows.append([float(shade(last.image) == n) for n in SHADES])
            else:
                rows.append(self.texts[last.text])
        return torch.tensor(rows)


def test_mmc4_and_winoground_files_give_their_metrics(tmp_path, monkeypatch):
    """--data docs.jsonl,wino.jsonl: interleaved/r1|r5 and winoground/text|image|group. With the real model
    every metric is a fraction; with embeddings of known scores each equals the count worked out by hand, and
    each interleaved query is the document before an image and then that image's sentence."""
    from test_train import tiny_checkpoint
    write_shades(tmp_path)
    docs = write_jsonl(tmp_path / "docs.jsonl", [
        doc(["s zero.", "s one.", "s two."], {"a": 0, "b": 1, "c": 2}),  # a b c: queries for b and c
        doc(["t zero.", "t one."], {"c": 0, "d": 1}),                    # c d: a query for d
        doc(["u zero.", "u one."], {"b": 0, "a": 1})])                   # b a: a query for a
    wino = write_jsonl(tmp_path / "wino.jsonl", [
        {"id": 0, "image_0": "a.png", "image_1": "b.png", "caption_0": "w zero.", "caption_1": "w one."},
        {"id": 1, "image_0": "c.png", "image_1": "d.png", "caption_0": "v zero.", "caption_1": "v one."}])
    ckpt = tmp_path / "c.pt"
    tiny_checkpoint(ckpt, ["s t u w v zero one two."] * 3)
    args = ["--ckpt", str(ckpt), "--data", f"{docs},{wino}"]
    real = E.main(args)
    assert set(real) == {"interleaved/r1", "interleaved/r5", "winoground/text", "winoground/image",
                         "winoground/group"} and all(0 <= v <= 1 for v in real.values())
    one = lambda name, w=1.0: [w * float(n == name) for n in SHADES]  # noqa: E731
    mix = lambda x, y: [p + q for p, q in zip(x, y)]  # noqa: E731
    stand_in = KnownScores({
        "s one.": one("b"),                          # b (twice among the 7 candidates) first: hit at 1
        "s two.": mix(one("a", 0.9), one("c", 0.5)),  # a twice above c: a miss at 1, a hit at 5
        "t one.": one("d", -1.0),                    # the 6 other candidates above d: a miss at 5
        "u one.": one("a"),                          # a first: hit at 1
        "w zero.": one("a"), "w one.": one("b"),     # s = [[1, 0], [0, 1]]: text, image, group right
        "v zero.": mix(one("c", 0.9), one("d", 0.1)), "v one.": mix(one("c", 0.8), one("d", 0.5))})
    # second: s = [[0.9, 0.8], [0.1, 0.5]]: each image prefers its caption (text), caption 1 prefers image 0
    monkeypatch.setattr(E, "Embedder", lambda *a, **k: stand_in)
    m = E.main(args)
    assert m == {"interleaved/r1": 0.5, "interleaved/r5": 0.75, "winoground/text": 1.0,
                 "winoground/image": 0.5, "winoground/group": 0.5}
    queries = [s for s in stand_in.seen if len(s) > 1]
    assert queries == [["a", "s zero.", "s one."], ["a", "s zero.", "b", "s one.", "s two."],
                       ["c", "t zero.", "t one."], ["b", "u zero.", "u one."]]
    assert [s for s in stand_in.seen if len(s) == 1][:7] == [["a"], ["b"], ["c"], ["c"], ["d"], ["b"], ["a"]]


def test_interleaved_query_longer_than_the_context_drops_its_oldest_segments(tmp_path, monkeypatch):
    """A document that fits the context, whose last query does not once the summary's soft prompt is appended:
    the query keeps its newest segments (and the real model embeds it instead of refusing)."""
    import data
    from test_train import tiny_checkpoint
    write_shades(tmp_path)
    sentences = ["s zero one.", "s one two.", "s two three.", "s three zero."]
    docs = write_jsonl(tmp_path / "docs.jsonl", [doc(sentences, {"a": 0, "b": 1, "c": 2, "d": 3})])
    model, tok = tiny_checkpoint(tmp_path / "c.pt", ["s zero one two three."] * 3)
    room = model.cfg.llm.max_seq_len - model.cfg.n_soft_tokens
    full = data.load_dataset(docs, tok, max_len=model.cfg.llm.max_seq_len).samples[0]
    last = data.Sample([data.image_seg(s.image) if s.kind == "image" else data.text_seg(s.text, False)
                        for s in full.segments[:6]] + [data.text_seg(sentences[3], False)])
    assert data.sample_lengths([last], tok, 16)[0] > room  # the case: without the cut the model would refuse
    seen = []

    class Recording(E.Embedder):
        def __call__(self, samples, kind, side):
            seen.extend(samples)
            return super().__call__(samples, kind, side)
    monkeypatch.setattr(E, "Embedder", Recording)
    m = E.main(["--ckpt", str(tmp_path / "c.pt"), "--data", str(docs)])
    assert set(m) == {"interleaved/r1", "interleaved/r5"}
    cut = [[shade(x.image) if x.kind == "image" else x.text for x in s.segments] for s in seen][-1]
    n_dropped = 7 - len(cut)
    assert n_dropped >= 1 and cut == [shade(x.image) if x.kind == "image" else x.text
                                      for x in last.segments[n_dropped:]]
    assert data.sample_lengths([data.Sample(last.segments[n_dropped - 1:])], tok,
                               16)[0] > room  # none too many


# ------------------------------------------------------------------------------------------------------------
# RAG's likelihood retriever

WORDS = ["the", "small", "large", "red", "blue", "circle", "square", "what", "is", "name", "of"]


def likelihood_setup(words: list[str] = WORDS):
    import data
    from unimllm import LLMConfig, MLLM, MLLMConfig, VisionConfig
    tok = data.train_tokenizer([" ".join(words)] * 4, 120)
    torch.manual_seed(0)
    model = MLLM(MLLMConfig(VisionConfig(image_size=8, patch_size=4, hidden_size=32, num_layers=2,
                                         intermediate_size=64),
                            LLMConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96,
                                      num_layers=2, max_seq_len=64),
                            image_token_id=tok.image_id, soft_image_token_id=tok.soft_image_id,
                            soft_text_token_id=tok.soft_text_id, n_soft_tokens=1)).eval()
    return data, tok, model


def training_loss_alone(model, tok, image, text, prompt: str = "") -> tuple[float, int]:
    """train.py's next-token loss (train.predicting + train.ntp_sum, summed cross-entropy) of one (image, text)
    sample collated alone, with an unscored prompt between them if given, and the tokens it scores: the
    independent reference for the likelihood tests."""
    import data
    import train
    prompt_segs = [data.text_seg(prompt, False)] if prompt else []
    b = data.collate([data.Sample([data.image_seg(image), *prompt_segs, data.text_seg(text, True)])], tok,
                     model.n_image_tokens, 64)
    predict = train.predicting(b["labels"])
    with torch.no_grad():
        logits, _ = model(b["input_ids"], b["images"], predict)
    loss, n = train.ntp_sum(logits, b["labels"], predict)
    return float(loss), int(n)


@settings(max_examples=12, deadline=None)
@given(texts=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6), min_size=1, max_size=5),
       batch=st.integers(1, 4), seed=st.integers(0, 100))
def test_text_log_likelihoods_are_minus_the_training_loss_of_each_pair_alone(texts, batch, seed):
    """log p(text | image), batched with texts of other lengths (padding), against train.py's next-token loss
    (train.predicting + train.ntp_sum, summed cross-entropy) of each (image, text) sample collated alone."""
    data, tok, model = likelihood_setup()
    g = torch.Generator().manual_seed(seed)
    pairs = [(torch.rand(3, 8, 8, generator=g), " ".join(words)) for words in texts]
    got = E.text_log_likelihoods(model, tok, pairs, torch.device("cpu"), batch)
    for (image, text), value in zip(pairs, got.tolist()):
        loss, n = training_loss_alone(model, tok, image, text)
        assert n == len(tok.encode(text)) + 1  # the text's tokens and its end of turn
        assert value == pytest.approx(-loss, rel=1e-5, abs=1e-4)


def test_likelihood_retriever_scores_question_rows_against_entry_columns():
    """scores[q, e] is log p(question q | image e), each pair scored on its own."""
    data, tok, model = likelihood_setup()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 8, 8, generator=g) for _ in range(3)]
    questions = ["what is the name of the red circle?", "the large square", "blue"]
    got = E.likelihood_retriever(model, tok, torch.device("cpu"), 4, [])(questions, images)
    assert got.shape == (3, 3)
    for q, question in enumerate(questions):
        for e, image in enumerate(images):
            alone = E.text_log_likelihoods(model, tok, [(image, question)], torch.device("cpu"), 1)
            assert float(got[q, e]) == pytest.approx(float(alone[0]), rel=1e-5, abs=1e-4)
    assert len({round(float(v), 3) for v in got[0]}) > 1  # the image changes the score


@settings(max_examples=8, deadline=None)
@given(bank=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=5), min_size=1, max_size=4),
       seed=st.integers(0, 100))
def test_likelihood_retriever_subtracts_each_images_mean_over_the_prior_bank(bank, seed):
    """scores[q, e] = log p(q | image e) - mean over the bank's texts b of log p(b | image e), each term from
    the next-token loss of the pair collated alone (float64 mean), so the prior moves the columns and never
    the order of one column's questions."""
    _, tok, model = likelihood_setup()
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 8, 8, generator=g) for _ in range(3)]
    questions = ["what is the name of the red circle?", "the large square"]
    bank = [" ".join(words) for words in bank]

    def alone(image, text) -> float:  # log p(text | image)
        return -training_loss_alone(model, tok, image, text)[0]

    got = E.likelihood_retriever(model, tok, torch.device("cpu"), 3, bank)(questions, images)
    for e, image in enumerate(images):
        prior = sum(alone(image, b) for b in bank) / len(bank)
        for q, question in enumerate(questions):
            assert float(got[q, e]) == pytest.approx(alone(image, question) - prior, rel=1e-5, abs=1e-4)


def test_prior_questions_are_training_split_vqa_questions_and_no_rag_question():
    import data
    bank = E.prior_questions(48)
    train_questions = {q for s in data.make_world("train", 48, 0).scenes for q, _ in s.vqa}
    test = data.make_world("test", 200, 1)
    assert len(bank) == 48 and set(bank) <= train_questions
    assert not set(bank) & {q for q, _ in test.kb.questions}
    assert E.prior_questions(0) == []


def test_embedding_throughput_times_the_discriminative_suites_only(monkeypatch):
    """speed/embeddings_per_s: the embeddings of the retrieval, compositional, Winoground and interleaved
    suites over their time; RAG's generation and the VQA / POPE answers after them are not counted in."""
    from types import SimpleNamespace
    clock = [0.0]
    monkeypatch.setattr(E.time, "perf_counter", lambda: clock[0])

    def discriminative(world, emb, kinds):
        if isinstance(emb, E.Embedder):  # the model's suites: 10 embeddings in 2 s; the oracle row is free
            emb.count += 10
            clock[0] += 2.0
        return {}

    def slow(*args, **kwargs):
        clock[0] += 100.0
        return {}

    monkeypatch.setattr(E, "eval_discriminative", discriminative)
    monkeypatch.setattr(E, "eval_rag", slow)
    monkeypatch.setattr(E, "eval_vqa_pope", slow)
    model = SimpleNamespace(cfg=SimpleNamespace(vision=SimpleNamespace(image_size=32)))
    metrics, kinds = E.evaluate_world(model, None, "unified", E.EvalArgs(n_test=4), torch.device("cpu"))
    assert metrics["speed/embeddings_per_s"] == 5.0
    assert kinds["rag"] == "summary"


# bench/summary_probe.py's binding probe

def test_binding_probe_scores_a_bag_of_attributes_at_chance_and_their_conjunctions_at_one():
    """On real scenes: a representation that sums one-hot colours and shapes (a bag) scores 0.5 on the hard
    cases, one that also holds each object's (colour, shape) one-hot scores 1.0, whatever the object order."""
    import importlib.util
    import data
    spec = importlib.util.spec_from_file_location("summary_probe", ROOT / "bench" / "summary_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    colours, shapes = list(data.COLOURS), list(data.SHAPES)

    def reps(scenes, conj: bool) -> torch.Tensor:
        x = torch.zeros(len(scenes), len(colours) + len(shapes) + (len(probe.PAIRS) if conj else 0))
        for n, s in enumerate(scenes):
            for o in s.graph.objects:
                x[n, colours.index(o.colour)] += 1
                x[n, len(colours) + shapes.index(o.shape)] += 1
                if conj:
                    x[n, len(colours) + len(shapes) + probe.PAIRS.index((o.colour, o.shape))] = 1
        return x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(len(scenes)))
    train, test = data.make_world("train", 400, 3).scenes, data.make_world("test", 200, 3).scenes
    (y_tr, _), (y_te, hard) = probe.image_labels(train), probe.image_labels(test)
    assert hard.sum() > 100 and (hard & (y_te == 0)).sum() > 50  # enough hard cases of both kinds
    bag = probe.probe(reps(train, False), y_tr, reps(test, False), y_te, hard)
    bound = probe.probe(reps(train, True), y_tr, reps(test, True), y_te, hard)
    assert abs(bag - 0.5) < 0.1 and bound > 0.97, (bag, bound)


# bench/count_drift.py's answer likelihoods

def test_count_drift_scores_each_answer_as_the_training_loss_of_the_conversation_alone():
    """log p(answer | image, question) for a batch of images, against train.py's next-token loss (summed
    cross-entropy) of each [image] question answer sample collated alone."""
    import importlib.util
    import data
    spec = importlib.util.spec_from_file_location("count_drift", ROOT / "bench" / "count_drift.py")
    drift = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(drift)
    question = data.format_question(drift.QUESTION)
    _, tok, model = likelihood_setup(question.split() + ["three", "four"])
    images = [torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    for answer in ("three", "four"):
        got = drift.answer_log_likelihoods(model, tok, images, answer)
        for image, value in zip(images, got.tolist()):
            loss, _ = training_loss_alone(model, tok, image, answer, prompt=question)
            assert value == pytest.approx(-loss, rel=1e-5, abs=1e-4)
        assert len({round(v, 3) for v in got.tolist()}) > 1  # the image changes the score
