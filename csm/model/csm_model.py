"""Sesame's Conversational Speech Model (CSM) in plain PyTorch.

A Llama-3.2 style *backbone* runs over frames (32 audio codebooks + 1 text token each) and a
small *decoder* runs over the 32 codebooks of one frame. Parameter names and shapes match the
official checkpoint (`sesame/csm-1b`) exactly, so its `model.safetensors` loads with strict=True;
RoPE caches, KV caches and masks are non-persistent buffers and never reach a state dict.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Flavor:
    """Shape of one Llama-3.2 style transformer (no token embeddings, no output layer)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    embed_dim: int
    intermediate_dim: int
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_base: float = 500_000.0
    rope_scale_factor: float = 32.0

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


MIMI_CARDINALITY = 2048  # codes per Mimi codebook; the model's audio vocab (2051) has 3 more ids

FLAVORS: dict[str, Flavor] = {
    # The two of the released CSM-1B.
    "llama-1B": Flavor(num_layers=16, num_heads=32, num_kv_heads=8, embed_dim=2048, intermediate_dim=8192),
    "llama-100M": Flavor(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=1024, intermediate_dim=8192),
    # Mid-size, for CPU benchmarks and quick experiments.
    "llama-mid": Flavor(num_layers=4, num_heads=8, num_kv_heads=2, embed_dim=512, intermediate_dim=1536),
    "llama-mid-decoder": Flavor(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=256, intermediate_dim=768),
    # Tiny, for tests and the offline demo.
    "llama-tiny": Flavor(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, intermediate_dim=128),
    "llama-tiny-decoder": Flavor(num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, intermediate_dim=64),
}


CUSTOM_FLAVOR = "custom"  # the flavor name of dimensions that match no named flavor


def flavor_name(dims: Flavor) -> str:
    """The name of the flavor with exactly these dimensions, or 'custom'."""
    return next((name for name, f in FLAVORS.items() if f == dims), CUSTOM_FLAVOR)


@dataclass
class ModelArgs:
    """The fields of the official `config.json` (same names, so the files are interchangeable), plus the
    dimensions themselves, so a model of any size can be described (flavor names cannot say them).

    `backbone`/`decoder` default to the named flavors' dimensions; given explicitly (as a Flavor or a
    dict of its fields) they win, and the name is only a label ('custom' when no named flavor matches).
    """

    backbone_flavor: str = "llama-1B"
    decoder_flavor: str = "llama-100M"
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = 32
    backbone: Flavor | None = None
    decoder: Flavor | None = None

    def __post_init__(self):
        for part in ("backbone", "decoder"):
            dims, name = getattr(self, part), getattr(self, f"{part}_flavor")
            if dims is None:
                if name not in FLAVORS:
                    raise ValueError(f"unknown {part} flavor {name!r} and no dimensions given; "
                                     f"named flavors: {', '.join(FLAVORS)}")
                dims = FLAVORS[name]
            elif isinstance(dims, dict):
                dims = Flavor(**dims)
            if dims.embed_dim % dims.num_heads or dims.num_heads % dims.num_kv_heads or dims.head_dim % 2:
                raise ValueError(f"{part}: dim {dims.embed_dim}, {dims.num_heads} heads and {dims.num_kv_heads} "
                                 "kv heads do not divide into whole, even-sized heads")
            setattr(self, part, dims)
            setattr(self, f"{part}_flavor", name if FLAVORS.get(name) == dims else flavor_name(dims))

    def to_dict(self) -> dict:
        """The official config.json fields; the dimensions too when a flavor is not one of the named ones."""
        out = {k: v for k, v in asdict(self).items() if k not in ("backbone", "decoder")}
        for part in ("backbone", "decoder"):
            if getattr(self, f"{part}_flavor") == CUSTOM_FLAVOR:
                out[part] = asdict(getattr(self, part))
        return out


# --------------------------------------------------------------------------- building blocks


