"""
Tests for unimllm.py. References are independent: Hugging Face `transformers` models with random weights that
the tests create and save (Llama tied/untied, Qwen2 with q/k/v biases, a sharded checkpoint, CLIP / SigLIP
vision towers, a full CLIPModel), brute-force Python loops for the interleaved embedding and pooling, and the
base model for LoRA. Run: python -m pytest tests/test_unimllm.py
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import data
import unimllm as um

try:
    import transformers
    transformers.logging.set_verbosity_error()
# only the tests marked TRANSFORMERS use it (tests/conftest.py skips them, or fails them under CI)
except ImportError:
    transformers = None
TRANSFORMERS = pytest.mark.reference("transformers")

VOCAB = 97


def tiny_llama(tie: bool, llama3_rope: bool = False) -> "transformers.LlamaForCausalLM":
    rope = {"rope_type": "default", "rope_theta": 500.0}
    # wavelengths 2pi..~1500 straddle both thresholds (64/4 and 64/1): all three regimes are hit
    if llama3_rope:
        rope = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=112,
                                   num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_parameters=rope, tie_word_embeddings=tie, rms_norm_eps=1e-5)
    return randomize(transformers.LlamaForCausalLM(cfg))


def tiny_qwen2() -> "transformers.Qwen2ForCausalLM":
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=112,
                                   num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    return randomize(transformers.Qwen2ForCausalLM(cfg))


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    # HF initialises biases to zero and norms to one; random values make every parameter count in the
    # comparison
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1
                        + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf")
    out = {}
    torch.manual_seed(0)
    for name, model, shard in (("llama_tied", tiny_llama(True), None),
                               ("llama_untied", tiny_llama(False), None),
                               ("llama3_rope", tiny_llama(False, llama3_rope=True), None),
                               ("qwen2_sharded", tiny_qwen2(), "40KB")):
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(root / name, **kwargs)
        out[name] = (root / name, model)
    assert (root / "qwen2_sharded" / "model.safetensors.index.json").is_file()
    return out


LLM_NAMES = ["llama_tied", "llama_untied", "llama3_rope", "qwen2_sharded"]


@TRANSFORMERS
@pytest.mark.parametrize("name", LLM_NAMES)
def test_llm_logits_and_hidden_match_transformers(saved, name: str) -> None:
    path, hf = saved[name]
    llm = um.load_llm(path)
    assert llm.cfg.tie_embeddings == (name == "llama_tied")
    assert (llm.cfg.rope_scaling_factor == 8.0) == (name == "llama3_rope")
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids)
        ref_hidden = hf.model(ids).last_hidden_state
        logits, hidden = llm(ids, return_hidden=True)
        chosen = torch.rand(2, 11, generator=torch.Generator().manual_seed(2)) < 0.4  # training's subset
        predict = chosen.flatten().nonzero().squeeze(1)  # (N,) flat indices, row-major
        some = llm(ids, predict=predict)
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(hidden, ref_hidden)
    assert some.shape == (int(chosen.sum()), VOCAB)
    torch.testing.assert_close(some, ref.logits[chosen])  # boolean indexing: the same positions, row-major


@TRANSFORMERS
@pytest.mark.parametrize("name", LLM_NAMES)
def test_kv_cache_chunks_match_transformers(saved, name: str) -> None:
    path, hf = saved[name]
    llm = um.load_llm(path)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    cache = um.KVCache(llm.cfg, 2, 12, ids.device, torch.float32)
    with torch.no_grad():
        ref = hf(ids).logits
        chunks = [llm(ids[:, :5], kv_cache=cache), llm(ids[:, 5:6], kv_cache=cache, start_pos=5),
                  llm(ids[:, 6:9], kv_cache=cache, start_pos=6), llm(ids[:, 9:], kv_cache=cache, start_pos=9)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), ref)


@TRANSFORMERS
@pytest.mark.parametrize("name", LLM_NAMES)
def test_greedy_generate_matches_transformers(saved, name: str) -> None:
    path, hf = saved[name]
    llm = um.load_llm(path)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False)[:, 7:]
    ours = llm.generate(ids, max_new_tokens=20)
    assert torch.equal(ours, ref)
    assert torch.equal(llm.generate(ids, max_new_tokens=20, use_cache=False), ref)


@TRANSFORMERS
@pytest.mark.parametrize("use_cache", [True, False])
def test_right_padded_batch_generate_matches_rows_alone(saved, use_cache: bool) -> None:
    path, hf = saved["qwen2_sharded"]
    llm = um.load_llm(path)
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    lengths = torch.tensor([9, 4, 6])
    ids[1, 4:], ids[2, 6:] = 0, 0  # right padding
    ours = llm.generate(ids, max_new_tokens=10, lengths=lengths, use_cache=use_cache)
    for b, n in enumerate(lengths.tolist()):
        with torch.no_grad():
            ref = hf.generate(ids[b:b + 1, :n], max_new_tokens=10, do_sample=False)[0, n:]
        assert torch.equal(ours[b], ref), b
    with pytest.raises(ValueError, match="lengths"):
        llm.generate(ids, lengths=torch.tensor([9, 0, 6]))


@TRANSFORMERS
def test_greedy_generate_eos_matches_transformers(saved) -> None:
    path, hf = saved["llama_untied"]
    llm = um.load_llm(path)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    free = llm.generate(ids, max_new_tokens=20)
    eos = int(free[0, 4])  # a token row 0 emits mid-way
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=eos)[:, 7:]
    assert torch.equal(llm.generate(ids, max_new_tokens=20, eos_id=eos), ref)


@TRANSFORMERS
def test_sampling_is_seeded_and_in_vocab(saved) -> None:
    llm = um.load_llm(saved["llama_tied"][0])
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    a = llm.generate(ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    b = llm.generate(ids, max_new_tokens=8, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 8) and int(a.max()) < VOCAB


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 200), st.integers(0, 40), st.floats(100.0, 1e6))
def test_rope_scores_depend_only_on_relative_position(shift: int, gap: int, theta: float) -> None:
    # RoPE's defining property (Su et al. Eq. 16): <R_m q, R_n k> = <q, R_(n-m) k>
    g = torch.Generator().manual_seed(shift + gap)
    q, k = torch.randn(1, 1, 1, 16, generator=g, dtype=torch.float64), torch.randn(1, 1, 1, 16, generator=g,
                                                                                   dtype=torch.float64)

    inv_freq = um.rope_inv_freq(um.LLMConfig(vocab_size=8, hidden_size=32, num_heads=2, rope_theta=theta),
                                q.device)

    def score(m: int, n: int) -> torch.Tensor:
        cq, sq = um.rope_cos_sin(torch.tensor([[m]]), inv_freq, torch.float64)
        ck, sk = um.rope_cos_sin(torch.tensor([[n]]), inv_freq, torch.float64)
        return (um.apply_rope(q, cq, sq) * um.apply_rope(k, ck, sk)).sum()

    torch.testing.assert_close(score(shift, shift + gap), score(0, gap), rtol=1e-5, atol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.sampled_from([(64, 2, 1), (96, 4, 2), (192, 6, 6), (192, 6, 2), (256, 8, 4), (384, 6, 3)]),
       st.integers(0, 2**16))
def test_initial_attention_logits_have_unit_variance(shape: tuple[int, int, int], seed: int) -> None:
    # From the definition: for x with unit-RMS entries (what input_layernorm gives at init) and W_q, W_k with
    # N(0, 1/d) entries, q and k have unit-variance entries, so q.k / sqrt(head_dim) has variance 1. With
    # N(0, 0.02) weights it would be (0.02^2 d)^2, about 0.006 at d = 192: attention near uniform at init.
    d, heads, kv_heads = shape
    torch.manual_seed(seed)
    cfg = um.MLLMConfig(um.VisionConfig(image_size=8, patch_size=4, hidden_size=32, num_layers=1,
                                        intermediate_size=64),
                        um.LLMConfig(vocab_size=VOCAB, hidden_size=d, intermediate_size=2 * d, num_layers=2,
                                     num_heads=heads, num_kv_heads=kv_heads, max_seq_len=64),
                        image_token_id=IMG, soft_image_token_id=SOFT_IMG, soft_text_token_id=SOFT_TXT,
                        n_soft_tokens=K, proj_dim=16)
    model, hd = um.MLLM(cfg), d // heads
    for layer in model.llm.layers:
        attn = layer.self_attn
        x_q, x_k = layer.input_layernorm(torch.randn(2, 4000, d))  # unit-RMS rows
        with torch.no_grad():
            q = attn.q_proj(x_q).view(4000, heads, hd)
            k = attn.k_proj(x_k).view(4000, kv_heads, hd).repeat_interleave(heads // kv_heads, dim=1)
        logits = (q * k).sum(-1) / math.sqrt(hd)  # (4000, heads): independent query-key pairs
        assert 0.75 < float(logits.std()) < 1.33, float(logits.std())


# ------------------------------------------------------------------------------------------------------------
# vision towers

VISION_KW = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=16, patch_size=4)


@pytest.fixture(scope="module")
def vision_saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("hf_vision")
    torch.manual_seed(0)
    models = {
        "clip": transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION_KW)),
        "siglip": transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**VISION_KW)),
        "clip_full": transformers.CLIPModel(transformers.CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=50, bos_token_id=0, eos_token_id=1, pad_token_id=1),
            vision_config=VISION_KW, projection_dim=16)),
        "siglip_full": transformers.SiglipModel(transformers.SiglipConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             vocab_size=50, projection_size=32), vision_config=VISION_KW)),
    }
    out = {}
    for name, model in models.items():
        randomize(model).save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


def hf_vision_hidden(name: str, model: torch.nn.Module, x: torch.Tensor):
    vm = model.vision_model if name.endswith("_full") else model
    return vm(pixel_values=x, output_hidden_states=True)


@TRANSFORMERS
@pytest.mark.parametrize("name", ["clip", "siglip", "clip_full", "siglip_full"])
def test_vision_hidden_states_match_transformers(vision_saved, name: str) -> None:
    path, hf = vision_saved[name]
    enc = um.load_vision(path)
    assert enc.cfg.use_cls == name.startswith("clip")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = hf_vision_hidden(name, hf, x)
        assert len(ref.hidden_states) == 4
        for layer in range(-4, 4):
            torch.testing.assert_close(enc(x, layer=layer), ref.hidden_states[layer], msg=f"layer {layer}")
        pooled = enc.pooled(x)
    if name.startswith("siglip"):
        # SigLIP applies post_layernorm to every token
        torch.testing.assert_close(pooled, ref.last_hidden_state)
    else:
        torch.testing.assert_close(pooled[:, 0], ref.pooler_output)  # CLIP: post_layernorm on CLS only


@TRANSFORMERS
@pytest.mark.parametrize("feature_layer", [-2, -1, 1])
def test_image_features_match_clip_processor_and_hidden_states(vision_saved, tmp_path: Path,
                                                               feature_layer: int) -> None:
    """The whole image path, a PNG -> data.load_image -> MLLM.vision_features, against transformers' own: the
    CLIP image processor (shortest edge resized to the tower's size with bicubic, centre crop, x 1/255, CLIP's
    mean / std) and CLIPVisionModel's hidden_states[feature_layer] with the CLS token dropped (LLaVA-1.5)."""
    path, hf = vision_saved["clip"]
    enc = um.load_vision(path)
    llm = um.LLMConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_layers=1, max_seq_len=64)
    cfg = um.MLLMConfig(enc.cfg, llm, feature_layer=feature_layer, image_token_id=IMG,
                        soft_image_token_id=SOFT_IMG, soft_text_token_id=SOFT_TXT, n_soft_tokens=K)
    m = um.MLLM(cfg).eval()
    m.vision.load_state_dict(enc.state_dict())
    size = enc.cfg.image_size
    rng = np.random.default_rng(0)
    files = []
    for i in range(2):  # twice the tower's size: the resize is part of the path
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (2 * size, 2 * size, 3), dtype=np.uint8)).save(files[-1])
    square = {"height": size, "width": size}
    proc = transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=square)
    pixels = proc(images=[Image.open(f) for f in files], return_tensors="pt")["pixel_values"]  # (2, 3, S, S)
    images = torch.stack([data.load_image(f, size) for f in files])  # (2, 3, S, S) in [0, 1]
    with torch.no_grad():
        ref = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[feature_layer][:, 1:]
        got = m.vision_features(images)
    assert got.shape == ref.shape == (2, enc.cfg.num_patches, enc.cfg.hidden_size)
    torch.testing.assert_close(got, ref)


