"""What unimllm promises about bad input: a wrong flag, a broken checkpoint or a faulty data file stops the
run before any work with a one-line reason naming the flag / file / field; never a traceback, never a metric
made better by a broken model, never a checkpoint or a temporary file left where it should not be."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as E  # noqa: E402
import train  # noqa: E402

TINY = ["--smoke", "--n-train", "8", "--pretrain-steps", "1", "--finetune-steps", "1"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    train.main(TINY + ["--out", str(out)])
    return out


def png(path: Path, seed: int = 0) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    return path.name


def karpathy(tmp_path: Path, records: list[tuple[str, str]], name: str = "kp.json") -> Path:
    """A Karpathy file of (split, caption) records, one random PNG each."""
    images = [{"filename": png(tmp_path / f"k{i}.png", i), "split": split, "sentences": [{"raw": cap}]}
              for i, (split, cap) in enumerate(records)]
    path = tmp_path / name
    path.write_text(json.dumps({"images": images}))
    return path


def llava_one(tmp_path: Path, answer: str, n_images: int = 1) -> Path:
    paths = [png(tmp_path / f"l{i}.png", i) for i in range(n_images)]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps([{"image": paths, "conversations": [
        {"from": "human", "value": "<image>" * n_images + " what is it?"},
        {"from": "gpt", "value": answer}]}]))
    return path


# ---- metrics never improve because the model broke ---------------------------------------------------------

@pytest.mark.parametrize("metric", ["recall", "pairwise", "winoground"])
def test_metrics_refuse_non_finite_scores(metric):
    s = torch.randn(4, 4)
    # NaN compares False: counting the scores above the positive would rank this query first
    s[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        if metric == "recall":
            E.recall_at_k(s, torch.eye(4, dtype=torch.bool), (1,))
        elif metric == "pairwise":
            E.pairwise_accuracy(s[0], s[1])
        else:
            E.winoground_scores(s.view(4, 2, 2))


def test_nan_checkpoint_gives_no_metric_and_names_the_checkpoint(ckpt, tmp_path):
    broken = torch.load(ckpt, weights_only=True)
    broken["model"]["llm.embed_tokens.weight"][:] = math.nan
    torch.save(broken, tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match=r"nan\.pt: the model's outputs are not finite"):
        E.main(["--ckpt", str(tmp_path / "nan.pt"), "--n-test", "4"])


# ---- every flag is checked before any work -----------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--pretrain-batch", "0"], "--pretrain-batch must be >= 1"),
    (["--lm-batch", "0"], "--lm-batch must be >= 1"),
    (["--pair-batch", "0"], "--pair-batch must be >= 1"),
    (["--caption-batch", "0"], "--caption-batch must be >= 1"),
    (["--caption-batch", "64", "--pair-batch", "32"], "--caption-batch 64 must be at most --pair-batch 32"),
    (["--log-every", "0"], "--log-every must be >= 1"),
    (["--ckpt-every", "0"], "--ckpt-every must be >= 1"),
    (["--lora-r", "0"], "--lora-r must be >= 1"),
    (["--n-train", "0"], "--n-train must be >= 1"),
    (["--pretrain-lr", "-1"], "--pretrain-lr must be > 0"),
    (["--finetune-lr", "nan"], "--finetune-lr must be a finite number"),
    (["--lambda-structure", "-1"], "--lambda-structure must be >= 0"),  # refused, not read as "off"
    (["--lambda-contrastive", "-0.5"], "--lambda-contrastive must be >= 0"),
    (["--stop-after", "-2"], "--stop-after must be >= 0"),  # refused, not ignored
    (["--warmup-frac", "2"], "--warmup-frac is a fraction"),
    (["--image-size", "30"], "--image-size 30 must be a multiple of --patch-size 16"),
    (["--llm-heads", "5"], "--llm-width 64 must be a multiple of --llm-heads 5"),
    (["--data-split", "dev"], "--data-split must be one of"),
    (["--features", "f.safetensors"], "no --data is given"),
    (["--max-len", "10"], "more than --max-len 10"),
])
def test_bad_train_flags_stop_before_the_first_step(tmp_path, flags, message):
    out = tmp_path / "x.pt"
    with pytest.raises(SystemExit, match=message.replace("+", r"\+")):
        train.main(TINY + flags + ["--out", str(out)])
    assert list(tmp_path.iterdir()) == []  # no checkpoint, no temporary file


def test_global_batches_must_split_over_the_ranks(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # what torchrun --nproc_per_node 3 sets
    with pytest.raises(SystemExit, match="--pretrain-batch 8 .* does not split over 3 ranks"):
        train.parse_args(TINY + ["--out", str(tmp_path / "x.pt")])


def test_empty_hugging_face_directories_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--llm .*not a Hugging Face model directory"):
        train.main(TINY + ["--llm", str(tmp_path), "--vision", str(tmp_path), "--out",
                           str(tmp_path / "x.pt")])


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_unwritable_out_is_refused_up_front(tmp_path, where):
    if where == "a directory":
        out, message = tmp_path / "runs", "is a directory"
        out.mkdir()
    else:
        (tmp_path / "plain").write_text("")
        out, message = tmp_path / "plain" / "x.pt", "not a directory"
    with pytest.raises(SystemExit, match=message):
        train.main(TINY + ["--out", str(out)])
    assert not list(tmp_path.rglob("*.tmp*"))


@pytest.mark.parametrize("flags, message", [
    (["--batch", "0"], "--batch must be >= 1"), (["--n-test", "0"], "--n-test must be >= 1"),
    (["--rag-k", "0"], "--rag-k must be >= 1"), (["--blank-images", "2"], "--blank-images must be 0 or 1"),
    (["--data-split", "dev"], "--data-split must be one of"),
    (["--rag-retriever", "cosine"], "--rag-retriever must be auto, embedding or likelihood"),
    (["--rag-prior", "-1"], "--rag-prior must be >= 0"),
])
def test_bad_eval_flags_stop_before_loading(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):  # the checkpoint does not exist: the flag is checked first
        E.main(["--ckpt", str(tmp_path / "none.pt")] + flags)


def test_eval_json_path_checked_before_the_evaluation(ckpt, tmp_path):
    (tmp_path / "plain").write_text("")
    with pytest.raises(SystemExit, match="--json .*not a directory"):
        E.main(["--ckpt", str(tmp_path / "none.pt"), "--json", str(tmp_path / "plain" / "m.json")])
    with pytest.raises(SystemExit, match="--answers .*not a directory"):
        E.main(["--ckpt", str(tmp_path / "none.pt"), "--answers", str(tmp_path / "plain" / "a.jsonl")])
    out = tmp_path / "new" / "dir" / "m.json"  # a missing directory is created, as train.py does for --out
    metrics = E.main(["--ckpt", str(ckpt), "--n-test", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == pytest.approx(metrics)


# ---- checkpoints -------------------------------------------------------------------------------------------

def test_checkpoint_with_format_but_missing_fields_is_refused(tmp_path):
    path = tmp_path / "partial.pt"
    torch.save({"format": train.CKPT_FORMAT, "stage": "finetune"}, path)
    with pytest.raises(SystemExit,
                       match=r"partial\.pt: an incomplete unimllm checkpoint: no step, .*tokenizer"):
        E.main(["--ckpt", str(path)])
    with pytest.raises(SystemExit, match="incomplete unimllm checkpoint"):
        train.main(TINY + ["--init", str(path), "--out", str(tmp_path / "x.pt")])


def test_orphan_temporary_files_are_removed_by_the_next_save(tmp_path):
    out = tmp_path / "a.pt"
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    dead = tmp_path / f"a.pt.tmp{pid_max + 1}"  # no process can have this id: its writer was killed
    alive = tmp_path / f"a.pt.tmp{os.getppid()}"  # a writer still running keeps its file
    other = tmp_path / f"b.pt.tmp{pid_max + 1}"  # another checkpoint's file is not ours to remove
    for p in (dead, alive, other):
        p.write_bytes(b"partial")
    train.save_checkpoint(out, {"x": torch.ones(2)})
    assert torch.load(out, weights_only=True)["x"].tolist() == [1.0, 1.0]
    assert not dead.exists() and alive.exists() and other.exists()


def test_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    def full_disk(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"cannot write the checkpoint .*a\.pt: .*No space left"):
        train.save_checkpoint(tmp_path / "a.pt", {})
    assert list(tmp_path.iterdir()) == []


# ---- data files --------------------------------------------------------------------------------------------

def test_karpathy_training_uses_train_and_restval_only(tmp_path):
    kp = karpathy(tmp_path, [("train", "a cat."), ("restval", "a dog."), ("test", "a cow."),
                             ("val", "a hen.")])
    cfg = train.parse_args(TINY + ["--data", str(kp), "--out", str(tmp_path / "x.pt")])
    _, corpus = train.tokenizer_and_corpus(cfg, None)
    assert sorted(p.short_caption for p in corpus.pairs) == ["a cat.", "a dog."]
    assert "a cow." not in corpus.texts and "a hen." not in corpus.texts  # nor in the tokenizer's text
    cfg = train.parse_args(TINY + ["--data", str(kp), "--data-split", "all", "--out", str(tmp_path / "x.pt")])
    assert len(train.tokenizer_and_corpus(cfg, None)[1].pairs) == 4  # how a user asks for every record
    only_test = karpathy(tmp_path, [("test", "a cow.")], "test_only.json")
    with pytest.raises(SystemExit, match="records of split 'train', found 1 test .*--data-split"):
        train.main(TINY + ["--data", str(only_test), "--method", "vladva", "--out", str(tmp_path / "x.pt")])


def test_karpathy_evaluation_scores_the_test_split_only(ckpt, tmp_path, monkeypatch):
    kp = karpathy(tmp_path, [("train", "a cat."), ("test", "a cow."), ("test", "a hen."),
                             ("restval", "a dog.")])
    seen = []
    real = E.eval_retrieval
    monkeypatch.setattr(E, "eval_retrieval", lambda pairs, *a: seen.append([p.short_caption for p in pairs])
                        or real(pairs, *a))
    E.main(["--ckpt", str(ckpt), "--data", str(kp)])
    E.main(["--ckpt", str(ckpt), "--data", str(kp), "--data-split", "train"])
    assert seen == [["a cow.", "a hen."], ["a cat.", "a dog."]]


def test_over_long_sample_refused_before_the_first_step_from_scratch(tmp_path):
    # 200 one-letter words are at least 200 tokens whatever BPE the run trains: more than the 192 of --max-len
    kp = karpathy(tmp_path, [("train", "a cat."), ("train", "a " * 200 + "dog.")])
    out = tmp_path / "x.pt"
    with pytest.raises(SystemExit, match=r"record 1: field '<sample>': at most 192 tokens"):
        train.main(TINY + ["--data", str(kp), "--method", "generative", "--out", str(out)])
    assert not out.exists() and not train.base_path(out).exists()


def test_check_measures_against_the_training_context(tmp_path):
    # check measures against train.py's default model: 9 tokens per image (48-px images, 16-px patches) and a
    # context of 192. 19 images (171 image tokens + the text) fit; 22 (198) do not.
    import train
    args = train.ModelArgs()
    assert data.N_IMAGE_TOKENS == (args.image_size // args.patch_size) ** 2 == 9
    assert data.check(llava_one(tmp_path, "red", n_images=19)) == []
    (tmp_path / "more").mkdir()
    problems = data.check(llava_one(tmp_path / "more", "red", n_images=22))
    assert [(p.index, p.field) for p in problems] == [(0, "<sample>")]
    assert "at most 192" in problems[0].expected


def test_check_counts_the_soft_prompt_of_pairs(tmp_path):
    kp = karpathy(tmp_path, [("train", "a small red square to the left of a blue circle.")])
    tok = data.train_tokenizer(data.world_texts(data.make_world("train", 8, 0)), 600)
    pair = data.load_dataset(kp).pairs[0]
    # the sequence training builds
    batch = data.collate_pairs([pair], tok, 16, data.n_soft_tokens(tok), 10 ** 6)
    n = batch["img_ids"].shape[1]
    assert data.check(kp, tok, n_image_tokens=16, max_len=n) == []
    assert [p.field for p in data.check(kp, tok, n_image_tokens=16, max_len=n - 1)] == ["<pair>"]


def test_decompression_bomb_is_a_data_problem(tmp_path, monkeypatch):
    kp = karpathy(tmp_path, [("train", "a cat.")])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 32x32 = 1024 pixels, over twice the limit
    assert [p.field for p in data.check(kp)] == ["filename"] and "too large" in data.check(kp)[0].expected
    with pytest.raises(SystemExit, match=r"(?s)--data .*record 0: field 'filename': image .* too large"):
        train.main(TINY + ["--data", str(kp), "--method", "vladva", "--out", str(tmp_path / "x.pt")])


def test_16_bit_png_keeps_its_grey_level(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "g16.png")  # mode I;16
    x = data.load_image(tmp_path / "g16.png", 8)
    torch.testing.assert_close(x, torch.full((3, 8, 8), 32768 / 65535), atol=1 / 255, rtol=0)


@pytest.mark.parametrize("name, text", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n"),
                                        ("kp.json", '{"images": []}')])
def test_empty_file_fails_check(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert [p.expected for p in data.check(tmp_path / name)] == ["at least one record (the file has none)"]


@pytest.mark.parametrize("kind", ["garbage", "not features"])
def test_features_errors_are_reported_as_features(tmp_path, kind):
    kp = karpathy(tmp_path, [("train", "a cat.")])
    feats = tmp_path / ("f.safetensors" if kind == "garbage" else "f.json")
    feats.write_bytes(b"\x00" * 5) if kind == "garbage" else feats.write_text(kp.read_text())
    with pytest.raises(SystemExit, match=r"train\.py: --features .*f\."):
        train.main(TINY + ["--data", str(kp), "--features", str(feats), "--out", str(tmp_path / "x.pt")])


def test_each_problem_is_reported_once_in_json_terms(tmp_path):
    png(tmp_path / "k0.png")
    cases = {
        "k.json": json.dumps({"images": [{"filename": "k0.png", "split": "train",
                                          "sentences": [{"text": "x"}]}]}),
        "l.json": json.dumps([{"conversations": ["hello", {"from": "gpt", "value": "hi"}]}]),
        "m.jsonl": json.dumps({"text_list": ["a"], "image_info": [{"image_name": "k0.png",
                                                                    "matched_text_index": None}]}),
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    assert [str(p) for p in data.check(tmp_path / "k.json")] == [
        "record 0.sentences[0]: field 'raw': a required field 'raw' (missing)"]
    assert [str(p) for p in data.check(tmp_path / "l.json")] == [
        "record 0.conversations[0]: field '<record>': a JSON object, got string"]
    assert [str(p) for p in data.check(tmp_path / "m.jsonl")] == [
        "record 1.image_info[0]: field 'matched_text_index': type integer, got null"]
    feats = tmp_path / "f.safetensors"
    # .uni is not unit norm
    data.save_features(feats, {"image:a.png": (torch.ones(3), torch.ones(2) / 2 ** .5)})
    assert [(p.index, p.field) for p in data.check(feats)] == [("image:a.png.uni", "uni")]


def test_mmc4_records_are_numbered_by_line_from_one(tmp_path):
    png(tmp_path / "k0.png")
    good = json.dumps({"text_list": ["a"], "image_info": [{"image_name": "k0.png", "matched_text_index": 0}]})
    (tmp_path / "m.jsonl").write_text(good + "\n{broken\n" + good + "\n")
    assert [(p.index, p.field) for p in data.check(tmp_path / "m.jsonl")] == [(2, "<line>")]


def test_winoground_problems_name_the_file_line_and_field(tmp_path, ckpt):
    png(tmp_path / "k0.png")
    png(tmp_path / "k1.png", 1)
    good = {"id": 0, "image_0": "k0.png", "image_1": "k1.png", "caption_0": "a cat on a mat",
            "caption_1": "a mat on a cat"}
    lines = [good, {**good, "caption_1": None}, {k: v for k, v in good.items() if k != "image_0"},
             {**good, "image_1": "nope.png"}, {**good, "caption_1": "a cat on a mat "},
             {**good, "image_1": "k0.png"}]
    path = tmp_path / "wino.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{broken\n")
    assert [str(p) for p in data.check(path)] == [
        "record 2: field 'caption_1': type string, got null",
        "record 3: field 'image_0': a required field 'image_0' (missing)",
        f"record 4: field 'image_1': missing image file {tmp_path / 'nope.png'}",
        "record 5: field 'caption_1': a caption other than caption_0, got the same text twice",
        "record 6: field 'image_1': an image other than image_0, got 'k0.png' twice",
        "record 7: field '<line>': valid JSON (Expecting property name enclosed in double quotes)"]
    with pytest.raises(SystemExit, match=r"(?s)eval\.py: .*wino\.jsonl: 6 problem\(s\) "
                                         r"\(records numbered by line\):.*record 3: field 'image_0'"):
        E.main(["--ckpt", str(ckpt), "--data", str(path)])


def test_interleaved_suite_refuses_documents_it_cannot_query(tmp_path):
    """MMC4 files whose documents give no query (each image comes first), or a sentence that cannot fit the
    context with the summary's soft prompt, stop with the reason, not a metric over nothing or a traceback."""
    from test_train import tiny_checkpoint
    png(tmp_path / "k0.png")
    model, tok = tiny_checkpoint(tmp_path / "c.pt", ["red red red blue cat"] * 3)
    first = tmp_path / "first.jsonl"
    first.write_text(json.dumps({"text_list": ["a cat."], "image_info": [{"image_name": "k0.png",
                                                                           "matched_text_index": 0}]}) + "\n")
    with pytest.raises(SystemExit, match="first.jsonl: no image with anything before it"):
        E.main(["--ckpt", str(tmp_path / "c.pt"), "--data", str(first)])
    long = " ".join(["red"] * 65)
    doc = {"text_list": ["blue.", long], "image_info": [{"image_name": "k0.png", "matched_text_index": 1}]}
    path = tmp_path / "long.jsonl"
    path.write_text("\n" + json.dumps(doc) + "\n")
    room = model.cfg.llm.max_seq_len - model.cfg.n_soft_tokens
    # the document fits the context; its sentence with the soft prompt does not
    data.load_dataset(path, tok, max_len=model.cfg.llm.max_seq_len)
    assert data.sample_lengths([data.Sample([data.text_seg(long, False)])], tok, 16)[0] > room
    with pytest.raises(SystemExit, match=r"long.jsonl: record 2: a sentence with the summary's soft prompt"):
        E.main(["--ckpt", str(tmp_path / "c.pt"), "--data", str(path)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a CUDA GPU")
@pytest.mark.parametrize("script", [pytest.param("bench_dtw.py", marks=pytest.mark.reference("tslearn.metrics")),
                                    "bench_train.py", "bench_generate.py"])
def test_benchmarks_refuse_cuda_without_a_gpu(script):
    """`--device cuda` on a machine without a GPU stops with one line naming the flag, not a traceback from
    torch's lazy CUDA init deep inside the benchmark."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--device", "cuda"], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.strip() == f"{script}: --device cuda needs a CUDA device", done.stderr[-2000:]


@pytest.mark.parametrize("flag", ["--pair-batches", "--caption-chunks"])
@pytest.mark.parametrize("value, message", [("32,x", "{} takes comma-separated integers, got '32,x'"),
                                            ("32,0", "every {} value must be >= 1, got '32,0'")])
def test_bench_train_refuses_bad_lists(flag, value, message):
    message = message.format(flag)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_train.py"), flag, value],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and done.stderr.strip() == f"bench_train.py: {message}", done.stderr[-2000:]