class RMSNorm(nn.Module):
    """RMSNorm as the official model computes it (torchtune 0.6.1): normalise and apply `scale` in float32,
    then cast back to the input's dtype. In fp32 the order does not matter; in bf16 it does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.scale.float()).type_as(x)


def llama3_scaled_inv_freq(head_dim: int, base: float, scale_factor: float, low_freq_factor: float = 1.0,
                           high_freq_factor: float = 4.0, old_context_len: int = 8192) -> torch.Tensor:
    """Inverse RoPE frequencies with Llama-3's long-context scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32)[: head_dim // 2] / head_dim))
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (1 - smooth) * inv_freq / scale_factor + smooth * inv_freq
    return torch.where(wavelen < high_freq_wavelen, inv_freq,
                       torch.where(wavelen > low_freq_wavelen, inv_freq / scale_factor, mid))


class RotaryEmbedding(nn.Module):
    """RoPE over adjacent pairs (x[..., 0::2], x[..., 1::2]), Meta's layout, not HF's rotate-half.

    The cos/sin table is kept in float32 per device outside the module's buffers, so casting the
    model to bf16 does not round it and it never appears in a state dict.
    """

    def __init__(self, flavor: Flavor):
        super().__init__()
        self.head_dim = flavor.head_dim
        self.base = flavor.rope_base
        self.scale_factor = flavor.rope_scale_factor
        self.max_seq_len = flavor.max_seq_len
        self._tables: dict[torch.device, torch.Tensor] = {}

    def table(self, device: torch.device) -> torch.Tensor:
        """[max_seq_len, head_dim/2, 2] cos/sin table on `device`."""
        if device not in self._tables:
            # Built as a normal tensor even when first asked for under inference_mode (e.g. a
            # sample before any training step), so later training can save it for backward.
            with torch.inference_mode(False):
                inv_freq = llama3_scaled_inv_freq(self.head_dim, self.base, self.scale_factor)
                angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32), inv_freq)
                table = torch.stack([angles.cos(), angles.sin()], dim=-1).to(device)
                # Static for torch.compile: its sizes are constants, and as symbols they were "duck-sized" with
                # equal batch sizes or lengths (its last dim, 2, with a batch of 2), which then compiled static.
                torch._dynamo.mark_static(table)
                self._tables[device] = table
        return self._tables[device]

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None) -> torch.Tensor:
        """x: [b, s, heads, head_dim]; input_pos: [b, s] or None for positions 0..s-1."""
        b, s = x.shape[:2]
        table = self.table(x.device)
        rope = table[:s].unsqueeze(0) if input_pos is None else table[input_pos]
        rope = rope.view(rope.shape[0], s, 1, self.head_dim // 2, 2)
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        out = torch.stack([pairs[..., 0] * rope[..., 0] - pairs[..., 1] * rope[..., 1],
                           pairs[..., 1] * rope[..., 0] + pairs[..., 0] * rope[..., 1]], dim=-1)
        return out.flatten(3).type_as(x)


class KVCache(nn.Module):
    """Keys and values of past positions for incremental decoding, allocated once: each row writes at its own
    positions (rows of a batch may be at different lengths), and attention reads the cache's first `length`
    positions under a mask (decode_mask), so no step reads a position back to the host and every step has the
    same shapes. `length` (at most the allocated length) lets one allocation serve shorter windows: a compiled
    generation keeps its caches for the life of the model and picks a window per call."""

    def __init__(self, batch_size: int, max_seq_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None):
        super().__init__()
        shape = (batch_size, num_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.length = max_seq_len

    def reset(self):
        self.k.zero_()
        self.v.zero_()

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Store k/v ([b, kv_heads, s, head_dim]) at each row's input_pos ([b, s]) and return the first b rows of
        the cache's window: slots past a row's position hold stale values, which the mask hides."""
        b, n = k.shape[0], self.length
        index = input_pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        self.k[:b, :, :n].scatter_(2, index, k.to(self.k.dtype))
        self.v[:b, :, :n].scatter_(2, index, v.to(self.v.dtype))
        return self.k[:b, :, :n], self.v[:b, :, :n]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices into the batch), moved to the front: finished rows stop costing work."""
        n = len(rows)
        self.k[:n] = self.k.index_select(0, rows)
        self.v[:n] = self.v.index_select(0, rows)


class Attention(nn.Module):
    def __init__(self, flavor: Flavor, rope: RotaryEmbedding):
        super().__init__()
        f = flavor
        self.num_heads, self.num_kv_heads, self.head_dim = f.num_heads, f.num_kv_heads, f.head_dim
        self.q_proj = nn.Linear(f.embed_dim, f.num_heads * f.head_dim, bias=False)
        self.k_proj = nn.Linear(f.embed_dim, f.num_kv_heads * f.head_dim, bias=False)
        self.v_proj = nn.Linear(f.embed_dim, f.num_kv_heads * f.head_dim, bias=False)
        self.output_proj = nn.Linear(f.num_heads * f.head_dim, f.embed_dim, bias=False)
        # A plain attribute (not a submodule) so the shared RoPE cache is not registered once per layer.
        self._rope = [rope]
        self.kv_cache: KVCache | None = None

    def forward(self, x, input_pos=None, mask=None):
        b, s, _ = x.shape
        rope = self._rope[0]
        q = rope(self.q_proj(x).view(b, s, self.num_heads, self.head_dim), input_pos).transpose(1, 2)
        k = rope(self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim), input_pos).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is None:  # the causal training path: SDPA reads the kv heads in place (no expanded copies)
            # Without a cache, queries and keys are the same positions: causal for every length (a Python bool,
            # so a compiled layer does not branch on the symbolic length).
            causal = self.kv_cache is None or s > 1
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                 enable_gqa=self.num_kv_heads != self.num_heads)
        else:
            # With an explicit mask (generation): query head i reads kv head i // group. The group's query heads
            # become rows of one query block per kv head, so the cache is read in place, never copied per head.
            group = self.num_heads // self.num_kv_heads
            mask = mask[:, None, :, : k.shape[2]]
            if group > 1:
                q = q.reshape(b, self.num_kv_heads, group * s, self.head_dim)
                mask = mask if s == 1 else mask.repeat(1, 1, group, 1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(b, self.num_heads, s, self.head_dim)
        return self.output_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Layer(nn.Module):
    def __init__(self, flavor: Flavor, rope: RotaryEmbedding):
        super().__init__()
        self.sa_norm = RMSNorm(flavor.embed_dim, flavor.norm_eps)
        self.attn = Attention(flavor, rope)
        self.mlp_norm = RMSNorm(flavor.embed_dim, flavor.norm_eps)
        self.mlp = FeedForward(flavor.embed_dim, flavor.intermediate_dim)

    def forward(self, x, input_pos=None, mask=None):
        h = x + self.attn(self.sa_norm(x), input_pos, mask)
        return h + self.mlp(self.mlp_norm(h))


class Transformer(nn.Module):
    """A stack of Llama layers and a final norm, over embeddings (torchtune's decoder minus its ends)."""

    def __init__(self, flavor: Flavor):
        super().__init__()
        self.flavor = flavor
        self.max_seq_len = flavor.max_seq_len
        self.rope = RotaryEmbedding(flavor)
        self.layers = nn.ModuleList(Layer(flavor, self.rope) for _ in range(flavor.num_layers))
        self.norm = RMSNorm(flavor.embed_dim, flavor.norm_eps)
        self.activation_checkpointing = False
        self._compiled = None  # set_compile: the training path's layer call, compiled

    def setup_caches(self, batch_size: int, dtype: torch.dtype, max_seq_len: int | None = None):
        device = self.norm.scale.device
        f = self.flavor
        for layer in self.layers:
            layer.attn.kv_cache = KVCache(batch_size, max_seq_len or f.max_seq_len, f.num_kv_heads,
                                          f.head_dim, dtype, device)

    def caches_are_enabled(self) -> bool:
        return self.layers[0].attn.kv_cache is not None

    def cache_len(self) -> int:
        return self.layers[0].attn.kv_cache.length

    def set_cache_len(self, length: int) -> None:
        """Attend over the caches' first `length` positions (at most their allocated length)."""
        for layer in self.layers:
            layer.attn.kv_cache.length = length

    def keep_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.attn.kv_cache.keep_rows(rows)

    def reset_caches(self):
        for layer in self.layers:
            if layer.attn.kv_cache is not None:
                layer.attn.kv_cache.reset()

    def remove_caches(self):
        for layer in self.layers:
            layer.attn.kv_cache = None

    def set_compile(self, enabled: bool) -> None:
        """Compile the layers' causal path (training and validation: no KV cache, no mask) once for every
        layer and every batch shape (torch.compile with dynamic shapes); generation stays eager. fullgraph: a
        graph break inside a layer is an error, not a silent fall back to Python."""
        self._compiled = torch.compile(_run_layer, dynamic=True, fullgraph=True) if enabled else None

    def forward(self, h: torch.Tensor, *, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """h: [b, s, dim]. With mask None attention is causal over the s positions given."""
        run = self._compiled if self._compiled is not None and mask is None and not self.caches_are_enabled() \
            else _run_layer
        if run is not _run_layer:
            self.rope.table(h.device)  # built here, eagerly: a compiled layer then never sees the cache change
        for layer in self.layers:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(run, layer, h, input_pos, mask, use_reentrant=False)
            else:
                h = run(layer, h, input_pos, mask)
        return self.norm(h)


def _run_layer(layer: "Layer", h: torch.Tensor, input_pos, mask) -> torch.Tensor:
    return layer(h, input_pos, mask)


# --------------------------------------------------------------------------- sampling


def sample_topk(logits: torch.Tensor, topk: int, temperature: float, gumbel: torch.Tensor | None = None,
                max_token: int | None = None) -> torch.Tensor:
    """One token per row from the top-k of logits / temperature; returns [b, 1] int.

    Sampling is the Gumbel-max trick: the top-k logits plus `gumbel` noise ([b, topk], from frame_noise), and the
    largest wins, which draws exactly from softmax over the top k. The noise comes in as a tensor, so each row can
    draw it from a generator of its own and the step itself holds no random state (a CUDA graph can replay it).
    With `gumbel` None the step is greedy (the largest logit). `max_token` excludes ids from there on (audio ids
    2048-2050 exist but Mimi cannot decode them; a trained model never picks them, an untrained one may).
    """
    logits = logits[..., :max_token].float()  # a view: the ids from max_token on are never candidates
    if gumbel is None:
        return logits.argmax(-1, keepdim=True).to(torch.int)
    values, ids = torch.topk(logits / max(temperature, 1e-5), min(topk, logits.shape[-1]))
    return ids.gather(-1, (values + gumbel[..., : values.shape[-1]]).argmax(-1, keepdim=True)).to(torch.int)


def frame_noise(generators: list[torch.Generator], codebooks: int, topk: int, device) -> torch.Tensor:
    """Gumbel noise for one frame of every row, [b, codebooks, topk]: row i's from generators[i] alone, so a
    row's samples do not depend on the rows beside it."""
    tiny = torch.finfo(torch.float32).tiny
    u = torch.stack([torch.rand(codebooks, topk, generator=g, device=device) for g in generators])
    return -torch.log(-torch.log(u.clamp_(min=tiny)))


def causal_mask(seq_len: int, device=None) -> torch.Tensor:
    return torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))


