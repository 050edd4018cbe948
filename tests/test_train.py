"""train.py end to end on the --smoke configuration: DDP (torchrun, 2 gloo ranks) against one process on the
same global batch, exact resume, a checkpoint eval.py loads, and bad input stopping with a clear message."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as E  # noqa: E402
import train  # noqa: E402

SMOKE = ["--smoke", "--n-train", "24", "--pretrain-steps", "4", "--finetune-steps", "4", "--method",
         "unified"]


def run_single(out: Path, *extra: str) -> train.TrainResult:
    cfg = train.parse_args(SMOKE + ["--out", str(out), *extra])
    return train.train(cfg, train.Dist(0, 1, torch.device("cpu")))


def flat(history: dict) -> list[tuple[str, str, float]]:
    return [(stage, k, v) for stage in ("pretrain", "finetune") for terms in history[stage]
            for k, v in terms.items()]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


DDP_TERMS = {"unified": {"ntp", "contrastive", "structure"}, "vladva": {"ntp", "contrastive"},
             "sugar": {"ntp", "structure"}}  # the fine-tuning terms each method trains


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> dict[str, tuple[dict, dict, dict]]:
    """Each method trained by 2 DDP ranks (one torchrun launch for all methods) and by one process: method ->
    (rank 0, rank 1, one process) results. The one-process runs get a fresh process too, like the ranks:
    nothing earlier tests left in this process (threads, global state) can touch them."""
    root = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    worker = str(ROOT / "tests" / "ddp_worker.py")
    out = {}
    for name, launch in (("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node", "2", worker]), ("one", [sys.executable, worker])):
        d = root / name
        d.mkdir()
        # float32 throughout (the CPU default runs the full mix in bf16): the ranks' summation order is then the
        # only difference, which float32 tolerances bound
        runs = [[*SMOKE, "--method", m, "--autocast", "off", "--out", str(d / f"{m}.pt")] for m in DDP_TERMS]
        flags = [f for k, r in enumerate(runs) for f in (["--then"] if k else []) + r]
        proc = subprocess.run([*launch, *flags, str(d)], cwd=d, env=env, capture_output=True, text=True,
                              timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        ranks = range(2 if name == "ddp" else 1)
        out[name] = {m: [torch.load(d / f"run{k}.rank{r}.pt", weights_only=True) for r in ranks]
                     for k, m in enumerate(DDP_TERMS)}
    return {m: (*out["ddp"][m], out["one"][m][0]) for m in DDP_TERMS}


@pytest.mark.parametrize("method", list(DDP_TERMS))
def test_ddp_two_ranks_match_one_process(ddp_runs, method):
    r0, r1, single = ddp_runs[method]
    assert_same_weights(r0["model"], r1["model"])  # DDP kept the replicas identical
    ddp_terms, one_terms = flat(r0["history"]), flat(single["history"])
    assert [t[:2] for t in ddp_terms] == [t[:2] for t in one_terms]
    assert {k for stage, k, _ in ddp_terms if stage == "finetune"} >= DDP_TERMS[method]
    torch.testing.assert_close(torch.tensor([t[2] for t in ddp_terms]),
                               torch.tensor([t[2] for t in one_terms]))
    cfg = train.parse_args([*SMOKE, "--method", method])
    lr = max(cfg.pretrain.vision_lr, cfg.pretrain.pretrain_lr, cfg.finetune.finetune_lr)
    assert_close_after_adam(r0["model"], single["model"], lr)


def assert_close_after_adam(got: dict, want: dict, lr: float) -> None:
    """Weights of two runs whose gradients agree up to rounding (a different summation order). Adam divides
    each update by the gradient's own size, so an element whose gradient is near zero, mostly rounding noise,
    moves by up to ~lr in a direction the noise picks: such elements may differ by up to lr, at most one in a
    thousand; every other one matches to float32 tolerance (vladva at --smoke: 4 LoRA elements of 2e5 differ,
    by <= 1.5e-5)."""
    n_off = n = 0
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=lr, msg=k)
        n_off += int((~torch.isclose(got[k], v, rtol=1.3e-6, atol=1e-5)).sum())
        n += v.numel()
    assert n_off <= n / 1000, f"{n_off} of {n} weights differ beyond float32 tolerance"


# inside pre-training's lookup steps (2, then 2 of "where", then 4 of the mix: resuming crosses into both), inside
# fine-tuning (after the 8 of pre-training)
@pytest.mark.parametrize("stop_after", [1, 10])
def test_resume_equals_uninterrupted(tmp_path, stop_after):
    full = run_single(tmp_path / "full.pt")
    part = run_single(tmp_path / "part.pt", "--stop-after", str(stop_after))
    assert not part.complete
    assert sum(len(v) for v in part.history.values()) == stop_after
    resumed = run_single(tmp_path / "part.pt", "--resume")
    assert resumed.complete
    assert flat(resumed.history) == flat(full.history)
    assert_same_weights(resumed.model.state_dict(), full.model.state_dict())


def test_pretraining_opens_with_lookups_then_where_and_relations(tmp_path):
    cfg = train.parse_args(SMOKE + ["--lookup-steps", "3", "--where-steps", "2", "--out", str(tmp_path / "x.pt")])
    corpus = train.builtin_corpus(cfg)
    tok = data.train_tokenizer(corpus.texts, cfg.model.vocab_size)
    n_img = (cfg.model.image_size // cfg.model.patch_size) ** 2
    streams = train.build_streams(corpus, 0, tok, n_img, cfg.run.length_group)
    objective = train.objective_of("pretrain", cfg.finetune)
    make = train.Batches("pretrain", streams, cfg, train.Dist(0, 1, torch.device("cpu")), tok,
                         train.model_config(cfg.model, tok), objective, True)
    lookup = (r"question: what (colour is the \w+|shape is the \w+ object)\? answer: \w+"
              r"|the ([a-z ]+) is called (\w+)\. question: what is the name of the \2\? answer: \3")
    where = (r"question: (which row is the \w+ \w+ in\? answer: (top|center|bottom)"
             r"|which column is the \w+ \w+ in\? answer: (left|center|right)"
             r"|is the \w+ \w+ (left or right of|above or below) the \w+ \w+\? answer: (left|right|above|below))")
    # the second part adds row / column and relation questions to the first's; a relation question can be a
    # whole conversation in the mix too: both checked over their batches pooled
    in_second, in_mix = [], []
    for k in range(10):
        ids = make(k).lm["input_ids"]  # (B, T)
        texts = [tok.decode([i for i in row.tolist() if i != tok.image_id]).strip() for row in ids]
        if k < 3:
            assert all(re.fullmatch(lookup, t) for t in texts), (k, texts)
        elif k < 5:
            assert all(re.fullmatch(f"{lookup}|{where}", t) for t in texts), (k, texts)
            in_second += [bool(re.fullmatch(where, t)) for t in texts]
        else:
            in_mix += [bool(re.fullmatch(f"{lookup}|{where}", t)) for t in texts]
    assert any(in_second) and not all(in_mix)
    assert train.opening(cfg, streams) == [("lookup", 3), ("where", 2)]


def test_where_mix_adds_every_nth_mix_sample_to_the_second_part(tmp_path):
    # --where-mix 3: the second part's stream is the default one plus every third sample of the full mix's list
    # (captions, conversations, RAG, long captions, stories: counted here from data.py's own builders)
    argv = SMOKE + ["--out", str(tmp_path / "x.pt")]
    plain, mixed = train.builtin_corpus(train.parse_args(argv)), train.builtin_corpus(train.parse_args(
        argv + ["--where-mix", "3"]))
    mix = plain.lm + plain.long + plain.stories
    def same(a: list, b: list) -> bool:  # samples hold tensors (images, teacher features): compare field by field
        def eq(x, y):
            if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
                return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
            if dataclasses.is_dataclass(x):
                return type(x) is type(y) and all(eq(getattr(x, f.name), getattr(y, f.name))
                                                  for f in dataclasses.fields(x))
            if isinstance(x, (list, tuple)):
                return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(eq, x, y))
            return x == y
        return eq(a, b)

    assert len(mixed.where) == len(plain.where) + math.ceil(len(mix) / 3)
    assert same(mixed.where[:len(plain.where)], plain.where) and same(mixed.where[len(plain.where):], mix[::3])
    assert same(mixed.lookup, plain.lookup) and same(mixed.lm, plain.lm)  # nothing else changes


def twins_batches(tmp_path, twins: str) -> tuple[train.Batches, data.Tokenizer]:
    """Fine-tuning batches of a small built-in world with --pair-twins `twins`, 8 pairs a step."""
    cfg = train.parse_args(SMOKE + ["--n-train", "200", "--pair-batch", "8", "--pair-twins", twins,
                                    "--out", str(tmp_path / "x.pt")])
    corpus = train.builtin_corpus(cfg)
    tok = data.train_tokenizer(corpus.texts, cfg.model.vocab_size)
    streams = train.build_streams(corpus, 0, tok, 9, cfg.run.length_group)
    make = train.Batches("finetune", streams, cfg, train.Dist(0, 1, torch.device("cpu")), tok,
                         train.model_config(cfg.model, tok), train.objective_of("finetune", cfg.finetune), True)
    return make, tok


def pair_images(pairs: dict) -> torch.Tensor:
    """Every pair's image in the pairs' order: the long-caption rows' (in length chunks), then the others'."""
    long = torch.cat([rows["images"] for rows in pairs["long"]])[pairs["long_order"]]
    return torch.cat([long, pairs["head_images"]]) if "head_images" in pairs else long


def same_batch(a: object, b: object) -> bool:
    """Equal batches: the same keys, lists and tensors all the way down."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_batch(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_batch(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def caption_texts(rows: torch.Tensor, tok: data.Tokenizer) -> list[str]:
    special = {tok.bos_id, tok.pad_id, tok.soft_text_id}
    return [tok.decode([i for i in row.tolist() if i not in special]).strip() for row in rows]