@TRANSFORMERS
def test_vision_rejects_bad_layer_and_shape(vision_saved) -> None:
    enc = um.load_vision(vision_saved["clip"][0])
    with pytest.raises(ValueError, match="out of range"):
        enc(torch.zeros(1, 3, 16, 16), layer=4)
    with pytest.raises(ValueError, match="pixel_values"):
        enc(torch.zeros(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------------------
# loader errors


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_weights(path: Path, fn) -> None:
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors")


@TRANSFORMERS
def test_loader_missing_tensor(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_untied"][0], tmp_path / "m")
    edit_weights(p, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        um.load_llm(p)


@TRANSFORMERS
def test_loader_extra_tensor(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_tied"][0], tmp_path / "m")
    edit_weights(p, lambda sd: sd.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        um.load_llm(p)


@TRANSFORMERS
def test_loader_untied_lm_head_in_tied_model_is_extra(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_tied"][0], tmp_path / "m")
    edit_weights(p, lambda sd: sd.__setitem__("lm_head.weight", torch.randn(VOCAB, 64)))
    with pytest.raises(ValueError, match="unexpected tensor 'lm_head.weight'"):
        um.load_llm(p)


@TRANSFORMERS
def test_loader_tied_duplicate_lm_head_is_accepted(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_tied"][0], tmp_path / "m")
    edit_weights(p, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"].clone()))
    torch.testing.assert_close(um.load_llm(p)(torch.arange(5)[None]),
                               saved["llama_tied"][1](torch.arange(5)[None]).logits)


@TRANSFORMERS
def test_loader_wrong_shape(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_untied"][0], tmp_path / "m")
    edit_weights(p, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(ValueError, match=r"'norm\.weight' has shape \(63,\), expected \(64,\)"):
        um.load_llm(p)


@TRANSFORMERS
def test_loader_vision_missing_and_extra(vision_saved, tmp_path: Path) -> None:
    p = copy_dir(vision_saved["clip"][0], tmp_path / "m")
    edit_weights(p, lambda sd: sd.pop("pre_layrnorm.weight"))
    with pytest.raises(ValueError, match="missing tensor 'pre_layrnorm.weight'"):
        um.load_vision(p)
    p = copy_dir(vision_saved["siglip"][0], tmp_path / "s")
    edit_weights(p, lambda sd: sd.__setitem__("pre_layrnorm.weight", torch.ones(32)))
    with pytest.raises(ValueError, match="unexpected tensor 'pre_layrnorm.weight'"):
        um.load_vision(p)


@TRANSFORMERS
def test_loader_unsupported_model_type(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_tied"][0], tmp_path / "m")
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        um.load_llm(p)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        um.load_vision(p)


@TRANSFORMERS
def test_loader_rope_theta_top_level(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_tied"][0], tmp_path / "m")
    cfg = json.loads((p / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg["rope_theta"] = 500.0  # the transformers < 5 layout
    (p / "config.json").write_text(json.dumps(cfg))
    assert um.load_llm(p).cfg.rope_theta == 500.0
    cfg["rope_scaling"] = {"type": "yarn", "factor": 2.0}
    (p / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        um.load_llm(p)


@TRANSFORMERS
def test_loader_missing_files(saved, tmp_path: Path) -> None:
    p = copy_dir(saved["llama_tied"][0], tmp_path / "m")
    (p / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        um.load_llm(p)
    (p / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        um.load_llm(p)
    q = copy_dir(saved["qwen2_sharded"][0], tmp_path / "q")
    (q / "model-00002-of-{:05d}.safetensors".format(len(list(q.glob("model-*.safetensors"))))).unlink()
    with pytest.raises(FileNotFoundError, match="missing shard"):
        um.load_llm(q)


# ------------------------------------------------------------------------------------------------------------
# the MLLM

IMG, SOFT_IMG, SOFT_TXT, K = 90, 91, 92, 3


def tiny_mllm(seed: int = 0) -> um.MLLM:
    torch.manual_seed(seed)
    cfg = um.MLLMConfig(um.VisionConfig(image_size=8, patch_size=4, hidden_size=32, num_layers=2,
                                        intermediate_size=64),
                        um.LLMConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_layers=2,
                                     max_seq_len=64),
                        image_token_id=IMG, soft_image_token_id=SOFT_IMG, soft_text_token_id=SOFT_TXT,
                        n_soft_tokens=K, proj_dim=16)
    return um.MLLM(cfg).eval()


def interleaved_ids() -> torch.Tensor:
    # row 0: text, image A, soft image prompt, text ; row 1: image B, text, image C, soft text prompt, pad
    p = 4
    r0 = [1, 5, 6] + [IMG] * p + [SOFT_IMG] * K + [7, 8, 9, 10, 11]
    r1 = [IMG] * p + [12] + [IMG] * p + [SOFT_TXT] * K + [13, 0, 0]
    assert len(r0) == len(r1)
    return torch.tensor([r0, r1])


def test_embed_fills_images_and_prompts_in_order() -> None:
    m = tiny_mllm()
    ids, images = interleaved_ids(), torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        x = m.embed(ids, images)
        mean, std = (torch.tensor(v)[:, None, None] for v in (m.cfg.image_mean, m.cfg.image_std))
        # (3, 4, D), CLIP pixel normalisation
        feats = m.adapter(m.vision((images - mean) / std, layer=-2)[:, 1:])
    # brute force: walk the sequence, counting images and soft-prompt positions
    img_i, tok_i, soft = 0, 0, {SOFT_IMG: 0, SOFT_TXT: 0}
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1]):
            i = int(ids[b, t])
            if i == IMG:  # patch tok_i of a 2x2 grid, row-major: its row's and its column's embedding added
                want = feats[img_i, tok_i] + m.image_row[tok_i // 2] + m.image_col[tok_i % 2]
                tok_i += 1
                if tok_i == 4:
                    img_i, tok_i = img_i + 1, 0
            elif i in soft:
                prompt = m.image_prompt if i == SOFT_IMG else m.text_prompt
                want = prompt[soft[i] % K]
                soft[i] += 1
            else:
                want = m.llm.embed_tokens.weight[i]
            torch.testing.assert_close(x[b, t], want, msg=f"position {b},{t}")
    assert img_i == 3


def test_embed_count_mismatch_raises() -> None:
    m = tiny_mllm()
    with pytest.raises(ValueError, match="2 images but 3 <image> placeholders"):
        m.embed(interleaved_ids(), torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="0 images but 3 <image> placeholders"):
        m.embed(interleaved_ids())
    bad = interleaved_ids()
    bad[0, 3] = 5  # an image run one id short
    with pytest.raises(ValueError, match="<image> ids must come in runs of 4"):
        m.embed(bad, torch.rand(3, 3, 8, 8))
    split = interleaved_ids()
    split[1, 4], split[1, 2] = IMG, 12  # right count per row, but image B is split in two
    with pytest.raises(ValueError, match="a group is split"):
        m.embed(split, torch.rand(3, 3, 8, 8))
    soft = interleaved_ids()
    soft[0, 8] = 5  # a soft image prompt one id short
    with pytest.raises(ValueError, match="<soft_image> ids must come in runs of 3"):
        m.embed(soft, torch.rand(3, 3, 8, 8))


def test_init_soft_prompts_copies_embeddings() -> None:
    m = tiny_mllm()
    m.init_soft_prompts([4, 5, 6], [7, 8, 9])
    torch.testing.assert_close(m.image_prompt.detach(), m.llm.embed_tokens.weight[[4, 5, 6]].detach())
    torch.testing.assert_close(m.text_prompt.detach(), m.llm.embed_tokens.weight[[7, 8, 9]].detach())
    with pytest.raises(ValueError, match="expected n_soft_tokens=3"):
        m.init_soft_prompts([4, 5], [7, 8, 9])


def test_summary_and_prefix_embeddings_match_loops() -> None:
    m = tiny_mllm()
    hidden = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(6))
    pos = torch.tensor([3, 9])
    s = m.summary_embedding(hidden, pos)
    for b in range(2):
        torch.testing.assert_close(s[b], hidden[b, pos[b]] / hidden[b, pos[b]].norm())
    seg_batch, seg_start = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 2, 6, 0, 4])
    seg_end, seg_is_image = torch.tensor([2, 6, 9, 4, 7]), torch.tensor([False, True, False, True, False])
    prefix_seg = torch.tensor([1, 2, 3, 4])
    with torch.no_grad():
        r = m.prefix_embeddings(hidden, seg_batch, seg_start, seg_end, seg_is_image, prefix_seg)
        for p, s_i in enumerate(prefix_seg.tolist()):
            b, st, en = int(seg_batch[s_i]), int(seg_start[s_i]), int(seg_end[s_i])
            vec = hidden[b, st:en].mean(0) if seg_is_image[s_i] else hidden[b, en - 1]
            want = m.projector(vec)
            torch.testing.assert_close(r[p], want / want.norm())


def test_prefix_embeddings_last_image_token_pool_matches_loop() -> None:
    """pool="last" (Sugar Table 4b "w/o AvgPool") takes an image's last token instead of the mean over its
    tokens and leaves text segments (their last token) as they are."""
    m = tiny_mllm()
    hidden = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(7))
    seg_batch, seg_start = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 2, 6, 0, 4])
    seg_end, seg_is_image = torch.tensor([2, 6, 9, 4, 7]), torch.tensor([False, True, False, True, False])
    prefix_seg = torch.tensor([0, 1, 2, 3, 4])
    segs = (seg_batch, seg_start, seg_end, seg_is_image, prefix_seg)
    with torch.no_grad():
        last = m.prefix_embeddings(hidden, *segs, pool="last")
        mean = m.prefix_embeddings(hidden, *segs, pool="mean")
        for p, s_i in enumerate(prefix_seg.tolist()):
            want = m.projector(hidden[int(seg_batch[s_i]), int(seg_end[s_i]) - 1])
            torch.testing.assert_close(last[p], want / want.norm())
            assert torch.equal(last[p], mean[p]) != bool(seg_is_image[s_i])  # only image prefixes change
    with pytest.raises(ValueError, match="pool must be"):
        m.prefix_embeddings(hidden, seg_batch, seg_start, seg_end, seg_is_image, prefix_seg, pool="max")


def test_set_trainable_without_lora_freezes_lora() -> None:
    m = tiny_mllm()
    um.apply_lora(m, [r"llm\.layers\.\d+\.self_attn\.(q|v)_proj$"], r=2, alpha=2)
    trainable = um.set_trainable(m, ["image_prompt"], lora=False)
    assert trainable == ["image_prompt"]
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"image_prompt"}


def test_mllm_forward_and_generate_with_images() -> None:
    m = tiny_mllm()
    ids, images = interleaved_ids()[:1, :12], torch.rand(1, 3, 8, 8)
    logits, hidden = m(ids, images)
    assert logits.shape == (1, 12, VOCAB) and hidden.shape == (1, 12, 48)
    out = m.generate(ids, images, max_new_tokens=6)
    # reference: recompute the whole interleaved sequence each step, no cache
    seq = ids
    with torch.no_grad():
        for _ in range(6):
            nxt = m(seq, images)[0][:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq[:, 12:])


def test_logit_scale_init_and_n_image_tokens() -> None:
    m = tiny_mllm()
    assert m.n_image_tokens == 4
    assert math.isclose(float(m.logit_scale.detach()), math.log(1 / 0.07), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# LoRA


def test_lora_identity_at_init_merge_and_training_step() -> None:
    base, m = tiny_mllm(), tiny_mllm()
    ids, images = interleaved_ids(), torch.rand(3, 3, 8, 8)
    names = um.apply_lora(m, [r"llm\.layers\.\d+\.self_attn\.(q|v)_proj$"], r=4, alpha=8)
    assert len(names) == 4
    with torch.no_grad():
        ref = base(ids, images)[0]
        torch.testing.assert_close(m(ids, images)[0], ref)  # B = 0 at init
    trainable = um.set_trainable(m, ["image_prompt", "text_prompt", "projector", "logit_scale"])
    assert set(trainable) == {n for n, _ in m.named_parameters()
                              if n.endswith(("lora_A", "lora_B")) or n.split(".")[0] in
                              ("image_prompt", "text_prompt", "projector", "logit_scale")}
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    logits, hidden = m(ids, images)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)) + hidden.square().mean()
    loss = loss + m.prefix_embeddings(hidden, torch.tensor([0]), torch.tensor([0]), torch.tensor([4]),
                                      torch.tensor([True]), torch.tensor([0])).sum() + m.logit_scale
    loss.backward()
    opt.step()
    for n, p in m.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        assert changed == (n in trainable), n
    with torch.no_grad():
        unmerged = m(ids, images)[0]
        um.merge_lora(m)
        assert not any(isinstance(mod, um.LoRALinear) for mod in m.modules())
        assert set(dict(m.named_parameters())) == set(dict(base.named_parameters()))
        torch.testing.assert_close(m(ids, images)[0], unmerged)


def test_lora_merge_method_and_bad_patterns() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 6)
    ref_w = lin.weight.detach().clone()
    lora = um.LoRALinear(lin, r=2, alpha=4)
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(5, 8)
    with torch.no_grad():
        # float reference of W + (alpha/r) B A
        want = x @ (ref_w + 2.0 * lora.lora_B @ lora.lora_A).T + lin.bias
        torch.testing.assert_close(lora(x), want)
        lora.merge()
        torch.testing.assert_close(lora(x), want)
    with pytest.raises(ValueError, match="match no nn.Linear"):
        um.apply_lora(tiny_mllm(), ["nonexistent"], r=2, alpha=2)
    with pytest.raises(ValueError, match="matches no parameter"):
        um.set_trainable(tiny_mllm(), ["projecter"])


def test_bf16_autocast_forward_runs() -> None:
    m = tiny_mllm()
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        logits, _ = m(interleaved_ids(), torch.rand(3, 3, 8, 8))
    assert torch.isfinite(logits).all()


def test_attention_runs_in_float32_inside_cpu_autocast(monkeypatch) -> None:
    """CPU autocast hands attention bf16 inputs, and the CPU kernel's bf16 backward is several times slower than
    its float32 one: `attend` runs every attention of the vision tower and the LLM (forward and backward) in
    float32 with autocast off, and the model under autocast stays the float32 model up to bf16 rounding."""
    seen, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    m, ids, images = tiny_mllm(), interleaved_ids(), torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        want, _ = m(ids, images)  # (B, T, V), float32 throughout
    n_calls = len(seen)  # one per attention layer the forward pass runs
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = m(ids, images)
    logits.float().square().mean().backward()
    assert n_calls > 0 and len(seen) == n_calls and set(seen) == {(torch.float32,) * 3 + (False,)}
    assert logits.dtype == torch.bfloat16
    assert (logits.float() - want).abs().max() < 0.05 * want.abs().max()


def test_config_round_trip() -> None:
    cfg = tiny_mllm().cfg
    assert um.MLLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_from_scratch_init_starts_near_uniform_prediction():
    # a from-scratch MLLM must start close to the uniform predictor: cross-entropy ~ log V (N(0,1) embeddings
    # with a tied head would start around sqrt(D) nats higher)
    from unimllm import MLLM, MLLMConfig, VisionConfig, LLMConfig
    torch.manual_seed(0)
    cfg = MLLMConfig(VisionConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
                     LLMConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_layers=2,
                               num_heads=2,
                               num_kv_heads=1), image_token_id=3, soft_image_token_id=4, soft_text_token_id=5,
                     n_soft_tokens=2)
    model = MLLM(cfg)
    ids = torch.randint(6, 500, (4, 32))
    logits, _ = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert abs(loss.item() - math.log(500)) < 0.1


# ------------------------------------------------------------------------------------------------------------
# export to Hugging Face


@pytest.mark.parametrize("tie,bias,llama3",
                         [(False, False, False), (True, False, True), (False, True, False)])
def test_export_loads_in_transformers_with_lora_merged(tmp_path: Path, tie: bool, bias: bool,
                                                       llama3: bool) -> None:
    """transformers' own model class, loaded from the exported directory, gives our logits (LoRA unmerged,
    with random B so it counts); the other weights come back from mllm.safetensors, the tokenizer encodes
    alike."""
    torch.manual_seed(0)
    llm_cfg = um.LLMConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_layers=2,
                           max_seq_len=64, tie_embeddings=tie, attention_bias=bias, rope_theta=500.0,
                           **({"rope_scaling_factor": 8.0, "rope_original_max_len": 32} if llama3 else {}))
    cfg = um.MLLMConfig(um.VisionConfig(image_size=8, patch_size=4, hidden_size=32, num_layers=2,
                                        intermediate_size=64),
                        llm_cfg, image_token_id=IMG, soft_image_token_id=SOFT_IMG,
                        soft_text_token_id=SOFT_TXT, n_soft_tokens=K, proj_dim=16)
    model = um.MLLM(cfg).eval()
    um.apply_lora(model.llm, [r"q_proj|v_proj|down_proj"], r=4, alpha=8.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B") or n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    tok = data.train_tokenizer(["a red cube on the left.", "a blue ball to the right."] * 3, 300)
    ids = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "image": IMG}
    um.export_hf(model, tok.to_str(), tmp_path, ids)
    cls = transformers.Qwen2ForCausalLM if bias else transformers.LlamaForCausalLM
    hf = cls.from_pretrained(tmp_path).eval()
    x = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model.llm(x))
    back = um.load_export(tmp_path)
    assert any(isinstance(m, um.LoRALinear) for m in model.modules())  # the model itself stays unmerged
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}
    assert rest and all(torch.equal(back.state_dict()[k], v) for k, v in rest.items())
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = "a red ball <image> to the left."
    assert fast(text)["input_ids"] == tok.tk.encode(text).ids
    assert fast.eos_token == "</s>" and fast.pad_token_id == tok.pad_id
