"""
unimllm.py — the multimodal LLM (MLLM) shared by both methods this repository implements:

- Sugar (Chow et al., NeurIPS 2024, arXiv 2411.00304): prefix embeddings of interleaved image-text samples,
  read off the MLLM's final hidden states and mapped by a small "retrieval projector" (fed to Sugar Eq. 3).
- VladVA (Ouali et al., CVPR 2025, arXiv 2412.04378): L2-normalised last-token "summary" embeddings after a
  learnable soft prompt (E5-V style), trained with LoRA.

The network is LLaVA-1.5 shaped (Liu et al., arXiv 2310.03744): a ViT vision tower (CLIP or SigLIP, Hugging
Face layout), features from one of its layers (LLaVA: the second-to-last, CLS dropped), a two-layer GELU MLP
adapter, and a Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, optional q/k/v bias as in
Qwen2).
Module names mirror Hugging Face, so loading a checkpoint is a near-identity name map (`load_llm`,
`load_vision`); every key and shape is checked.

LoRA (Hu et al., arXiv 2106.09685): W x + (alpha / r) B A x, A Kaiming-initialised, B zero-initialised, so the
output is unchanged at initialisation (LoRA Eq. 3 with the alpha/r scaling of its Sec. 4.1).

Run the tests:      python -m pytest tests/test_unimllm.py
Run the benchmark:  python bench/bench_generate.py
Use it:
    llm = load_llm("path/to/SmolLM2-135M")        # Hugging Face directory: config.json + *.safetensors
    logits = llm(input_ids)                        # (B, T, V)
    enc = load_vision("path/to/clip-vit-base-patch32")
    feats = enc(pixel_values, layer=-2)            # Hugging Face's hidden_states[-2], CLS included
    export_hf(mllm, tok_json, "out/", ids)         # LoRA merged, for LlamaForCausalLM.from_pretrained
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import re
from dataclasses import KW_ONLY, asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from data import read_json

VISION_ACTS = ("quick_gelu", "gelu_tanh", "gelu")


# ------------------------------------------------------------------------------------------------------------
# Configs


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 8
    num_channels: int = 3
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    intermediate_size: int = 512
    layer_norm_eps: float = 1e-5
    use_cls: bool = True  # CLIP: a learned CLS token is prepended; SigLIP: none
    pre_layernorm: bool = True  # CLIP's `pre_layrnorm` (sic) after the embeddings; SigLIP: none
    post_layernorm: bool = True
    act: str = "quick_gelu"  # CLIP; "gelu_tanh" for SigLIP; "gelu" (exact) for some CLIP variants
    patch_bias: bool = False  # SigLIP's patch convolution has a bias, CLIP's has none

    def __post_init__(self) -> None:
        if self.act not in VISION_ACTS:
            raise ValueError(f"VisionConfig.act must be one of {VISION_ACTS}, got {self.act!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"VisionConfig.image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"VisionConfig.hidden_size={self.hidden_size} is not a multiple of "
                             f"num_heads={self.num_heads}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class LLMConfig:
    vocab_size: int
    hidden_size: int = 192
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None  # None -> hidden_size // num_heads
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_seq_len: int = 512
    attention_bias: bool = False  # q/k/v bias (Qwen2); o_proj never has one
    tie_embeddings: bool = True
    # Llama 3.1+ ("llama3") RoPE frequency scaling; None is plain RoPE
    rope_scaling_factor: float | None = None
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"LLMConfig.hidden_size={self.hidden_size} is not a multiple of "
                                 f"num_heads={self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"LLMConfig.num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"LLMConfig.head_dim={self.head_dim} must be even for RoPE")
        if self.rope_scaling_factor is not None and self.rope_high_freq_factor <= self.rope_low_freq_factor:
            raise ValueError(f"LLMConfig.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
                             f"rope_low_freq_factor={self.rope_low_freq_factor}")


@dataclass
class MLLMConfig:
    vision: VisionConfig
    llm: LLMConfig
    _: KW_ONLY
    feature_layer: int = -2  # LLaVA-1.5: the second-to-last vision layer, CLS dropped
    image_token_id: int
    soft_image_token_id: int
    soft_text_token_id: int
    n_soft_tokens: int
    proj_dim: int = 128  # width of Sugar's retrieval projector (the paper does not give it)
    # pixel normalisation applied to images in [0, 1] before the vision tower (CLIP's processor constants; a
    # Hugging Face pipeline does this in its image processor, we keep it with the model so a checkpoint is
    # self-contained)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self) -> None:
        n = self.vision.num_layers
        if not -(n + 1) <= self.feature_layer <= n:
            raise ValueError(f"MLLMConfig.feature_layer={self.feature_layer} is out of range for "
                             f"{n} vision layers")
        if self.n_soft_tokens < 1:
            raise ValueError(f"MLLMConfig.n_soft_tokens must be >= 1, got {self.n_soft_tokens}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MLLMConfig":
        rest = {k: (tuple(v) if k in ("image_mean", "image_std") else v) for k, v in d.items()
                if k not in ("vision", "llm")}
        return cls(VisionConfig(**d["vision"]), LLMConfig(**d["llm"]), **rest)


# ------------------------------------------------------------------------------------------------------------
# Vision encoder (CLIP / SigLIP vision tower, Hugging Face layout)


def quick_gelu(x: Tensor) -> Tensor:
    # CLIP's GELU approximation x * sigmoid(1.702 x)
    return x * torch.sigmoid(1.702 * x)


def vision_act(x: Tensor, act: str) -> Tensor:
    if act == "quick_gelu":
        return quick_gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.gelu(x)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size,
                                         bias=cfg.patch_bias)
        if cfg.use_cls:
            self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.position_embedding = nn.Embedding(cfg.num_patches + int(cfg.use_cls), cfg.hidden_size)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # (N, D, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, P, D), patches in row-major order
        if self.cfg.use_cls:
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
            x = torch.cat([cls, x], dim=1)  # (N, 1 + P, D)
        return x + self.position_embedding.weight.to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = attend(q, k, v)  # (B, H, T, hd), bidirectional
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = cfg.act
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(vision_act(self.fc1(x), self.act))


class VisionBlock(nn.Module):
    # pre-LN transformer block, as CLIPEncoderLayer / SiglipEncoderLayer
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionLayers(nn.Module):
    # holder so parameter names read `encoder.layers.{i}` as in Hugging Face
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.num_layers))


class VisionEncoder(nn.Module):
    """CLIP / SigLIP vision tower. `forward(pixel_values, layer)` is Hugging Face's `hidden_states[layer]`:
    index 0 is the embeddings (after `pre_layrnorm` for CLIP), index i the output of encoder layer i, -1 the
    last layer *before* `post_layernorm`. `post_layernorm` is held (so checkpoints load strictly) and applied
    only by `pooled()`; SigLIP's attention-pooling head (`head.*`) is not held: we only need hidden states."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        if cfg.pre_layernorm:
            self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionLayers(cfg)
        if cfg.post_layernorm:
            self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def layer_index(self, layer: int) -> int:
        n = self.cfg.num_layers
        if not -(n + 1) <= layer <= n:
            raise ValueError(f"layer={layer} is out of range: hidden_states has {n + 1} entries")
        return layer % (n + 1)

    def forward(self, pixel_values: Tensor, layer: int = -1) -> Tensor:
        cfg = self.cfg
        want = (cfg.num_channels, cfg.image_size, cfg.image_size)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(f"pixel_values must be (N, {', '.join(map(str, want))}), "
                             f"got {tuple(pixel_values.shape)}")
        x = self.embeddings(pixel_values)  # (N, P(+1), D)
        if cfg.pre_layernorm:
            x = self.pre_layrnorm(x)
        for block in self.encoder.layers[: self.layer_index(layer)]:  # later layers are never needed
            x = block(x)
        return x

    def pooled(self, pixel_values: Tensor) -> Tensor:
        """The last layer after `post_layernorm`: CLIP's pooler input at CLS / SigLIP's
        `last_hidden_state`."""
        if not self.cfg.post_layernorm:
            raise ValueError("this VisionConfig has post_layernorm=False")
        return self.post_layernorm(self(pixel_values, layer=-1))