def test_finetuning_pairs_come_with_their_winoground_twins(tmp_path):
    """--pair-twins swap: a fine-tuning step's captions hold pairs that use the same words in another binding
    (the twin's), each with its own image; with none (the default) they almost never meet in a step."""
    def partnered(twins: str) -> tuple[int, int]:
        make, tok = twins_batches(tmp_path, twins)
        hits = total = 0
        for k in range(12):
            pairs = make(k).pairs
            texts = caption_texts(pairs["txt_ids"], tok)
            images = pair_images(pairs)
            for i, t in enumerate(texts):
                twins_of_t = [j for j, u in enumerate(texts) if u != t and sorted(u.split()) == sorted(t.split())]
                assert all(not torch.equal(images[i], images[j]) for j in twins_of_t)
                hits += bool(twins_of_t)
            total += len(texts)
        assert "neg_ids" not in pairs
        return hits, total
    (with_, n), (without, _) = partnered("swap"), partnered("none")
    assert with_ >= 0.4 * n and without <= 0.1 * n, (with_, without, n)


def test_caption_twins_are_each_pairs_negative_text_and_leave_its_pairs_alone(tmp_path):
    """--pair-twins caption (NegCLIP): a step's pairs are those of the default, and each pair's negative row
    is a caption with the same words in another binding (its twin's); a pair without a twin
    passes its own caption, marked not valid."""
    none, _ = twins_batches(tmp_path, "none")
    make, tok = twins_batches(tmp_path, "caption")
    valid = total = 0
    for k in range(12):
        want, got = none(k).pairs, make(k).pairs
        assert same_batch(want, {key: got[key] for key in want})
        texts, negs = caption_texts(got["txt_ids"], tok), caption_texts(got["neg_ids"], tok)
        for t, n, ok in zip(texts, negs, got["neg_valid"].tolist()):
            assert (n != t and sorted(n.split()) == sorted(t.split())) if ok else n == t, (t, n, ok)
            valid += ok
        total += len(texts)
        assert got["neg_pos"].tolist() == [len(caption_ids) - 1 for caption_ids in
                                           (row[row != tok.pad_id] for row in got["neg_ids"])]
    assert valid >= 0.25 * total, (valid, total)  # about 2 in 5 (one-object captions and test-split twins have none)


