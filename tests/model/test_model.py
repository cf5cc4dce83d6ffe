"""The built-in CSM: official key layout, KV-cache decoding equals the full forward."""
import torch

from csm.model.csm_model import CSM, FLAVORS, ModelArgs, causal_mask, embed_frames
from csm.data.tiny_assets import TINY_MODEL_ARGS


def spec_keys() -> dict[str, tuple]:
    """The state-dict keys and shapes of sesame/csm-1b's released checkpoint, written out independently."""
    keys = {
        "text_embeddings.weight": (128256, 2048),
        "audio_embeddings.weight": (65632, 2048),
        "projection.weight": (1024, 2048),
        "codebook0_head.weight": (2051, 2048),
        "audio_head": (31, 1024, 2051),
        "backbone.norm.scale": (2048,),
        "decoder.norm.scale": (1024,),
    }
    for stack, n, dim, kv, ffn in (("backbone", 16, 2048, 512, 8192), ("decoder", 4, 1024, 256, 8192)):
        for i in range(n):
            p = f"{stack}.layers.{i}."
            keys.update({
                p + "sa_norm.scale": (dim,),
                p + "attn.q_proj.weight": (dim, dim),
                p + "attn.k_proj.weight": (kv, dim),
                p + "attn.v_proj.weight": (kv, dim),
                p + "attn.output_proj.weight": (dim, dim),
                p + "mlp_norm.scale": (dim,),
                p + "mlp.w1.weight": (ffn, dim),
                p + "mlp.w2.weight": (dim, ffn),
                p + "mlp.w3.weight": (ffn, dim),
            })
    return keys


def test_1b_state_dict_matches_the_official_layout():
    with torch.device("meta"):
        model = CSM(ModelArgs())
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = spec_keys()
    assert len(expected) == 187
    assert got == expected
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e9 - 1.553) < 0.001
    assert not any("cache" in k or "mask" in k for k in got)


def test_caches_never_enter_the_state_dict():
    model = CSM(TINY_MODEL_ARGS)
    before = set(model.state_dict())
    model.setup_caches(2)
    assert set(model.state_dict()) == before


def _random_frames(b, s, args, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = args.audio_num_codebooks
    tokens = torch.zeros(b, s, k + 1, dtype=torch.long)
    tokens[:, :, :k] = torch.randint(0, 2048, (b, s, k), generator=g)
    tokens[:, :, k] = torch.randint(0, args.text_vocab_size, (b, s), generator=g)
    mask = torch.zeros(b, s, k + 1, dtype=torch.bool)
    mask[:, :4, k] = True
    mask[:, 4:, :k] = True
    return tokens, mask


@torch.no_grad()
def test_kv_cache_backbone_equals_full_causal_forward():
    torch.manual_seed(0)
    model = CSM(TINY_MODEL_ARGS).eval()
    tokens, mask = _random_frames(2, 12, TINY_MODEL_ARGS)
    h = embed_frames(model, tokens, mask)
    full = model.backbone(h)

    model.setup_caches(2)
    steps = [range(0, 5)] + [range(i, i + 1) for i in range(5, 12)]  # a prompt, then one frame at a time
    bb_mask = causal_mask(model.backbone.max_seq_len)
    outs = []
    for r in steps:
        pos = torch.tensor(list(r)).unsqueeze(0).expand(2, -1)
        outs.append(model.backbone(h[:, r.start:r.stop], input_pos=pos, mask=bb_mask[pos]))
    incremental = torch.cat(outs, dim=1)
    torch.testing.assert_close(incremental, full, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_frame_greedy_equals_full_forward_argmax():
    torch.manual_seed(1)
    model = CSM(TINY_MODEL_ARGS).eval()
    args = TINY_MODEL_ARGS
    tokens, mask = _random_frames(1, 9, args, seed=3)

    # Reference without caches: full causal backbone, then the decoder re-run on the growing prefix.
    h_last = model.backbone(embed_frames(model, tokens, mask))[:, -1]
    codes = [int(model.codebook0_head(h_last).argmax(-1))]
    for i in range(1, args.audio_num_codebooks):
        prefix = torch.tensor([codes]) + args.audio_vocab_size * torch.arange(i)
        dec_in = torch.cat([h_last.unsqueeze(1), model.audio_embeddings(prefix)], dim=1)
        dec_h = model.decoder(model.projection(dec_in))
        codes.append(int((dec_h[:, -1] @ model.audio_head[i - 1]).argmax(-1)))

    model.setup_caches(1)
    pos = torch.arange(9).unsqueeze(0)
    frame = model.generate_frame(tokens, mask, pos, temperature=1.0, topk=1)
    assert frame.shape == (1, args.audio_num_codebooks)
    assert frame[0].tolist() == codes

    # A second frame through the warm cache equals a fresh full forward over the longer sequence.
    nxt = torch.zeros(1, 1, args.audio_num_codebooks + 1, dtype=torch.long)
    nxt[0, 0, :-1] = frame[0]
    nxt_mask = torch.zeros_like(nxt, dtype=torch.bool)
    nxt_mask[0, 0, :-1] = True
    frame2 = model.generate_frame(nxt, nxt_mask, torch.tensor([[9]]), temperature=1.0, topk=1)
    model.remove_caches()
    model.setup_caches(1)
    all_tokens, all_mask = torch.cat([tokens, nxt], 1), torch.cat([mask, nxt_mask], 1)
    frame2_fresh = model.generate_frame(all_tokens, all_mask, torch.arange(10).unsqueeze(0), 1.0, 1)
    assert frame2.tolist() == frame2_fresh.tolist()


def test_flavors_are_consistent():
    for name, f in FLAVORS.items():
        assert f.embed_dim % f.num_heads == 0, name
        assert f.num_heads % f.num_kv_heads == 0, name
        assert f.head_dim % 2 == 0, name


def test_rmsnorm_applies_the_scale_in_float32_before_casting_as_the_official_model():
    """The official formula, written out: F.rms_norm(x.float(), weight=scale.float()).to(dtype)."""
    from csm.model.csm_model import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(64, 1e-5)
    with torch.no_grad():
        norm.scale.copy_(torch.randn(64) * 3)
    x32 = torch.randn(4, 16, 64) * 5
    official32 = torch.nn.functional.rms_norm(x32, (64,), weight=norm.scale, eps=1e-5)
    torch.testing.assert_close(norm(x32), official32, rtol=1e-6, atol=1e-6)  # fp32: the two orders agree

    bf = norm.to(torch.bfloat16)
    xb = x32.to(torch.bfloat16)
    official = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)
                * bf.scale.float()).to(torch.bfloat16)
    cast_first = (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1,
                                                                  keepdim=True) + 1e-5)).to(torch.bfloat16) * bf.scale
    assert torch.equal(bf(xb), official)
    assert not torch.equal(cast_first, official)  # the old order rounds twice: it gives other bf16 values