def decode_mask(input_pos: torch.Tensor, cache_len: int) -> torch.Tensor:
    """[b, s, cache_len]: the query at position p reads cache slots 0..p, computed on the device from the
    positions (no [max_seq_len, max_seq_len] table, no read back to the host)."""
    return torch.arange(cache_len, device=input_pos.device) <= input_pos.unsqueeze(-1)


def embed_frames(model, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A frame's embedding is the sum of the embeddings of its unmasked entries: [b, s, dim].

    A function rather than a method so it serves the official `Model` too (it has `_embed_tokens`). The mask
    multiplies in place (the entries' embeddings are not needed for backward), so no masked copy is made:
    the same values as the official out-of-place product, bit for bit.
    """
    return model._embed_tokens(tokens).mul_(mask.unsqueeze(-1)).sum(dim=2)


# --------------------------------------------------------------------------- the model


class CSM(nn.Module):
    """The CSM: backbone over frames, decoder over codebooks, official parameter names."""

    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        backbone, decoder = config.backbone, config.decoder
        self.backbone = Transformer(backbone)
        self.decoder = Transformer(decoder)
        self.text_embeddings = nn.Embedding(config.text_vocab_size, backbone.embed_dim)
        self.audio_embeddings = nn.Embedding(config.audio_vocab_size * config.audio_num_codebooks, backbone.embed_dim)
        self.projection = nn.Linear(backbone.embed_dim, decoder.embed_dim, bias=False)
        self.codebook0_head = nn.Linear(backbone.embed_dim, config.audio_vocab_size, bias=False)
        self.audio_head = nn.Parameter(torch.empty(config.audio_num_codebooks - 1, decoder.embed_dim,
                                                   config.audio_vocab_size))
        self.init_weights()

    # -- initialisation ------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """From-scratch init: N(0, std) for matrices and embeddings, residual outputs scaled by
        1/sqrt(2 * layers) (GPT-2), norms at 1. Finetuning overwrites all of it."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module.weight.device.type != "meta":
                    nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                module.scale.fill_(1.0)
        for stack in (self.backbone, self.decoder):
            for layer in stack.layers:
                for w in (layer.attn.output_proj.weight, layer.mlp.w2.weight):
                    if w.device.type != "meta":
                        nn.init.normal_(w, 0.0, std / math.sqrt(2 * len(stack.layers)))
        if self.audio_head.device.type != "meta":
            nn.init.normal_(self.audio_head, 0.0, std)

    def set_activation_checkpointing(self, enabled: bool):
        self.backbone.activation_checkpointing = enabled
        self.decoder.activation_checkpointing = enabled

    def set_compile(self, enabled: bool):
        self.backbone.set_compile(enabled)
        self.decoder.set_compile(enabled)

    # -- embeddings ----------------------------------------------------------------------
    def _embed_audio(self, codebook: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.audio_embeddings(tokens + codebook * self.config.audio_vocab_size)

    def _embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [b, s, K+1] -> per-entry embeddings [b, s, K+1, dim] (text last).

        One gather from the audio table fills all K+1 columns (the text column reads row 0), then the text
        embeddings overwrite that column in place: the official version gathers the audio columns and the text
        column separately and concatenates them, holding the [b, s, K+1, dim] tensor twice. Same values;
        row 0's gradient gains only exact zeros."""
        k = self.config.audio_num_codebooks
        offsets = self.config.audio_vocab_size * torch.arange(k, device=tokens.device)
        index = torch.cat([tokens[:, :, :-1] + offsets, torch.zeros_like(tokens[:, :, -1:])], dim=-1)
        h = self.audio_embeddings(index)
        h[:, :, -1] = self.text_embeddings(tokens[:, :, -1])
        return h

    # -- inference -----------------------------------------------------------------------
    def setup_caches(self, max_batch_size: int, max_seq_len: int | None = None):
        """KV caches for `max_batch_size` rows of up to `max_seq_len` frames (default: the backbone's limit);
        attention reads the whole cache every step, so a shorter one is faster."""
        dtype = next(self.parameters()).dtype
        self.backbone.setup_caches(max_batch_size, dtype, max_seq_len)
        self.decoder.setup_caches(max_batch_size, dtype, max_seq_len=self.config.audio_num_codebooks)
        for stack in (self.backbone, self.decoder):
            stack.rope.table(self.norm_device())  # built eagerly, before any compiled step reads it

    def norm_device(self) -> torch.device:
        return self.backbone.norm.scale.device

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` of the batch in the caches (the decoder's are refilled every frame)."""
        self.backbone.keep_rows(rows)

    def reset_caches(self):
        self.backbone.reset_caches()
        self.decoder.reset_caches()

    def remove_caches(self):
        self.backbone.remove_caches()
        self.decoder.remove_caches()

    def generate_frame(self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor,
                       temperature: float, topk: int, noise: torch.Tensor | None = None,
                       last: torch.Tensor | None = None) -> torch.Tensor:
        """Sample the next audio frame of every row after the given frames, through the KV caches.

        tokens, tokens_mask: [b, s, K+1]; input_pos: [b, s], each row its own positions. `last` ([b]) is the
        index in s of each row's last real frame when prompts of different lengths come padded on the right
        (default: s - 1). `noise` ([b, K, topk], from frame_noise) samples; None is greedy. Returns [b, K] int
        codes. Nothing is read back to the host, and a one-frame step (s = 1) has the same shapes every time.
        """
        if not self.backbone.caches_are_enabled():
            raise RuntimeError("call setup_caches(batch_size) before generate_frame")
        return self.decode_codebooks(self.backbone_step(tokens, tokens_mask, input_pos, last), temperature, topk,
                                     noise)

    def backbone_step(self, tokens: torch.Tensor, tokens_mask: torch.Tensor, input_pos: torch.Tensor,
                      last: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone over the given frames, through its cache: each row's last hidden state, [b, dim]."""
        dtype = next(self.parameters()).dtype
        mask = decode_mask(input_pos, self.backbone.cache_len())
        h = self.backbone(embed_frames(self, tokens, tokens_mask).to(dtype), input_pos=input_pos, mask=mask)
        return h[:, -1] if last is None else h[torch.arange(h.shape[0], device=h.device), last]

    def decode_codebooks(self, last_h: torch.Tensor, temperature: float, topk: int,
                         noise: torch.Tensor | None) -> torch.Tensor:
        """Codebook 0 from the backbone's head, then codebooks 1..K-1 through the decoder, one at a time: [b, K]. The
        decoder's cache is not cleared between frames: its mask hides the slots this frame has not written."""
        k = self.config.audio_num_codebooks
        sample, curr_h = self.first_codebook(last_h, temperature, topk, noise)
        samples = [sample]
        pos = torch.arange(2, device=last_h.device).expand(last_h.shape[0], -1)
        for i in range(1, k):
            sample, curr_h = self.codebook_step(curr_h, pos, i, temperature, topk, noise)
            samples.append(sample)
            pos = pos[:, -1:] + 1
        return torch.cat(samples, dim=1)

    def first_codebook(self, last_h: torch.Tensor, temperature: float, topk: int,
                       noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook 0 of every row from the backbone's head: its sample [b, 1] and the decoder's first input
        [b, 2, dim] (the backbone's state, then the sample's embedding)."""
        sample = sample_topk(self.codebook0_head(last_h), topk, temperature, None if noise is None else noise[:, 0],
                             MIMI_CARDINALITY)
        return sample, torch.cat([last_h.unsqueeze(1), self._embed_audio(0, sample)], dim=1)

    def codebook_step(self, curr_h: torch.Tensor, pos: torch.Tensor, i, temperature: float, topk: int,
                      noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Codebook i (an int, or a 0-d tensor) of every row from the decoder: its sample [b, 1] and the sample's
        embedding, the decoder's next input."""
        k = self.config.audio_num_codebooks
        dec_h = self.decoder(self.projection(curr_h), input_pos=pos, mask=decode_mask(pos, k))
        logits = dec_h[:, -1, :] @ _pick(self.audio_head, 0, i - 1)
        sample = sample_topk(logits, topk, temperature, None if noise is None else _pick(noise, 1, i), MIMI_CARDINALITY)
        return sample, self._embed_audio(i, sample)


def _pick(t: torch.Tensor, dim: int, i) -> torch.Tensor:
    """t's slice i along dim, for an int i (a view) or a 0-d tensor (a gather that one compiled graph serves for
    every codebook)."""
    return t.select(dim, i) if isinstance(i, int) else t.index_select(dim, i.view(1)).squeeze(dim)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