# ------------------------------------------------------------------------------------------------------------
# Llama-family decoder


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # computed in float32 and cast back before the gain, exactly as Hugging Face's LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inv_freq(cfg: LLMConfig, device: torch.device) -> Tensor:
    """RoPE (Su et al., arXiv 2104.09864) frequencies theta^(-2i/d), i < d/2, in float32 as Hugging Face
    computes them; with `rope_scaling_factor`, Llama 3.1's rescaling: wavelengths longer than original_max_len
    / low_freq_factor are slowed by the factor, shorter than original_max_len / high_freq_factor kept, and the
    band between interpolated (transformers' _compute_llama3_parameters)."""
    d = cfg.head_dim
    exponents = torch.arange(0, d, 2, dtype=torch.float, device=device) / d  # (d/2,)
    inv_freq = 1.0 / (cfg.rope_theta ** exponents)  # (d/2,)
    factor = cfg.rope_scaling_factor
    if factor is None:
        return inv_freq
    old_len, low, high = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(positions: Tensor, inv_freq: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Hugging Face's half-split ("rotate_half") layout: angles duplicated as [f, f] over the head dimension.
    positions (B, T), inv_freq (hd/2,) -> cos, sin (B, T, hd)."""
    freqs = positions.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, H, T, hd); cos, sin (B, T, hd)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class KVCache:
    """Pre-allocated keys and values of every layer: (layers, B, H_kv, max_len, hd)."""

    def __init__(self, cfg: LLMConfig, batch_size: int, max_len: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        assert max_len <= cfg.max_seq_len, (max_len, cfg.max_seq_len)  # LLM.generate checks the request
        shape = (cfg.num_layers, batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, start_pos: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k, v (B, H_kv, T, hd) written at [start_pos, start_pos + T); returns everything up to there
        end = start_pos + k.shape[2]
        self.k[layer, :, :, start_pos:end] = k.to(self.k.dtype)
        self.v[layer, :, :, start_pos:end] = v.to(self.v.dtype)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None, start_pos: int,
                mask: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer, start_pos, k, v)  # (B, Hkv, start_pos + T, hd)
        # GQA: query head h reads kv head h // (H / Hkv), Hugging Face's repeat_kv. Explicit repeat rather
        # than SDPA's enable_gqa, whose CPU path is ~100x slower for one decoded query.
        groups = self.num_heads // self.num_kv_heads
        # (B, H, Tk, hd)
        k, v = k.to(q.dtype).repeat_interleave(groups, dim=1), v.to(q.dtype).repeat_interleave(groups, dim=1)
        t_k = k.shape[2]
        if mask is None:  # plain causal attention over positions 0..t_k-1
            y = attend(q, k, v, attn_mask=offset_causal_mask(T, t_k, x.device), is_causal=T == t_k > 1)
        else:  # (B, 1, T, t_k) from generate on right-padded prompts
            y = attend(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def attend(q: Tensor, k: Tensor, v: Tensor, **kw: Any) -> Tensor:
    """F.scaled_dot_product_attention, in float32 inside a CPU autocast region. CPU autocast runs attention in
    bf16, and the CPU flash-attention kernel's bf16 backward pass is about 6x slower than its float32 one
    (the default pre-training's attention: 20 ms a call against 3.4 ms, torch 2.13), which would cost more
    than bf16 saves in the matmuls. Our choice; CUDA keeps bf16 attention."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kw).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, **kw)


def offset_causal_mask(t_q: int, t_k: int, device: torch.device) -> Tensor | None:
    """Query i sits at absolute position t_k - t_q + i and sees keys 0..that position (a chunk decoded after a
    cached prefix). None when SDPA needs no mask: one query sees everything, t_q == t_k is plain is_causal."""
    if t_q == 1 or t_q == t_k:
        return None
    return torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(diagonal=t_k - t_q)


class SwiGLU(nn.Module):
    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: LLMConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv_cache: KVCache | None, start_pos: int,
                mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, start_pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LLM(nn.Module):
    """Llama / Qwen2 / SmolLM decoder. Causal attention, so right padding never changes a real position."""

    def __init__(self, cfg: LLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                kv_cache: KVCache | None = None,
                start_pos: int = 0, return_hidden: bool = False,
                predict: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """logits (B, T, V) for tokens at positions start_pos..start_pos+T-1 (earlier ones held by
        `kv_cache`); with return_hidden also the hidden states after the final RMSNorm (B, T, D).
        predict (N,) long, flat indices into the (B, T) positions: the logits of those positions only, (N, V).
        Training needs them at the labelled positions alone, and the vocabulary projection of every position
        would be about a tenth of a pre-training step's matmuls."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        end = start_pos + T
        if kv_cache is None and start_pos != 0:
            raise ValueError("start_pos > 0 needs a kv_cache holding the earlier positions")
        limit = kv_cache.max_len if kv_cache is not None else self.cfg.max_seq_len
        if end > limit:
            raise ValueError(f"positions up to {end} exceed the "
                             f"{'KV cache length' if kv_cache is not None else 'max_seq_len'} {limit}")
        positions = torch.arange(start_pos, end, device=x.device).expand(B, T)  # (B, T)
        hidden = self.run(x, positions, kv_cache, start_pos, None)  # (B, T, D)
        logits = self.head(hidden if predict is None else hidden.flatten(0, 1)[predict])  # (B, T, V) | (N, V)
        return (logits, hidden) if return_hidden else logits

    def run(self, x: Tensor, positions: Tensor, kv_cache: KVCache | None, start_pos: int,
            mask: Tensor | None) -> Tensor:
        """The decoder on embeddings x (B, T, D) at RoPE positions (B, T), written to cache slots
        start_pos.. ; mask (B, 1, T, start_pos + T) or None for plain causal attention. Returns the hidden
        states after the final RMSNorm (B, T, D)."""
        cos, sin = rope_cos_sin(positions, rope_inv_freq(self.cfg, x.device), x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, kv_cache, start_pos, mask)
        return self.norm(x)  # (B, T, D)

    def head(self, hidden: Tensor) -> Tensor:
        """Hidden states (..., D) -> next-token logits (..., V)."""
        if self.cfg.tie_embeddings:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)

    @torch.no_grad()
    def generate(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                 max_new_tokens: int = 32,
                 temperature: float = 0.0, eos_id: int | None = None, lengths: Tensor | None = None,
                 use_cache: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Greedy (temperature 0) or sampled decoding -> (B, new). `lengths` (B,) gives each row's prompt
        length for right-padded prompts (default: all T). After a row emits `eos_id` it is padded with
        `eos_id`; decoding stops once every row has, so `new` may be < max_new_tokens. `use_cache=False`
        recomputes the whole sequence every step (the benchmark's reference)."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, D)
        B, T, _ = x.shape
        slots = DecodeSlots(lengths, B, T, max_new_tokens, x.device)
        if slots.total > self.cfg.max_seq_len:
            raise ValueError(f"prompt {T} + max_new_tokens {max_new_tokens} exceeds max_seq_len "
                             f"{self.cfg.max_seq_len}")
        cache = KVCache(self.cfg, B, slots.total, x.device, x.dtype) if use_cache else None
        hidden = self.run(x, slots.positions(0, T), cache, 0, slots.mask(0, T))  # (B, T, D)
        logits = self.head(hidden[torch.arange(B, device=x.device), slots.lengths - 1])  # (B, V), last prompt token
        done = torch.zeros(B, dtype=torch.bool, device=x.device)
        out: list[Tensor] = []
        for step in range(max_new_tokens):
            nxt = next_token(logits, temperature, generator)  # (B,)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            out.append(nxt)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            e = self.embed_tokens(nxt[:, None]).to(x.dtype)  # (B, 1, D)
            s = T + step  # the cache slot of this token
            if cache is not None:
                logits = self.head(self.run(e, slots.positions(s, s + 1), cache, s, slots.mask(s, s + 1))[:, -1])
            else:
                x = torch.cat([x, e], dim=1)
                logits = self.head(self.run(x, slots.positions(0, s + 1), None, 0, slots.mask(0, s + 1))[:, -1])
        return torch.stack(out, dim=1)


class DecodeSlots:
    """Where tokens sit during generation from right-padded prompts. Slot j < T holds prompt position j (pads
    for j >= lengths[b], masked out); generated token s sits in slot T + s at RoPE position lengths[b] + s, so
    every row sees exactly its own prompt followed by its own tokens, as if it had been decoded alone."""

    def __init__(self, lengths: Tensor | None, batch: int, prompt_len: int, max_new: int,
                 device: torch.device) -> None:
        if lengths is None:
            lengths = torch.full((batch,), prompt_len, device=device)
        lengths = lengths.to(device=device, dtype=torch.long)
        if lengths.shape != (batch,) or bool(((lengths < 1) | (lengths > prompt_len)).any()):
            raise ValueError(f"lengths must be (B,)=({batch},) with values in [1, {prompt_len}], got "
                             f"{lengths.tolist()}")
        self.lengths, self.prompt_len, self.total = lengths, prompt_len, prompt_len + max_new
        self.padded = bool((lengths < prompt_len).any())
        j = torch.arange(self.total, device=device)
        self.pos = torch.where(j < prompt_len, j, lengths[:, None] + j - prompt_len)  # (B, total)
        valid = (j < lengths[:, None]) | (j >= prompt_len)  # (B, total)
        # built once, so a decode step slices a view instead of allocating its mask
        causal = j[None, :] <= j[:, None]  # (total, total)
        self.full_mask = (causal[None] & valid[:, None, :])[:, None] if self.padded else None  # (B,1,Tt,Tt)

    def positions(self, start: int, end: int) -> Tensor:
        return self.pos[:, start:end]  # (B, end - start)

    def mask(self, start: int, end: int) -> Tensor | None:
        """Queries in slots start..end-1 over keys in slots 0..end-1; None (plain causal) when nothing is
        padded."""
        return None if self.full_mask is None else self.full_mask[:, :, start:end, :end]  # (B, 1, Tq, Tk)


def next_token(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ------------------------------------------------------------------------------------------------------------
# The MLLM


class Adapter(nn.Module):
    """LLaVA-1.5's projector: Linear -> GELU -> Linear, vision width -> LLM width (HF
    `multi_modal_projector`)."""

    def __init__(self, d_vision: int, d_llm: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(d_vision, d_llm)
        self.linear_2 = nn.Linear(d_llm, d_llm)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class MLLM(nn.Module):
    def __init__(self, cfg: MLLMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, k = cfg.llm.hidden_size, cfg.n_soft_tokens
        self.vision = VisionEncoder(cfg.vision)
        self.adapter = Adapter(cfg.vision.hidden_size, d)
        # where each image token sits, as content: learned row and column embeddings added to the adapter's
        # output (the token of patch (r, c) gets image_row[r] + image_col[c]). RoPE puts position into the
        # attention scores only, never into what a head reads, so without them a token's place on the grid
        # reaches the LLM only as far as the tower's features keep it, and "is the red square left or right
        # of the blue circle?" has nothing to read (README, "A model that sees", item 10). Our choice, not
        # LLaVA's.
        side = cfg.vision.image_size // cfg.vision.patch_size
        self.image_row = nn.Parameter(torch.randn(side, d) * 0.1)
        self.image_col = nn.Parameter(torch.randn(side, d) * 0.1)
        self.llm = LLM(cfg.llm)
        # VladVA soft prompts; random until init_soft_prompts copies a handcrafted prompt's embeddings into
        # them
        self.image_prompt = nn.Parameter(torch.randn(k, d) * 0.02)
        self.text_prompt = nn.Parameter(torch.randn(k, d) * 0.02)
        # Sugar's retrieval projector (an MLP; its size is our choice, the paper does not give it)
        self.projector = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.proj_dim))
        # learnable temperature for the VladVA contrastive loss, CLIP's init (VladVA gives none)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.apply(init_weights)
        init_query_key(self.llm)

    @property
    def n_image_tokens(self) -> int:
        return self.cfg.vision.num_patches

    def vision_features(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) in [0, 1] -> LLaVA's patch features (N, P, Dv) from `feature_layer`, CLS
        dropped."""
        mean = torch.tensor(self.cfg.image_mean, dtype=images.dtype, device=images.device)[:, None, None]
        std = torch.tensor(self.cfg.image_std, dtype=images.dtype, device=images.device)[:, None, None]
        feats = self.vision((images - mean) / std, layer=self.cfg.feature_layer)  # (N, P(+1), Dv)
        return feats[:, 1:] if self.cfg.vision.use_cls else feats

    def image_tokens(self, images: Tensor) -> Tensor:
        """images (N, 3, H, W) -> adapter tokens plus their row and column embeddings (N, P, D)."""
        where = (self.image_row[:, None] + self.image_col[None, :]).flatten(0, 1)  # (P, D), row-major
        return self.adapter(self.vision_features(images)) + where

    def embed(self, input_ids: Tensor, images: Tensor | None = None) -> Tensor:
        x = self.llm.embed_tokens(input_ids)  # (B, T, D)
        x = self.fill_images(x, input_ids, images)
        x = fill_runs(x, input_ids == self.cfg.soft_image_token_id, self.image_prompt, "<soft_image>")
        return fill_runs(x, input_ids == self.cfg.soft_text_token_id, self.text_prompt, "<soft_text>")

    def fill_images(self, x: Tensor, input_ids: Tensor, images: Tensor | None) -> Tensor:
        mask = input_ids == self.cfg.image_token_id  # (B, T)
        n_img, p = (0 if images is None else images.shape[0]), self.n_image_tokens
        n_slots = count_runs(mask, p, "<image>")
        if n_slots != n_img:
            raise ValueError(f"{n_img} images but {n_slots} <image> placeholders (of {p} <image> ids each)")
        if n_img == 0:
            return x
        tokens = self.image_tokens(images).to(x.dtype)  # (N, P, D), row-major order = order of appearance
        return x.masked_scatter(mask[..., None], tokens)

    def forward(self, input_ids: Tensor, images: Tensor | None = None,
                predict: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> logits (B, T, V), or (N, V) at the flat positions `predict` (N,) (LLM.forward), and the hidden
        states after the final RMSNorm (B, T, D)."""
        return self.llm(inputs_embeds=self.embed(input_ids, images), return_hidden=True, predict=predict)

    @torch.no_grad()
    def init_soft_prompts(self, image_prompt_ids: list[int], text_prompt_ids: list[int]) -> None:
        k = self.cfg.n_soft_tokens
        for name, ids, prompt in (("image", image_prompt_ids, self.image_prompt),
                                  ("text", text_prompt_ids, self.text_prompt)):
            if len(ids) != k:
                raise ValueError(f"{name}_prompt_ids has {len(ids)} ids, expected n_soft_tokens={k}")
            idx = torch.tensor(ids, dtype=torch.long, device=prompt.device)
            prompt.copy_(self.llm.embed_tokens.weight[idx])

    @torch.no_grad()
    def generate(self, input_ids: Tensor, images: Tensor | None = None, max_new_tokens: int = 32,
                 temperature: float = 0.0, eos_id: int | None = None, lengths: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """(B, new) tokens after each prompt; `lengths` (B,) for right-padded prompts (see LLM.generate)."""
        return self.llm.generate(inputs_embeds=self.embed(input_ids, images), max_new_tokens=max_new_tokens,
                                 temperature=temperature, eos_id=eos_id, lengths=lengths, generator=generator)

    def summary_embedding(self, hidden: Tensor, pos: Tensor) -> Tensor:
        """VladVA: the final hidden state at `pos` (the last soft-prompt token), L2-normalised. (B,T,D) ->
        (B,D)."""
        return F.normalize(hidden[torch.arange(hidden.shape[0], device=hidden.device), pos].float(), dim=-1)

    def prefix_embeddings(self, hidden: Tensor, seg_batch: Tensor, seg_start: Tensor, seg_end: Tensor,
                          seg_is_image: Tensor, prefix_seg: Tensor, pool: str = "mean") -> Tensor:
        """Sugar: for each prefix, the vector of its last segment (mean over an image's tokens, the last token
        of a text segment; causal attention makes it a summary of the whole prefix), through the retrieval
        projector, L2-normalised. hidden (B, T, D) -> (P, proj_dim). pool="last" (Sugar Table 4b "w/o
        AvgPool"): an image's last token instead of the mean over its tokens; text segments are unchanged."""
        if pool not in ("mean", "last"):
            raise ValueError(f"prefix_embeddings: pool must be 'mean' or 'last', got {pool!r}")
        B, T, D = hidden.shape
        b, s, e = seg_batch[prefix_seg], seg_start[prefix_seg], seg_end[prefix_seg]
        img = seg_is_image[prefix_seg].bool()
        assert not bool(((e <= s) | (s < 0) | (e > T)).any()), "segments need 0 <= start < end <= T"
        t = torch.arange(T, device=hidden.device)
        in_seg = (t >= s[:, None]) & (t < e[:, None])  # (P, T)
        last = t == (e - 1)[:, None]  # (P, T)
        img_w = in_seg.float() / (e - s)[:, None].float() if pool == "mean" else last.float()  # (P, T)
        w = torch.where(img[:, None], img_w, last.float())  # (P, T)
        w_full = hidden.new_zeros(len(prefix_seg), B, T)
        w_full[torch.arange(len(prefix_seg), device=hidden.device), b] = w.to(hidden.dtype)
        vec = w_full.view(-1, B * T) @ hidden.reshape(B * T, D)  # (P, D) segment vectors
        return F.normalize(self.projector(vec).float(), dim=-1)

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path | dict[str, Any], where: str | None = None) -> "MLLM":
        """The model of a unimllm checkpoint (save_checkpoint), given its path or its load_checkpoint dict,
        with its LoRA wrappers when it has them; strict loading: weights that do not fit the configuration
        stored with them end the program with a message naming `where` (the file)."""
        if not isinstance(ckpt, dict):
            where, ckpt = str(ckpt), load_checkpoint(ckpt)
        model = cls(MLLMConfig.from_dict(ckpt["model_config"]))
        if ckpt["lora"] is not None:
            apply_lora(model, [ckpt["lora"]["targets"]], ckpt["lora"]["r"], ckpt["lora"]["alpha"])
        try:
            model.load_state_dict(ckpt["model"], strict=True)
        except RuntimeError as e:
            raise SystemExit(f"{where}: weights do not fit the configuration stored with them: {e}") from e
        return model


def count_runs(mask: Tensor, k: int, name: str) -> int:
    """Number of k-long groups of consecutive masked positions, (B, T) row-major; raises unless the masked
    positions split exactly into such groups (every image / soft prompt whole and within one row)."""
    per_row = mask.sum(1)  # (B,)
    if bool((per_row % k).any()):
        raise ValueError(f"{name} ids must come in runs of {k} consecutive positions; the rows hold "
                         f"{per_row.tolist()}")
    flat = mask.flatten().nonzero()[:, 0]  # (n,) row-major positions
    i = torch.arange(flat.numel(), device=mask.device)
    group_start = flat[i - i % k]  # position of the first id of each id's group
    if bool((flat - group_start != i % k).any()):
        raise ValueError(f"{name} ids must come in runs of {k} consecutive positions; a group is split")
    return flat.numel() // k


def init_weights(module: nn.Module) -> None:
    """From-scratch init, as Hugging Face's Llama / CLIP (initializer_range 0.02): N(0, 0.02) for linear and
    embedding weights, zero biases. PyTorch's N(0, 1) embeddings would make a tied head's initial logits
    ~sqrt(D) wide (an initial loss far above log V). The decoder's query and key projections are then redrawn
    by `init_query_key`. Loading a checkpoint overwrites all of it."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def init_query_key(llm: "LLM") -> None:
    """The decoder's query and key projections at N(0, 1/d_in) instead of N(0, 0.02) (our choice; Hugging
    Face's 0.02 suits widths around 768-4096). With RMS-normalised inputs, q and k then have unit-variance
    entries and the attention logits q.k / sqrt(head_dim) unit variance at init; at width 192, 0.02 makes
    them about 0.08 wide, so every head starts near uniform attention, and since the gradient of W_q is
    proportional to W_k and vice versa, matching a query to a key (reading the colour of the object a question
    names) sits on a long, seed-dependent plateau (README, "A model that sees", item 7)."""
    for layer in llm.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            nn.init.normal_(proj.weight, std=proj.in_features ** -0.5)


def fill_runs(x: Tensor, mask: Tensor, prompt: Tensor, name: str) -> Tensor:
    """Positions in `mask` (B, T) get prompt rows 0..K-1, each run of K in row-major order."""
    n = count_runs(mask, prompt.shape[0], name)
    if n == 0:
        return x
    return x.masked_scatter(mask[..., None], prompt.to(x.dtype).repeat(n, 1))


# ------------------------------------------------------------------------------------------------------------
# LoRA (Hu et al., arXiv 2106.09685)


class LoRALinear(nn.Linear):
    """y = W x + b + (alpha / r) B A x. Shares the wrapped layer's weight and bias, so names (`q_proj.weight`)
    and memory stay those of the base model; A is Kaiming-uniform, B zero, so the output is unchanged at
    init."""

    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        if r < 1:
            raise ValueError(f"LoRA rank r must be >= 1, got {r}")
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight = base.weight
        self.bias = base.bias
        self.r, self.scale, self.merged = r, alpha / r, False
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init, and litgpt's

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        return y + F.linear(F.linear(x, self.lora_A) * self.scale, self.lora_B)  # scaled at width r, not D

    @torch.no_grad()
    def merge(self) -> None:
        """Fold (alpha / r) B A into W once; later calls are no-ops."""
        if not self.merged:
            self.weight.add_((self.lora_B.float() @ self.lora_A.float() * self.scale).to(self.weight.dtype))
            self.merged = True

    def to_linear(self) -> nn.Linear:
        self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight, lin.bias = self.weight, self.bias
        return lin


def apply_lora(model: nn.Module, patterns: list[str], r: int, alpha: float) -> list[str]:
    """Wrap every nn.Linear whose module name matches one of the regexes (re.search) in a LoRALinear. Returns
    the wrapped names; raises if nothing matches (a typo would otherwise silently train nothing)."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and any(re.search(p, n) for p in patterns)]
    if not names:
        raise ValueError(f"LoRA patterns {patterns} match no nn.Linear module")
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha))
    return names


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear into its weight and put a plain nn.Linear back (Hugging Face names again)."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent)
        setattr(owner, child, getattr(owner, child).to_linear())


def set_trainable(model: nn.Module, patterns: list[str], lora: bool = True) -> list[str]:
    """Freeze everything except LoRA A/B (unless lora=False: VladVA's soft-prompt-only adaptation) and
    parameters whose name matches a regex (re.search). Returns the names of the trainable parameters; raises
    for a pattern that matches no parameter."""
    names = [n for n, _ in model.named_parameters()]
    for p in patterns:
        if not any(re.search(p, n) for n in names):
            raise ValueError(f"set_trainable pattern {p!r} matches no parameter")
    trainable = []
    for n, param in model.named_parameters():
        is_lora = lora and n.endswith(("lora_A", "lora_B"))
        param.requires_grad_(is_lora or any(re.search(p, n) for p in patterns))
        if param.requires_grad:
            trainable.append(n)
    return trainable


# ------------------------------------------------------------------------------------------------------------
# unimllm checkpoints (train.py writes them, eval.py and --init / --resume read them)

CKPT_FORMAT = "unimllm-checkpoint-v1"
# The fields train.make_checkpoint writes and loading reads: a dict with the right format but not all is
# refused
CKPT_FIELDS = ("stage", "step", "done", "method", "train_config", "model_config", "tokenizer", "model",
               "lora", "optimizer", "rng", "history")


def output_problem(path: Path) -> str | None:
    """Why a file cannot be written at `path` (parent directories are created as needed), or None; nothing is
    created. Run before any work, so a bad path fails in a second, not at the first checkpoint."""
    if path.is_dir():
        return "is a directory (give a file name)"
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot be created: no permission to write in {parent}"
    return None


def save_checkpoint(path: Path, obj: dict[str, Any]) -> None:
    """Atomic: a crash mid-write never leaves a truncated file where a good checkpoint was. A failed or
    interrupted write removes its temporary file; one left by a killed writer (its process is gone) is removed
    by the next good save of the same path."""
    weights = obj.get("model", {})
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # the last line of train.py's NaN guard (see StepLog): non-finite weights are never written
        raise SystemExit(f"{obj['stage']} step {obj['step']}: {len(bad)} weight tensors are not finite "
                         f"({', '.join(bad[:3])}...); stopping without writing {path} (the last good one, if "
                         f"any, stays there)")
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # a full disk, a path turned unwritable since the start
            raise SystemExit(f"cannot write the checkpoint {path}: {e}") from e
        raise
    for orphan in path.parent.glob(glob.escape(path.name) + ".tmp*"):
        pid = orphan.name[len(path.name) + len(".tmp"):]
        if pid.isdigit() and not process_alive(int(pid)):
            orphan.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    return True


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint written by save_checkpoint (weights_only: no code runs); a clear SystemExit for a missing,
    truncated or foreign file."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{p}: no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError / zipfile errors here
        raise SystemExit(f"{p}: not a readable unimllm checkpoint (truncated or foreign file?): {e}") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise SystemExit(f"{p}: not a unimllm checkpoint (expected a dict with format={CKPT_FORMAT!r})")
    missing = [k for k in CKPT_FIELDS if k not in ckpt]
    if missing:
        raise SystemExit(f"{p}: an incomplete unimllm checkpoint: no {', '.join(missing)} (edited, or "
                         f"written by another version?)")
    return ckpt


# ------------------------------------------------------------------------------------------------------------
# Loading Hugging Face checkpoints

LLM_TYPES = ("llama", "qwen2")
VISION_TYPES = {"clip": "clip", "clip_vision_model": "clip", "siglip": "siglip",
                "siglip_vision_model": "siglip"}
# our name -> Hugging Face name; "{}" is the layer index (gpt-fast style)
LLM_NAME_MAP = {
    "embed_tokens.weight": "model.embed_tokens.weight",
    "layers.{}.self_attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.self_attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.self_attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.self_attn.q_proj.bias": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.self_attn.k_proj.bias": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.self_attn.v_proj.bias": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.self_attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.input_layernorm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.post_attention_layernorm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def need(cfg: dict[str, Any], key: str, where: Path) -> Any:
    if key not in cfg:
        raise ValueError(f"{where}: field {key!r} is missing")
    return cfg[key]


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """`model.safetensors`, or the shards listed by `model.safetensors.index.json`."""
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        return load_file(single)
    if not index.is_file():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json exists")
    weight_map: dict[str, str] = need(read_json(index), "weight_map", index)
    tensors: dict[str, Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (path / shard).is_file():
            raise FileNotFoundError(f"missing shard {path / shard} (listed in {index})")
        tensors.update(load_file(path / shard))
    absent = sorted(set(weight_map) - set(tensors))
    if absent:
        raise ValueError(f"{index} lists {absent[0]!r} but no shard holds it")
    return tensors


def hf_name(ours: str) -> str:
    generic = re.sub(r"\.\d+\.", ".{}.", ours, count=1)
    if generic not in LLM_NAME_MAP:
        raise ValueError(f"no Hugging Face name for parameter {ours!r}")
    layer = re.search(r"\.(\d+)\.", ours)
    return LLM_NAME_MAP[generic].format(layer.group(1)) if layer else LLM_NAME_MAP[generic]


def rope_fields(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """LLMConfig's RoPE fields. `rope_theta` sits at the top level (transformers < 5) or inside
    `rope_parameters` (transformers 5); scaling in `rope_parameters` or the older `rope_scaling`. Plain and
    "llama3" RoPE only."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if "rope_theta" in cfg:
        theta = float(cfg["rope_theta"])
    elif "rope_theta" in params:
        theta = float(params["rope_theta"])
    else:
        raise ValueError(f"{where}: no rope_theta at the top level or in rope_parameters")
    if rope_type == "default":
        return {"rope_theta": theta}
    if rope_type != "llama3":
        raise ValueError(f"{where}: rope_type {rope_type!r} is not supported (supported: "
                         "'default', 'llama3')")
    return {"rope_theta": theta, "rope_scaling_factor": float(need(params, "factor", where)),
            "rope_low_freq_factor": float(need(params, "low_freq_factor", where)),
            "rope_high_freq_factor": float(need(params, "high_freq_factor", where)),
            "rope_original_max_len": int(need(params, "original_max_position_embeddings", where))}


def llm_config_from_hf(cfg: dict[str, Any], where: Path) -> LLMConfig:
    model_type = need(cfg, "model_type", where)
    if model_type not in LLM_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(LLM_TYPES)})")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (only 'silu')")
    if cfg.get("mlp_bias", False):
        raise ValueError(f"{where}: mlp_bias=true is not supported")
    if model_type == "llama" and cfg.get("attention_bias", False):
        raise ValueError(f"{where}: Llama attention_bias=true (an o_proj bias) is not supported")
    if cfg.get("use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window=true is not supported")
    heads = need(cfg, "num_attention_heads", where)
    return LLMConfig(
        vocab_size=need(cfg, "vocab_size", where),
        hidden_size=need(cfg, "hidden_size", where),
        intermediate_size=need(cfg, "intermediate_size", where),
        num_layers=need(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,  # absent means multi-head attention (HF)
        head_dim=cfg.get("head_dim"),
        rms_norm_eps=need(cfg, "rms_norm_eps", where),
        max_seq_len=need(cfg, "max_position_embeddings", where),
        attention_bias=model_type == "qwen2",  # Qwen2 always has q/k/v biases
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # HF's default for Llama and Qwen2
        **rope_fields(cfg, where),
    )


def check_and_load(model: nn.Module, tensors: dict[str, Tensor], where: Path, dtype: torch.dtype) -> None:
    """`tensors` is keyed by our names; every key present, none extra, every shape equal, then strict=True."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing:
        raise ValueError(f"{where}: checkpoint is missing tensor {missing[0]!r} "
                         f"({len(missing)} missing in all)")
    if extra:
        raise ValueError(f"{where}: checkpoint has unexpected tensor {extra[0]!r} "
                         f"({len(extra)} extra in all)")
    for k, shape in expected.items():
        if tensors[k].shape != shape:
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                             f"expected {tuple(shape)}")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)


HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")  # owner/name
HUB_FILES = ["*.json", "*.safetensors"]  # configs, tokenizer, weights (and shard index): all the loaders read


def resolve_model_path(name: str | Path) -> Path:
    """A local path as it is; otherwise a Hugging Face Hub id (`owner/name`) fetched into, or found in, the
    Hugging Face cache by `huggingface_hub.snapshot_download` (an optional dependency). With HF_HUB_OFFLINE=1
    only the cache is read. ValueError, saying which, when it is neither."""
    if Path(name).exists():
        return Path(name)
    if not HUB_ID.match(str(name)):
        raise ValueError(f"{name}: no such file or directory (nor a Hugging Face id of the form owner/name)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise ValueError(f"{name}: no such local directory; to fetch it as a Hugging Face id, install "
                         f"huggingface_hub (pip install huggingface_hub)") from e
    try:
        return Path(snapshot_download(str(name), allow_patterns=HUB_FILES))
    except Exception as e:
        # huggingface_hub's errors (offline, unknown or gated id, network) share no base class
        raise ValueError(f"{name}: not a local directory, and the Hugging Face Hub could not provide it "
                         "(offline, or HF_HUB_OFFLINE=1 and not in the cache, or no such model?): "
                         f"{type(e).__name__}: {e}") from e


def load_llm(path: str | Path, dtype: torch.dtype = torch.float32) -> LLM:
    """A Llama / Qwen2 / SmolLM Hugging Face directory -> LLM (with `.cfg`)."""
    path = Path(path)
    cfg = llm_config_from_hf(read_json(path / "config.json"), path / "config.json")
    hf = read_safetensors(path)
    with torch.device("meta"):
        model = LLM(cfg)
    ours: dict[str, Tensor] = {}
    for name in model.state_dict():
        key = hf_name(name)
        if key not in hf:
            raise ValueError(f"{path}: checkpoint is missing tensor {key!r}")
        ours[name] = hf.pop(key)
    if (cfg.tie_embeddings and "lm_head.weight" in hf
            and torch.equal(hf["lm_head.weight"], ours["embed_tokens.weight"])):
        hf.pop("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    if hf:
        raise ValueError(f"{path}: checkpoint has unexpected tensor {sorted(hf)[0]!r} "
                         f"({len(hf)} extra in all)")
    check_and_load(model, ours, path, dtype)
    return model.eval()


def vision_config_from_hf(cfg: dict[str, Any], where: Path) -> VisionConfig:
    model_type = need(cfg, "model_type", where)
    if model_type not in VISION_TYPES:
        raise ValueError(f"{where}: model_type {model_type!r} is not supported (supported: "
                         f"{', '.join(VISION_TYPES)})")
    vcfg = cfg["vision_config"] if "vision_config" in cfg else cfg
    family = VISION_TYPES[model_type]
    acts = {"quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
    act = vcfg.get("hidden_act", "quick_gelu" if family == "clip" else "gelu_pytorch_tanh")
    if act not in acts:
        raise ValueError(f"{where}: vision hidden_act {act!r} is not supported (supported: "
                         f"{', '.join(acts)})")
    clip = family == "clip"
    return VisionConfig(
        image_size=need(vcfg, "image_size", where),
        patch_size=need(vcfg, "patch_size", where),
        num_channels=vcfg.get("num_channels", 3),
        hidden_size=need(vcfg, "hidden_size", where),
        num_layers=need(vcfg, "num_hidden_layers", where),
        num_heads=need(vcfg, "num_attention_heads", where),
        intermediate_size=need(vcfg, "intermediate_size", where),
        layer_norm_eps=vcfg.get("layer_norm_eps", 1e-5 if clip else 1e-6),
        use_cls=clip, pre_layernorm=clip, post_layernorm=True, act=acts[act], patch_bias=not clip,
    )


def load_vision(path: str | Path, dtype: torch.dtype = torch.float32) -> VisionEncoder:
    """A CLIP / SigLIP Hugging Face directory (vision tower alone, or a full CLIPModel / SiglipModel whose
    text tower and projections are ignored) -> VisionEncoder (with `.cfg`). SigLIP's pooling head (`head.*`)
    is dropped: the MLLM only reads hidden states."""
    path = Path(path)
    cfg = vision_config_from_hf(read_json(path / "config.json"), path / "config.json")
    hf = read_safetensors(path)
    if any(k.startswith("vision_model.") for k in hf):
        hf = {k.removeprefix("vision_model."): v for k, v in hf.items() if k.startswith("vision_model.")}
    hf = {k: v for k, v in hf.items() if not k.startswith("head.")}
    with torch.device("meta"):
        model = VisionEncoder(cfg)
    check_and_load(model, hf, path, dtype)
    return model.eval()


# ------------------------------------------------------------------------------------------------------------
# Exporting to Hugging Face

EXPORT_REST = "mllm.safetensors"  # the vision tower, adapter, soft prompts, projector and temperature
EXPORT_MANIFEST = "mllm.json"


def llm_config_to_hf(cfg: LLMConfig, token_ids: dict[str, int]) -> dict[str, Any]:
    """The inverse of llm_config_from_hf: a transformers 5 `config.json` (RoPE in `rope_parameters`). q/k/v
    biases make it a Qwen2 model, since Llama's attention_bias would also add an o_proj bias we do not
    have."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor is not None:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor,
                    low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                    original_max_position_embeddings=cfg.rope_original_max_len)
    qwen2 = cfg.attention_bias
    out = {"architectures": ["Qwen2ForCausalLM" if qwen2 else "LlamaForCausalLM"],
           "model_type": "qwen2" if qwen2 else "llama", "vocab_size": cfg.vocab_size,
           "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
           "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
           "head_dim": cfg.head_dim,
           "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
           "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "dtype": "float32",
           **{f"{k}_token_id": v for k, v in token_ids.items() if k in ("bos", "eos", "pad")}}
    if qwen2:
        out["use_sliding_window"] = False
    else:
        out.update(attention_bias=False, mlp_bias=False)
    return out


def export_hf(model: MLLM, tokenizer_json: str, out: str | Path, token_ids: dict[str, int]) -> None:
    """Write `out/`: the LLM with LoRA merged as a Hugging Face directory (`config.json`, `model.safetensors`,
    `tokenizer.json`, `tokenizer_config.json`; `LlamaForCausalLM.from_pretrained(out)` loads it, and so does
    load_llm), plus every other weight in `mllm.safetensors` under our names, described by `mllm.json` (the
    MLLMConfig and the special token ids). `token_ids` names the tokenizer's bos / eos / pad / image /
    soft-prompt ids. `model` itself is left unmerged."""
    from safetensors.torch import save_file
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).float()
    merge_lora(model)
    llm = {hf_name(k): v.contiguous() for k, v in model.llm.state_dict().items()}
    save_file(llm, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(llm_config_to_hf(model.cfg.llm, token_ids), indent=2))
    (out / "tokenizer.json").write_text(tokenizer_json)
    names = {v: k for k, v in json.loads(tokenizer_json).get("model", {}).get("vocab", {}).items()}
    names.update({t["id"]: t["content"] for t in json.loads(tokenizer_json).get("added_tokens", [])})
    special = {f"{k}_token": names[v] for k, v in token_ids.items() if k in ("bos", "eos", "pad")
               and v in names}
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "model_max_length": model.cfg.llm.max_seq_len,
                                                           **special},
                                                          indent=2))
    rest = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("llm.")}
    save_file(rest, out / EXPORT_REST, metadata={"format": "pt"})
    manifest = {"llm": ".", "weights": EXPORT_REST, "model_config": model.cfg.to_dict(),
                "token_ids": token_ids, "tensors": {k: list(v.shape) for k, v in rest.items()}}
    (out / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2))


def load_export(path: str | Path, dtype: torch.dtype = torch.float32) -> MLLM:
    """A directory written by export_hf -> MLLM (LoRA merged); every key and shape is checked."""
    path = Path(path)
    manifest = read_json(path / EXPORT_MANIFEST)
    cfg = MLLMConfig.from_dict(need(manifest, "model_config", path / EXPORT_MANIFEST))
    tensors = {f"llm.{k}": v for k, v in load_llm(path, dtype).state_dict().items()}
    tensors.update(load_file(path / EXPORT_REST))
    with torch.device("meta"):
        model = MLLM(cfg)
    check_and_load(model, tensors, path, dtype)
    return model.eval()