def test_smoke_checkpoint_evaluates(tmp_path, capsys):
    out = tmp_path / "smoke.pt"
    train.main(["--smoke", "--out", str(out)])
    assert (tmp_path / "smoke.base.pt").is_file()
    metrics = E.main(["--ckpt", str(out), "--n-test", "8", "--json", str(tmp_path / "m.json")])
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("retrieval/i2t_r1", "retrieval/t2i_r10", "compositional/mean", "winoground/group",
                "interleaved/r5",
                "vqa/acc", "pope/f1", "pope/yes_ratio", "rag/acc", "rag/acc_without_retrieval"):
        assert key in saved and math.isfinite(saved[key]), key
    assert "RAG retrieval summary" in capsys.readouterr().out  # unified: its trained summaries
    # the base has no trained embedding: RAG retrieves by the question's likelihood given each entry image
    base = E.main(["--ckpt", str(tmp_path / "smoke.base.pt"), "--n-test", "8"])
    assert "RAG retrieval likelihood" in capsys.readouterr().out and math.isfinite(base["rag/acc"])
    # every method fine-tunes from the same saved base
    vladva = tmp_path / "vladva.pt"
    train.main(["--smoke", "--method", "vladva", "--init", str(tmp_path / "smoke.base.pt"), "--out",
                str(vladva)])
    ckpt = train.load_checkpoint(vladva)
    assert ckpt["method"] == "vladva" and ckpt["stage"] == "finetune" and ckpt["done"]


def test_finetuning_after_pretraining_equals_finetuning_the_saved_base(tmp_path):
    """`python train.py` (pre-training, then fine-tuning in the same process) and `--init out.base.pt` (the
    ablation's way) must give the same fine-tuned weights: fine-tuning's random draws (LoRA A) may not depend
    on how many numbers pre-training drew before it."""
    full = tmp_path / "full.pt"
    run_single(full)
    again = tmp_path / "again.pt"
    run_single(again, "--init", str(tmp_path / "full.base.pt"))
    a, b = torch.load(full, weights_only=True)["model"], torch.load(again, weights_only=True)["model"]
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


@settings(max_examples=60, deadline=None)
@given(n_open=st.integers(0, 50), n_mix=st.integers(1, 50), warm=st.sampled_from([0.0, 0.03, 0.2]))
def test_pretraining_lr_starts_over_at_the_mix(n_open, n_mix, warm):
    """A split schedule: the opening warms up and holds the peak, the mix is a whole warm-up + cosine of its own
    length (written out here: linear to the peak over round(n * warm) steps, at least one, then half a cosine
    down to 0); no opening, one schedule over all steps."""
    def warm_up(n: int, k: int) -> float:
        return min(1.0, (k + 1) / max(1, round(n * warm)))

    def cosine(n: int) -> list[float]:
        w = max(1, round(n * warm))
        return [warm_up(n, k) if k < w else 0.5 * (1 + math.cos(math.pi * (k - w) / max(1, n - w)))
                for k in range(n)]

    stage = train.Stage("pretrain", n_open + n_mix, 2.0, None, restart=n_open)
    got = [stage.lr(k, warm) for k in range(n_open + n_mix)]
    want = [warm_up(n_open, k) for k in range(n_open)] + cosine(n_mix)
    assert got == pytest.approx([2.0 * x for x in want], rel=1e-12, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 12), n=st.integers(1, 9), step=st.integers(0, 30))
def test_stream_batch_equals_reshuffling_per_item(n_items, n, step):
    """The cached epoch permutation draws exactly what reshuffling the whole list for every item would."""
    import random
    items = [f"item{i}" for i in range(n_items)]
    stream = train.Stream("s", items, 3)
    expected = []
    for k in range(step * n, step * n + n):
        order = list(range(n_items))
        random.Random(f"s:3:{k // n_items}").shuffle(order)
        expected.append(items[order[k % n_items]])
    assert stream.batch(step, n) == expected


@settings(max_examples=40, deadline=None)
@given(n_items=st.integers(1, 40), n=st.integers(1, 6), group=st.integers(2, 5), seed=st.integers(0, 3))
def test_length_grouped_stream_sees_every_item_per_epoch_in_length_sorted_batches(n_items, n, group, seed):
    """Grouping only regroups: the first group*m steps draw the same multiset of items as ungrouped batches of
    the same steps, each batch's items are consecutive in the length order of their group, and n per step."""
    import random
    rng = random.Random(seed)
    items = list(range(n_items))
    lengths = [rng.randint(1, 9) for _ in items]
    plain = train.Stream("s", items, seed)
    grouped = train.Stream("s", items, seed, lengths, group)
    for m in range(3):
        steps = range(m * group, (m + 1) * group)
        batches = [grouped.batch(k, n) for k in steps]
        assert all(len(b) == n for b in batches)
        assert sorted(x for b in batches for x in b) == sorted(x for k in steps for x in plain.batch(k, n))
        # sorted by length within the group: no batch's length range overlaps another's interior
        spans = sorted((min(lengths[x] for x in b), max(lengths[x] for x in b)) for b in batches)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(0, 9), min_size=1, max_size=12), n=st.integers(1, 5), seed=st.integers(0, 9))