def test_grouped_query_attention_in_place_equals_the_expanded_heads():
    """The causal training path lets SDPA read the shared kv heads (enable_gqa); generation's masked path
    expands them with repeat_interleave. Both compute the same attention."""
    from csm.model.csm_model import FLAVORS, Attention, RotaryEmbedding, causal_mask

    flavor = FLAVORS["llama-tiny"]
    assert flavor.num_kv_heads < flavor.num_heads
    torch.manual_seed(0)
    attn = Attention(flavor, RotaryEmbedding(flavor))
    x = torch.randn(2, 7, flavor.embed_dim)
    in_place = attn(x)  # mask None: enable_gqa
    expanded = attn(x, torch.arange(7).expand(2, 7), causal_mask(7)[None].expand(2, 7, 7))
    torch.testing.assert_close(in_place, expanded, rtol=0, atol=1e-6)


def test_frame_embedding_equals_the_official_gather_concat_and_mask_bit_for_bit():
    """One gather into one tensor and an in-place mask (csm_model._embed_tokens / embed_frames) give the
    official `(cat([audio, text]) * mask).sum(2)` exactly in fp32: output and both tables' gradients."""
    torch.manual_seed(0)
    args = TINY_MODEL_ARGS
    model = CSM(args)
    tokens, mask = _random_frames(3, 10, args)
    mask[2, 7:] = False  # padding frames
    tokens[1, :, 0] = 0  # row 0 of the audio table, which the text column's gather also reads, gets real gradient
    upstream = torch.randn(3, 10, model.text_embeddings.embedding_dim)

    def official(text_table, audio_table):
        k = args.audio_num_codebooks
        text = torch.nn.functional.embedding(tokens[:, :, -1], text_table).unsqueeze(-2)
        audio = torch.nn.functional.embedding(tokens[:, :, :-1] + args.audio_vocab_size * torch.arange(k), audio_table)
        return (torch.cat([audio, text], dim=-2) * mask.unsqueeze(-1)).sum(dim=2)

    text_ref = model.text_embeddings.weight.detach().clone().requires_grad_()
    audio_ref = model.audio_embeddings.weight.detach().clone().requires_grad_()
    ref = official(text_ref, audio_ref)
    (ref * upstream).sum().backward()
    out = embed_frames(model, tokens, mask)
    (out * upstream).sum().backward()
    assert torch.equal(out, ref)
    assert torch.equal(model.text_embeddings.weight.grad, text_ref.grad)
    assert torch.equal(model.audio_embeddings.weight.grad, audio_ref.grad)
    assert model.audio_embeddings.weight.grad[0].abs().sum() > 0


@torch.no_grad()
def test_one_compilation_serves_every_batch_length():
    """set_compile: batches of other lengths and sizes (2 and up: PyTorch specializes sizes of 1) reuse the
    first compiled graph (no recompiles, no graph breaks: fullgraph), and the compiled layers give eager's
    output. A length equal to a constant dim (64, the width) must not make it static either."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    stack = CSM(TINY_MODEL_ARGS).eval().backbone
    torch._dynamo.reset()
    counters.clear()
    stack.set_compile(True)
    for b, s in ((2, 5), (3, 9), (2, 64), (4, 6)):
        h = torch.randn(b, s, stack.norm.scale.shape[0])
        out = stack(h)
        stack.set_compile(False)
        torch.testing.assert_close(out, stack(h), rtol=1e-5, atol=1e-5)
        stack.set_compile(True)
    assert counters["stats"]["unique_graphs"] == 1