def test_length_chunks_cut_only_padding_and_keep_every_row(lengths, n, seed):
    """--caption-chunks: the long-caption rows (a head of 1-4 tokens, then `lengths` caption tokens, right-padded)
    come back as min(n, rows) chunks of near-equal size, in length order when n > 1 (in the rows' order when
    n = 1), each as wide as its longest row; every row keeps its tokens, labels, summary position and image,
    the predicted positions are those of the padded batch, and long_order undoes the sort."""
    g = torch.Generator().manual_seed(seed)
    B, pad = len(lengths), 0
    heads = torch.randint(1, 5, (B,), generator=g).tolist()  # [bos][image][prompt] rows of their own lengths
    T = max(h + m for h, m in zip(heads, lengths))
    ids, labels = torch.full((B, T), pad), torch.full((B, T), -100)
    for b, (head, m) in enumerate(zip(heads, lengths)):
        ids[b, :head + m] = torch.randint(6, 50, (head + m,), generator=g)
        labels[b, head:head + m] = ids[b, head:head + m]
    pos, images = torch.tensor(heads) - 1, torch.rand(B, 3, 4, 4, generator=g)
    pairs = {"img_ids": ids, "img_labels": labels, "img_pos": pos, "images": images, "txt_ids": ids[:, :1]}
    train.length_chunks(pairs, n)
    assert set(pairs) == {"long", "long_order", "txt_ids"}
    chunks, order = pairs["long"], pairs["long_order"].argsort()  # order[j]: the batch row of chunk row j
    assert len(chunks) == min(n, B)
    assert max(len(c["ids"]) for c in chunks) - min(len(c["ids"]) for c in chunks) <= 1
    assert sorted(order.tolist()) == list(range(B))
    if n == 1:
        assert order.tolist() == list(range(B))
    widths = [[heads[i] + lengths[i] for i in rows.tolist()] for rows in order.split([len(c["ids"]) for c in chunks])]
    if n > 1:
        assert all(max(a) <= min(b) for a, b in zip(widths, widths[1:]))
    want_predict = {(b, t) for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100}
    got_predict, j = set(), 0
    for c, w in zip(chunks, widths):
        assert c["ids"].shape[1] == c["labels"].shape[1] == max(w)
        for r in range(len(c["ids"])):
            b = int(order[j + r])
            assert torch.equal(c["ids"][r], ids[b, :max(w)]) and torch.equal(c["labels"][r], labels[b, :max(w)])
            assert (ids[b, max(w):] == pad).all() and int(c["pos"][r]) == heads[b] - 1
            assert torch.equal(c["images"][r], images[b])
        got_predict |= {(int(order[j + p // max(w)]), p % max(w)) for p in c["predict"].tolist()}
        j += len(c["ids"])
    assert got_predict == want_predict


def test_help_presets_and_explicit_flags(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "global image-caption pairs per step" in shown and "(default 32)" in shown  # a field's own comment
    gpu = train.parse_args(["--preset", "gpu"])
    assert gpu.run.preset == "gpu" and gpu.model.llm_width == train.PRESETS["gpu"]["llm_width"] != 192
    assert train.parse_args(["--preset", "gpu", "--llm-width", "96"]).model.llm_width == 96
    assert train.parse_args(["--preset", "gpu", "--smoke"]).model.llm_width == train.SMOKE["llm_width"]
    with pytest.raises(SystemExit, match="--preset must be one of"):
        train.parse_args(["--preset", "tpu"])


def test_bad_flags_stop_with_a_message(tmp_path):
    with pytest.raises(SystemExit, match="--method must be one of"):
        train.parse_args(["--method", "clip"])
    with pytest.raises(SystemExit, match="--pair-twins must be swap, caption or none"):
        train.parse_args(["--pair-twins", "all"])
    with pytest.raises(SystemExit, match="--autocast must be one of auto, bf16, off, got 'fp16'"):
        train.parse_args(["--autocast", "fp16"])
    with pytest.raises(SystemExit, match="--init .*no such file"):
        train.parse_args(["--init", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="--llm .*no such file"):
        train.parse_args(["--llm", str(tmp_path / "nope"), "--vision", str(tmp_path / "nope")])
    with pytest.raises(SystemExit, match="--llm and --vision go together"):
        train.parse_args(["--llm", str(tmp_path)])


def test_bad_checkpoints_stop_with_a_message(tmp_path):
    out = tmp_path / "a.pt"
    run_single(out, "--stop-after", "2")
    with pytest.raises(SystemExit, match="llm_width=64.*but this run has 96"):
        run_single(out, "--resume", "--llm-width", "96")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(out.read_bytes()[:1000])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    for path, msg in ((truncated, "truncated or foreign"), (foreign, "not a unimllm checkpoint"),
                      (tmp_path / "none.pt", "no such checkpoint")):
        with pytest.raises(SystemExit, match=msg):
            E.main(["--ckpt", str(path)])
        with pytest.raises(SystemExit, match=msg):
            train.main(SMOKE + ["--init", str(path), "--out", str(tmp_path / "x.pt")]) if path.exists() else \
                train.load_checkpoint(path)


def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "a.pt"
    run_single(out, "--stop-after", "2")
    before = out.read_bytes()
    real = train.compute_loss

    def poisoned(*args):
        loss, terms = real(*args)
        return loss * math.nan, {**terms, "total": terms["total"] * math.nan}

    monkeypatch.setattr(train, "compute_loss", poisoned)
    with pytest.raises(SystemExit, match="the loss is nan"):
        run_single(out, "--resume")
    assert out.read_bytes() == before


def test_non_finite_gradient_with_a_finite_loss_is_never_written(tmp_path, monkeypatch):
    """A finite loss whose gradient is NaN (d sqrt(x)/dx at 0, times 0) must stop the run before the next
    checkpoint, even one due at that very step."""
    out = tmp_path / "a.pt"
    run_single(out, "--stop-after", "2")
    before = out.read_bytes()
    real = train.compute_loss

    def nan_gradient(model, *args):
        loss, terms = real(model, *args)
        w = next(p for p in model.parameters() if p.requires_grad)
        return loss + (w.sum() * 0).sqrt(), terms

    monkeypatch.setattr(train, "compute_loss", nan_gradient)
    with pytest.raises(SystemExit, match="step 2: the gradient norm is nan"):
        run_single(out, "--resume", "--ckpt-every", "1")
    assert out.read_bytes() == before


def test_diverging_run_never_writes_non_finite_tensors(tmp_path):
    """lr 1e3 diverges within a few steps; with a checkpoint after every step, whatever was written must hold
    only finite weights and optimizer state (checking the loss alone is not enough: a finite loss
    can have non-finite gradients, and the step they take makes every weight they reach non-finite)."""
    out = tmp_path / "l.pt"
    with pytest.raises(SystemExit, match="stopping without writing"):
        train.main(["--smoke", "--pretrain-lr", "1e3", "--ckpt-every", "1", "--out", str(out)])
    ckpt = torch.load(out, weights_only=True)
    tensors = list(ckpt["model"].values())
    tensors += [v for state in ckpt["optimizer"]["state"].values() for v in state.values()]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def write_user_files(tmp_path: Path) -> dict[str, Path]:
    """A LLaVA conversation file, a Karpathy caption file and an MMC4 document file over 4 random PNGs, and a
    teacher-features file covering every slice of the MMC4 documents."""
    import numpy as np
    from PIL import Image
    import data
    (tmp_path / "img").mkdir()
    for k in range(4):
        pixels = np.random.default_rng(k).integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"img/{k}.png")
    llava = [{"id": str(k), "image": f"img/{k}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is it?"}, {"from": "gpt", "value": "red"}]}
             for k in range(4)]
    karpathy = {"images": [{"filename": f"img/{k}.png", "split": "train",
                            "sentences": [{"raw": f"picture {k}."}, {"raw": f"a noisy picture number {k}."}]}
                           for k in range(4)]}
    texts = [["a first line.", "a second line."], ["another line.", "the last line."]]
    docs = [{"text_list": t, "image_info": [{"image_name": f"img/{2 * i}.png", "matched_text_index": 0},
                                            {"image_name": f"img/{2 * i + 1}.png", "matched_text_index": 1}]}
            for i, t in enumerate(texts)]
    paths = {"llava": tmp_path / "llava.json", "karpathy": tmp_path / "karpathy.json",
             "mmc4": tmp_path / "docs.jsonl", "features": tmp_path / "feats.safetensors"}
    paths["llava"].write_text(json.dumps(llava))
    paths["karpathy"].write_text(json.dumps(karpathy))
    paths["mmc4"].write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    unit = lambda k, d: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(d, generator=torch.Generator().manual_seed(k)), dim=0)
    feats = {data.feature_key("image", f"img/{k}.png"): (unit(k, 6), unit(10 + k, 4)) for k in range(4)}
    feats.update({data.feature_key("text", s): (unit(20 + i, 6), unit(30 + i, 4))
                  for i, s in enumerate(sum(texts, []))})
    data.save_features(paths["features"], feats)
    return paths


def test_user_files_train_and_evaluate(tmp_path):
    p = write_user_files(tmp_path)
    files = ",".join(str(p[k]) for k in ("llava", "karpathy", "mmc4"))
    out = tmp_path / "user.pt"
    train.main(SMOKE + ["--data", files, "--features", str(p["features"]), "--out", str(out)])
    ckpt = train.load_checkpoint(out)
    assert ckpt["done"] and ckpt["method"] == "unified"
    assert all(math.isfinite(t["structure"]) and math.isfinite(t["contrastive"])
               for t in ckpt["history"]["finetune"])
    metrics = E.main(["--ckpt", str(out), "--data", str(p["karpathy"]), "--data-split", "train"])
    # 4 pairs: top-10 holds all
    assert 0 <= metrics["retrieval/t2i_r1"] <= 1 and metrics["retrieval/i2t_r10"] == 1.0
    bad = tmp_path / "bad_karpathy.json"
    bad.write_text(json.dumps({"images": [{"filename": "img/missing.png", "sentences": [{"raw": "a cat."}]},
                                          {"filename": "img/0.png", "sentences": []}]}))
    with pytest.raises(SystemExit, match=r"bad_karpathy.json: 2 problem"):
        E.main(["--ckpt", str(out), "--data", str(bad), "--data-split", "all"])
    with pytest.raises(SystemExit, match=r"missing.png"):
        train.main(SMOKE + ["--data", str(bad), "--data-split", "all", "--out", str(tmp_path / "bad.pt")])
    with pytest.raises(SystemExit, match="needs teacher features for every slice"):
        train.main(SMOKE + ["--data", files, "--out", str(tmp_path / "nofeat.pt")])


def test_a_llava_file_alone_trains(tmp_path):
    """Conversations only: generative pre-training + fine-tuning on the supervised turns, pre-training alone
    with --finetune-steps 0 (whatever the method), and the methods that need pairs or stories say what to
    add."""
    p = write_user_files(tmp_path)
    llava = ["--data", str(p["llava"])]
    out = tmp_path / "gen.pt"
    result = train.train(train.parse_args(SMOKE + llava + ["--method", "generative", "--out", str(out)]),
                         train.Dist(0, 1, torch.device("cpu")))
    assert result.complete and len(result.history["pretrain"]) == len(result.history["finetune"]) == 4
    assert all(set(t) >= {"ntp"} and math.isfinite(t["ntp"]) for t in result.history["finetune"])
    assert train.load_checkpoint(out)["stage"] == "finetune"
    metrics = E.main(["--ckpt", str(out), "--data", str(p["llava"])])
    assert set(metrics) == {"vqa/acc"} and 0 <= metrics["vqa/acc"] <= 1
    only = tmp_path / "pre.pt"
    # unified: its needs don't apply
    train.main(SMOKE + llava + ["--finetune-steps", "0", "--out", str(only)])
    ckpt = train.load_checkpoint(only)
    assert ckpt["stage"] == "pretrain" and ckpt["done"] and not ckpt["history"]["finetune"]
    with pytest.raises(SystemExit, match="needs image-caption pairs: add a Karpathy-style captions file"):
        train.main(SMOKE + llava + ["--method", "vladva", "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="add an MMC4-style .jsonl to --data and its teacher features"):
        train.main(SMOKE + llava + ["--data", f"{p['llava']},{p['karpathy']}", "--method", "sugar",
                                    "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match="trains nothing"):
        train.main(SMOKE + llava
                   + ["--finetune-steps", "0", "--init", str(only), "--out", str(tmp_path / "y.pt")])


def test_fine_tune_from_hugging_face_checkpoints(tmp_path):
    """--llm/--vision: a tiny random Llama (its vocabulary smaller than the tokenizer, so our special tokens
    get new rows) and a CLIP vision tower saved by transformers; fine-tuning runs, and the loaded weights are
    the ones transformers saved."""
    import transformers
    import data
    from unimllm import load_llm
    world = data.make_world("train", 24, 0)
    tok = data.train_tokenizer(data.world_texts(world), 400)
    torch.manual_seed(0)
    llm_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=512, tie_word_embeddings=False)
    transformers.LlamaForCausalLM(llm_cfg).save_pretrained(tmp_path / "llm")
    tok.save(tmp_path / "llm" / "tokenizer.json")
    vis_cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=2)
    transformers.CLIPVisionModel(vis_cfg).save_pretrained(tmp_path / "vision")
    result = run_single(tmp_path / "hf.pt", "--llm", str(tmp_path / "llm"), "--vision",
                        str(tmp_path / "vision"))
    assert result.complete and not result.history["pretrain"] and len(result.history["finetune"]) == 4
    ckpt = train.load_checkpoint(tmp_path / "hf.pt")
    assert ckpt["model_config"]["llm"]["vocab_size"] == tok.vocab_size > 300
    reference = load_llm(tmp_path / "llm").state_dict()
    model, _ = train.checkpoint_model(ckpt, "hf.pt")
    # frozen during fine-tuning: the norm weights and the first 300 embedding rows are transformers' own
    torch.testing.assert_close(model.llm.norm.weight, reference["norm.weight"])
    torch.testing.assert_close(model.llm.embed_tokens.weight[:300], reference["embed_tokens.weight"])



def hub_cache(root: Path, repo: str, files: Path) -> Path:
    """A Hugging Face cache entry by hand, in huggingface_hub's layout: models--owner--name/refs/main holds
    the commit, snapshots/<commit>/ the files."""
    entry = root / ("models--" + repo.replace("/", "--"))
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    snap = entry / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    snap.mkdir(parents=True)
    for f in files.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    return snap


def test_hugging_face_ids_resolve_offline_from_the_cache(tmp_path, monkeypatch):
    """--llm / --vision owner/name: found in a hand-built cache with HF_HUB_OFFLINE=1 (no network); an id not
    in the cache, a missing huggingface_hub and a path that is no id each stop with a message naming the
    flag."""
    huggingface_hub = pytest.importorskip("huggingface_hub")
    import transformers
    import data
    from unimllm import load_llm
    tok = data.train_tokenizer(["a red cube.", "a blue ball."] * 3, 300)
    torch.manual_seed(0)
    llm_cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1,
                                       max_position_embeddings=128)
    hf = transformers.LlamaForCausalLM(llm_cfg).eval()
    hf.save_pretrained(tmp_path / "llm")
    tok.save(tmp_path / "llm" / "tokenizer.json")
    vis_cfg = transformers.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=2)
    transformers.CLIPVisionModel(vis_cfg).save_pretrained(tmp_path / "vision")
    cache = tmp_path / "hub"
    snaps = {r: hub_cache(cache, r, tmp_path / d)
             for r, d in (("tiny/llm", "llm"), ("tiny/vision", "vision"))}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import, so set both
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    ids = SMOKE + ["--llm", "tiny/llm", "--vision", "tiny/vision", "--out", str(tmp_path / "o.pt")]
    cfg = train.parse_args(ids)
    assert (Path(cfg.run.llm), Path(cfg.run.vision)) == (snaps["tiny/llm"], snaps["tiny/vision"])
    x = torch.randint(0, 300, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(load_llm(cfg.run.llm)(x), hf(x).logits)
    with pytest.raises(SystemExit,
                       match=r"--llm tiny/absent: not a local directory, and the Hugging Face Hub"):
        train.parse_args(SMOKE + ["--llm", "tiny/absent", "--vision", "tiny/vision"])
    with pytest.raises(SystemExit, match=r"--vision no/such/dir: no such file or directory"):
        train.parse_args(SMOKE + ["--llm", "tiny/llm", "--vision", "no/such/dir"])
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(SystemExit,
                       match=r"--llm tiny/llm: no such local directory; .*install huggingface_hub"):
        train.parse_args(ids)


# ------------------------------------------------------------------------------------------------------------
# each method's recipe, and the switches of the papers' ablations

ALL_PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def tiny_model():
    from unimllm import LLMConfig, MLLM, MLLMConfig, VisionConfig
    torch.manual_seed(0)
    cfg = MLLMConfig(VisionConfig(image_size=8, patch_size=4, hidden_size=32, num_layers=2,
                                  intermediate_size=64),
                     LLMConfig(vocab_size=40, hidden_size=48, intermediate_size=96, num_layers=2,
                               max_seq_len=64),
                     image_token_id=3, soft_image_token_id=4, soft_text_token_id=5, n_soft_tokens=2,
                     proj_dim=16)
    return MLLM(cfg)


def test_autocast_auto_on_the_cpu_is_bf16_in_the_full_mix_only(tmp_path, monkeypatch):
    """--autocast auto on the CPU: the opening (lookups, then row / column and relations) and the fine-tuning
    run in float32, the pre-training's full mix under bf16 autocast; on CUDA every step is bf16; bf16 and off
    hold for every step."""
    seen, real = [], train.compute_loss

    def spy(*args):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args)

    monkeypatch.setattr(train, "compute_loss", spy)
    train.main(["--smoke", "--lookup-steps", "2", "--where-steps", "1", "--pretrain-steps", "3", "--finetune-steps",
                "2", "--out", str(tmp_path / "a.pt")])
    assert seen == [False] * 3 + [True] * 3 + [False] * 2
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    pre, ft = train.Stage("pretrain", 6, 1e-3, None, restart=3), train.Stage("finetune", 2, 1e-3, None)
    assert all(train.bf16_autocast("auto", cuda, stage, 0) for stage in (pre, ft))
    for device in (cpu, cuda):
        for stage, step in ((pre, 0), (pre, 5), (ft, 0)):
            assert train.bf16_autocast("bf16", device, stage, step)
            assert not train.bf16_autocast("off", device, stage, step)


def test_recipes_follow_the_papers_unless_a_flag_is_given():
    """VladVA: LoRA r = 16, alpha = 16 on every projection, prompts + LoRA. Sugar: LoRA on W_q, W_v with the
    paper's alpha / r = 2 at r = 64 (128 capped by v_proj's 64 outputs), no soft prompts. generative and
    unified (ours): VladVA's r and alpha on the MLP projections only (README, "The count drift"). lr 2e-3 for
    all (the papers' 1e-4 scaled for a few hundred steps). Explicit flags win over the recipe, field by
    field."""
    mlp = {"gate_proj", "up_proj", "down_proj"}
    expected = {"vladva": (ALL_PROJECTIONS, 16, 16.0, 2e-3, "both"),
                "sugar": ({"q_proj", "v_proj"}, 64, 128.0, 2e-3, "lora"),
                "generative": (mlp, 16, 16.0, 2e-3, "lora"),
                "unified": (mlp, 16, 16.0, 2e-3, "both")}
    for method, (projections, r, alpha, lr, adapt) in expected.items():
        ft = train.parse_args(["--method", method]).finetune
        assert (ft.lora_r, ft.lora_alpha, ft.finetune_lr, ft.adapt) == (r, alpha, lr, adapt), method
        model = tiny_model()
        train.add_lora(model, ft)
        assert {n.split(".")[-2] for n, _ in model.named_parameters() if n.endswith("lora_A")} == projections
    ft = train.parse_args(["--method", "sugar", "--lora-r", "8", "--finetune-lr", "1e-4", "--adapt",
                           "both"]).finetune
    assert (ft.lora_r, ft.lora_alpha, ft.finetune_lr, ft.adapt) == (8, 128.0, 1e-4, "both")


@pytest.mark.parametrize("method, flags, expected", [
    ("vladva", [], {"lora", "image_prompt", "text_prompt", "logit_scale"}),
    ("vladva", ["--adapt", "lora"], {"lora", "logit_scale"}),
    ("vladva", ["--adapt", "prompt"], {"image_prompt", "text_prompt", "logit_scale"}),
    ("vladva", ["--adapt", "prompt", "--lambda-ntp", "0"], {"image_prompt", "text_prompt", "logit_scale"}),
    ("sugar", [], {"lora", "projector"}),
    ("sugar", ["--adapt", "both"], {"lora", "image_prompt", "projector"}),
    ("sugar", ["--adapt", "both", "--lambda-ntp", "0"], {"lora", "projector"}),  # no loss reaches the prompt
    ("generative", [], {"lora"}),
    ("unified", [], {"lora", "image_prompt", "text_prompt", "logit_scale", "projector"}),
    ("unified", ["--adapt", "prompt", "--lambda-contrastive", "0"], {"image_prompt", "projector"}),
])
def test_adapt_switch_sets_the_trainable_set(method, flags, expected):
    ft = train.parse_args(["--method", method, *flags]).finetune
    model = tiny_model()
    train.add_lora(model, ft)
    from unimllm import set_trainable
    set_trainable(model, train.trainable_patterns(ft), lora=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = {"lora" if n.endswith(("lora_A", "lora_B")) else n.split(".")[0] for n in trainable}
    assert groups == expected
    lora = {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    assert (lora <= trainable) if "lora" in expected else not (lora & trainable)


def test_no_image_prompt_to_train_without_pairs():
    """A corpus of conversations and documents alone has no <soft_image> anywhere: a trainable image prompt
    would get no gradient, which fine-tuning's DDP (find_unused_parameters=False) refuses at the first step."""
    ft = train.parse_args(["--method", "generative", "--adapt", "both"]).finetune
    assert "image_prompt" in train.trainable_patterns(ft)
    assert "image_prompt" not in train.trainable_patterns(ft, pairs=False)


def test_ablation_flags_stop_with_a_message():
    for flags, msg in ((["--adapt", "all"], "--adapt must be one of lora, prompt, both"),
                       (["--sugar-alignment", "dtw"], "--sugar-alignment must be one of gak, mean"),
                       (["--sugar-kernel", "clip"], "--sugar-kernel must be one of triple, cross"),
                       (["--sugar-pool", "max"], "--sugar-pool must be one of mean, last"),
                       (["--sugar-single", "dot"], "--sugar-single must be one of cosine, gak"),
                       (["--lambda-ntp", "-1"], "--lambda-ntp must be a finite number >= 0"),
                       (["--gak-delta", "0"], "--gak-delta must be a finite number > 0"),
                       (["--method", "generative", "--lambda-ntp", "0"],
                        "leaves --method generative no loss")):
        with pytest.raises(SystemExit, match=msg):
            train.parse_args(flags)


def test_lambda_ntp_delta_and_switches_in_the_checkpoint(tmp_path, capsys):
    """--lambda-ntp weighs the fine-tuning next-token loss only (pre-training keeps 1); delta is estimated
    once before fine-tuning (the median slice distance over the fixed sample, by numpy here), printed, and
    stored with every switch in the checkpoint."""
    import numpy as np
    out = tmp_path / "a.pt"
    flags = ["--lambda-ntp", "0.5", "--sugar-pool", "last", "--sugar-single", "gak"]
    result = run_single(out, *flags)
    for t in result.history["pretrain"]:
        assert t["total"] == pytest.approx(t["ntp"], rel=1e-6)
    ft = train.load_checkpoint(out)["train_config"]["finetune"]
    assert ft["lambda_contrastive"] == train.RECIPES["unified"]["lambda_contrastive"] == 1.0
    assert ft["lambda_structure"] == train.RECIPES["unified"]["lambda_structure"] == 0.3
    for t in result.history["finetune"]:
        want = 0.5 * t["ntp"] + 1.0 * t["contrastive"] + 0.3 * t["structure"]
        assert t["total"] == pytest.approx(want, rel=1e-6)
    switches = (ft["lambda_ntp"], ft["sugar_pool"], ft["sugar_single"], ft["sugar_alignment"], ft["adapt"])
    assert switches == (0.5, "last", "gak", "gak", "both")

    cfg = train.parse_args(SMOKE + ["--out", str(out)])
    corpus = train.builtin_corpus(cfg)
    streams = {k: train.Stream(k, getattr(corpus, k), cfg.run.seed) for k in ("stories", "pairs")}
    n_stories, n_pairs = (min(train.DELTA_SAMPLE, len(streams[k].items)) for k in ("stories", "pairs"))
    samples = streams["stories"].batch(0, n_stories) + train.singles(streams["pairs"].batch(0, n_pairs))
    segs = [s for smp in samples for s in smp.segments]
    uni = np.stack([s.uni.double().numpy() for s in segs])
    cross = np.stack([s.cross.double().numpy() for s in segs])
    img = np.array([s.kind == "image" for s in segs])
    same = img[:, None] == img[None, :]
    d_uni = np.linalg.norm(uni[:, None] - uni[None], axis=-1)
    d_cross = np.linalg.norm(cross[:, None] - cross[None], axis=-1)
    d = np.where(same, d_uni, d_cross)[np.triu_indices(len(segs), 1)]
    d = np.sort(d[d > 0])
    # torch's median: the lower middle
    assert ft["gak_delta"] == pytest.approx(d[(len(d) - 1) // 2], rel=1e-9)
    assert f"GAK delta {ft['gak_delta']:.4f}" in capsys.readouterr().err


def tiny_checkpoint(path, texts, lora: dict | None = None):
    """A checkpoint file as train.py writes one, without training: a tiny random model sized to a tokenizer
    trained on `texts` (32-px images: 16 image tokens)."""
    import data
    from unimllm import CKPT_FIELDS, LLMConfig, MLLM, MLLMConfig, VisionConfig, apply_lora
    tok = data.train_tokenizer(texts, 300)
    torch.manual_seed(0)
    cfg = MLLMConfig(VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2,
                                  intermediate_size=64),
                     LLMConfig(vocab_size=tok.vocab_size, hidden_size=48, intermediate_size=96, num_layers=2,
                               max_seq_len=96),
                     image_token_id=tok.image_id, soft_image_token_id=tok.soft_image_id,
                     soft_text_token_id=tok.soft_text_id, n_soft_tokens=data.n_soft_tokens(tok), proj_dim=16)
    model = MLLM(cfg).eval()
    if lora:
        apply_lora(model, [lora["targets"]], lora["r"], lora["alpha"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.1)
    ckpt = {k: None for k in CKPT_FIELDS} | {"format": train.CKPT_FORMAT, "model_config": cfg.to_dict(),
                                            "tokenizer": tok.to_str(), "model": model.state_dict(),
                                            "lora": lora, "stage": "pretrain", "method": "generative"}
    torch.save(ckpt, path)
    return model, tok


def test_export_cli_writes_what_transformers_loads(tmp_path):
    """`train.py export` on a checkpoint holding a LoRA model: transformers' Llama gives the checkpoint
    model's logits; a missing checkpoint or a file as --out stops with a message."""
    import transformers
    lora = {"targets": r"llm\..*(q_proj|v_proj)", "r": 4, "alpha": 8.0}
    model, tok = tiny_checkpoint(tmp_path / "c.pt", ["a red cube.", "a blue ball."] * 3, lora)
    train.main(["export", "--ckpt", str(tmp_path / "c.pt"), "--out", str(tmp_path / "hf")])
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.llm(x))
    assert json.loads((tmp_path / "hf" / "mllm.json").read_text())["token_ids"]["image"] == tok.image_id
    with pytest.raises(SystemExit, match="no such checkpoint"):
        train.main(["export", "--ckpt", str(tmp_path / "none.pt"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not a directory"):
        train.main(["export", "--ckpt", str(tmp_path / "c.pt"), "--out", str(tmp_path / "c.pt")])


def test_eval_on_llava_and_pope_files(tmp_path, monkeypatch):
    """--data llava.json,pope.jsonl: the union of vqa/* and pope/*. With the model's real greedy answers every
    metric is a fraction; with answers fixed per prompt, each metric equals the count worked out by hand, and
    each prompt is the conversation before its answer."""
    p = write_user_files(tmp_path)
    recs = [{"image": f"img/{k}.png", "type": t, "conversations": [
        {"from": "human", "value": f"<image>\nquestion {k}?"}, {"from": "gpt", "value": a},
        {"from": "human", "value": f"follow-up {k}?"}, {"from": "gpt", "value": "two"}]}
        for k, (t, a) in enumerate([("colour", "red"), ("colour", "the blue."), ("shape", "square")])]
    llava = tmp_path / "llava_test.json"
    llava.write_text(json.dumps(recs))
    pope = tmp_path / "pope.jsonl"
    labels = ["yes", "no", "yes", "no"]
    pope.write_text("".join(json.dumps({"question_id": k, "image": f"img/{k}.png", "text": f"is there {k}?",
                                        "label": lab}) + "\n" for k, lab in enumerate(labels)))
    tiny_checkpoint(tmp_path / "c.pt", ["question follow-up is there red blue square two yes no"] * 3)
    args = ["--ckpt", str(tmp_path / "c.pt"), "--data", f"{llava},{pope}"]
    real = E.main(args)
    assert set(real) == {"vqa/acc", "vqa/colour", "vqa/shape", "pope/acc", "pope/precision", "pope/recall",
                         "pope/f1", "pope/yes_ratio", "pope/one_word"}
    assert all(0 <= v <= 1 for v in real.values())
    fixed = {"question 0?": "Red", "question 1?": "blue", "question 2?": "circle", "follow-up 0?": "2",
             "follow-up 1?": "three", "follow-up 2?": "Two!", "is there 0?": "yes", "is there 1?": "yes",
             "is there 2?": "no", "is there 3?": "No."}
    seen = []

    def answers(model, tok, prompts, device, batch, max_new_tokens=6, desc=""):
        seen.extend([[s.text for s in q.segments] for q in prompts])
        return [fixed[q.segments[-1].text] for q in prompts]
    monkeypatch.setattr(E, "generate_answers", answers)
    m = E.main(args)
    assert seen[1] == [None, "question 0?", "red", "follow-up 0?"]
    # vqa: red ok, 2 ok | blue ok, three wrong | circle wrong, Two! ok -> 4 of 6; colour 3 of 4; shape 1 of 2
    assert (m["vqa/acc"], m["vqa/colour"], m["vqa/shape"]) == (pytest.approx(4 / 6), 0.75, 0.5)
    # pope: tp 1 (0), fp 1 (1), fn 1 (2), tn 1 (3)
    assert (m["pope/acc"] == m["pope/precision"] == m["pope/recall"] == m["pope/f1"] == m["pope/yes_ratio"]
            == 0.5)
    # --answers: one line per question, in the files' order, each marked right or wrong as the metrics count it
    E.main(args + ["--answers", str(tmp_path / "answers.jsonl")])
    lines = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [(x["question"].split("\n")[-1], x["generated"], x["correct"], Path(x["file"]).name) for x in lines] == [
        ("question 0?", "Red", True, "llava_test.json"), ("follow-up 0?", "2", True, "llava_test.json"),
        ("question 1?", "blue", True, "llava_test.json"), ("follow-up 1?", "three", False, "llava_test.json"),
        ("question 2?", "circle", False, "llava_test.json"), ("follow-up 2?", "Two!", True, "llava_test.json"),
        ("is there 0?", "yes", True, "pope.jsonl"), ("is there 1?", "yes", False, "pope.jsonl"),
        ("is there 2?", "no", False, "pope.jsonl"), ("is there 3?", "No.", True, "pope.jsonl")]
    assert [x["kind"] for x in lines] == ["vqa"] * 6 + ["pope"] * 4 and lines[1]["answer"] == "two"
    assert lines[0]["question"] == "<image>\nquestion 0?" and lines[1]["type"] == "colour"
    both = E.main(["--ckpt", str(tmp_path / "c.pt"), "--data", f"{pope},{p['karpathy']}", "--data-split",
                   "all"])
    assert "pope/acc" in both and "retrieval/t2i_r1" in both
    (tmp_path / "pope_b.jsonl").write_text(pope.read_text())
    twice = E.main(["--ckpt", str(tmp_path / "c.pt"), "--data",
                    f"{pope},{llava},{tmp_path / 'pope_b.jsonl'}"])
    assert twice["pope/acc@pope"] == twice["pope/acc@pope_b"] == 0.5 and "pope/acc" not in twice
    assert twice["vqa/acc"] == m["vqa/acc"]


def test_eval_answers_a_prompt_near_the_context_end(tmp_path):
    """A question whose sample fits the context exactly but leaves fewer free positions than the answer
    budget: the answer is cut at the context's end instead of generation refusing."""
    import data
    write_user_files(tmp_path)
    _, tok = tiny_checkpoint(tmp_path / "c.pt",
                             ["question follow-up is there red blue square two yes no"] * 3)
    question = " ".join(["red"] * 70)
    rec = {"image": "img/0.png", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                   {"from": "gpt", "value": "blue"}]}
    (tmp_path / "long.json").write_text(json.dumps([rec]))
    n = data.sample_lengths(data.load_dataset(tmp_path / "long.json").samples, tok, 16)[0]
    assert 96 - 16 < n - 2 < 96  # the prompt (the sample less answer and </s>) leaves under 16 positions
    metrics = E.main(["--ckpt", str(tmp_path / "c.pt"), "--data", str(tmp_path / "long.json")])
    assert set(metrics) == {"vqa/acc"}
