"""The reference model: parameter counts, temporal encoders, splice, KV-cached generation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from blip3v.model.config import TEMPORAL_ENCODERS, TemporalConfig, preset
from blip3v.model.temporal import TemporalEncoder, TokenLearner
from blip3v.model.xgenmm import XGenMMVideoModel, count_parameters

IMAGE_MODEL_PARAMS = 4_359_257_219  # released index total_size 17,437,028,876 / 4
GTTM_PARAMS = 59_346_976


def meta_counts(name: str) -> dict[str, int]:
    with torch.device("meta"):
        return count_parameters(XGenMMVideoModel(preset(name)))


def test_full_presets_parameter_counts_on_meta():
    image = meta_counts("xgen-mm-image")
    assert image["total"] == IMAGE_MODEL_PARAMS
    assert image["temporal_encoder"] == 0
    vid128 = meta_counts("xgen-mm-vid-128")
    assert vid128["total"] == 4_418_604_195
    assert vid128["temporal_encoder"] == GTTM_PARAMS
    assert vid128["total"] - vid128["temporal_encoder"] == IMAGE_MODEL_PARAMS
    assert meta_counts("xgen-mm-vid-128-16f") == vid128  # frames change no weights
    assert meta_counts("xgen-mm-vid-32")["temporal_encoder"] == 80_384  # TL(32) at D=1152
    gttm_tl = meta_counts("xgen-mm-vid-32-gttm")["temporal_encoder"]
    assert gttm_tl == GTTM_PARAMS + 80_384


def test_full_preset_video_token_counts():
    assert preset("xgen-mm-vid-32").num_video_tokens == 32
    assert preset("xgen-mm-vid-128").num_video_tokens == 128
    assert preset("xgen-mm-vid-128-16f").num_frames == 16
    assert preset("xgen-mm-vid-128").num_logits == 32015


@pytest.mark.parametrize("kind", TEMPORAL_ENCODERS)
def test_temporal_encoder_shapes(kind):
    b, t, n, d, m = 2, 3, 5, 16, 4
    enc = TemporalEncoder(d, n, TemporalConfig(type=kind, num_tokens=m, memory_size=2, process_layers=1,
                                               heads=2, dim_head=8, ff_mult=2, read_tokens=3))
    out = enc(torch.randn(b, t, n, d))
    expected = {"tl": m, "gttm_tl": m, "gttm": n, "mean": n, "none": t * n}[kind]
    assert out.shape == (b, expected, d)


def test_token_learner_uniform_weights_give_the_mean():
    # Zero output layer -> all attention logits equal -> softmax over n is uniform -> mean of x.
    tl = TokenLearner(dim=3, num_tokens=2)
    with torch.no_grad():
        tl.mlp[3].weight.zero_()
    x = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 0.0, -1.0], [-1.0, 4.0, 1.0], [1.0, 2.0, 1.0]]])
    out = tl(x)
    assert torch.allclose(out, torch.tensor([[[1.0, 2.0, 1.0], [1.0, 2.0, 1.0]]]))


def test_token_learner_hand_computed_selection():
    # Pick the softmax logits by hand: a[n, m] = w_m * h(n) with h the first normalised channel.
    # With LayerNorm weights at identity, token n's first channel after LN is known in closed form.
    tl = TokenLearner(dim=2, num_tokens=1)
    with torch.no_grad():
        lin1, lin2 = tl.mlp[1], tl.mlp[3]  # D -> 2M = 2, 2 -> M = 1
        lin1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        lin2.weight.copy_(torch.tensor([[10.0, 0.0]]))
    # 2-channel LN of (a, b) is (+1, -1) if a > b else (-1, +1); applied twice it stays so.
    x = torch.tensor([[[5.0, 1.0], [0.0, 2.0]]])
    # h = (+1, -1) -> GELU -> (0.8413, -0.1587) -> logits 8.413 and -1.587 -> softmax weights:
    gelu = torch.nn.functional.gelu
    a = torch.tensor([10 * gelu(torch.tensor(1.0)), 10 * gelu(torch.tensor(-1.0))]).softmax(0)
    expected = a[0] * x[0, 0] + a[1] * x[0, 1]
    assert torch.allclose(tl(x)[0, 0], expected, atol=1e-4)
    assert a[0] > 0.9999  # the first token is selected almost exclusively


def test_gttm_sees_frame_order_while_pooling_baselines_do_not():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 3, 16)
    reversed_x = x.flip(1)
    cfg = dict(num_tokens=2, memory_size=2, process_layers=1, heads=2, dim_head=8, ff_mult=2, read_tokens=3)
    for kind in ("tl", "mean"):
        enc = TemporalEncoder(16, 3, TemporalConfig(type=kind, **cfg))
        assert torch.allclose(enc(x), enc(reversed_x), atol=1e-5), kind
    enc = TemporalEncoder(16, 3, TemporalConfig(type="gttm", **cfg))
    assert not torch.allclose(enc(x), enc(reversed_x), atol=1e-3)


def test_gttm_time_embedding_is_interleaved_sinusoids():
    enc = TemporalEncoder(8, 2, TemporalConfig(type="gttm", memory_size=2, process_layers=1, heads=2, dim_head=4))
    pe = enc.pos_emb(3, torch.float32)  # (T, D)
    inv = 1.0 / 10000 ** (np.arange(0, 8, 2) / 8)
    t = 2
    expected = np.stack([np.sin(t * inv), np.cos(t * inv)], axis=-1).reshape(-1)
    assert np.allclose(pe[t].numpy(), expected, atol=1e-6)
    assert enc.pos_emb.inv_freq.numel() == 4


@pytest.fixture(scope="module")
def tiny():
    from conftest import spread_init_

    from blip3v.model.train import task_config, task_tokenizer

    tok = task_tokenizer()
    torch.manual_seed(1)
    model = XGenMMVideoModel(task_config(tok, "gttm", 4)).eval()
    spread_init_(model)
    return model, tok


def test_extra_embeddings_and_logits(tiny):
    model, tok = tiny
    cfg = model.config
    emb = model.vlm.lang_model.model.embed_tokens
    image_id = cfg.special_token_ids["image"]
    assert image_id == cfg.additional_vocab_start
    out = emb(torch.tensor([[image_id, image_id + 2, 5]]))
    assert torch.equal(out[0, 0], emb.additional_embedding.weight[0])
    assert torch.equal(out[0, 1], emb.additional_embedding.weight[2])
    assert torch.equal(out[0, 2], emb.weight[5])
    logits, _ = model.decoder(torch.randn(1, 3, cfg.text_config["hidden_size"]))
    assert logits.shape[-1] == cfg.num_logits == cfg.additional_vocab_start + 3


def test_splice_places_video_tokens_at_image(tiny):
    model, tok = tiny
    from blip3v.model.tokenizer import encode_prompt

    cfg = model.config
    ids = torch.tensor([encode_prompt(cfg, tok, "what colour is the square?")])
    pos = int((ids[0] == cfg.special_token_ids["image"]).nonzero())
    video = torch.randn(1, cfg.num_video_tokens, cfg.text_config["hidden_size"])
    spliced = model.splice(ids, video)
    m = cfg.num_video_tokens
    assert spliced.shape[1] == ids.shape[1] - 1 + m
    text = model.embed_tokens(ids)
    assert torch.equal(spliced[0, :pos], text[0, :pos])
    assert torch.equal(spliced[0, pos:pos + m], video[0])
    assert torch.equal(spliced[0, pos + m:], text[0, pos + 1:])
    with pytest.raises(ValueError):
        model.splice(ids[:, :pos], video)  # no <image>


def greedy_without_cache(model, embeds: torch.Tensor, mask: torch.Tensor, n: int) -> list[list[int]]:
    """The oracle: greedy ids from running the decoder on the whole sequence at every step, no
    cache (positions from the mask, as the runtime derives them)."""
    out = []
    with torch.inference_mode():
        for _ in range(n):
            logits, _ = model.decoder(embeds, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                                      use_cache=False)
            nxt = logits[:, -1].argmax(-1)  # (B,)
            out.append(nxt.tolist())
            embeds = torch.cat([embeds, model.embed_tokens(nxt[:, None])], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return [list(r) for r in zip(*out)]


def test_kv_cache_generation_equals_recomputation(tiny):
    """The reference decoder (TorchBackend, DynamicCache) through the runtime's decode loop gives the
    no-cache recomputation's greedy ids, padded rows included, and each row decodes as it would alone."""
    from blip3v.model.generate import TorchBackend, left_pad
    from blip3v.model.tokenizer import encode_prompt
    from blip3v.runtime.decoding import generate
    from blip3v.runtime.generation import SamplingConfig

    model, tok = tiny
    backend = TorchBackend(model, tok, decoder="reference")
    cfg = model.config
    rows = [encode_prompt(cfg, tok, q) for q in ("which way does the circle move?", "how many shapes are there?")]
    ids, mask = left_pad(rows, cfg.special_token_ids["pad"])
    assert len(set(map(len, rows))) == 2  # one row is left-padded
    torch.manual_seed(3)
    pixels = torch.randn(2, cfg.num_frames, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        embeds = model.splice(ids, model.encode_video(pixels))
    wide = model.widen_mask(ids, mask)
    s = SamplingConfig(max_new_tokens=12)
    with warnings.catch_warnings():  # the cache goes in under the installed transformers' own name
        warnings.simplefilter("error", FutureWarning)
        cached = generate(backend, embeds, wide.numpy(), s, stop_ids=())
    assert cached == greedy_without_cache(model, embeds, wide, 12)
    assert all(len(r) == 12 for r in cached)
    assert len({tuple(r) for r in cached}) == 2  # the two rows really differ
    # each left-padded row decodes as it would alone
    for i, row in enumerate(rows):
        with torch.no_grad():
            alone = model.splice(torch.tensor([row]), model.encode_video(pixels[i:i + 1]))
        single = generate(backend, alone, np.ones(alone.shape[:2], dtype=np.int64), s, stop_ids=())
        assert single[0] == cached[i]


def test_sampling_is_seeded_and_top_p_restricts(tiny):
    from blip3v.runtime.generation import Sampler, SamplingConfig

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    picks = {int(Sampler(SamplingConfig(temperature=1.0, top_p=0.7, seed=s))(logits)[0]) for s in range(200)}
    assert picks == {0, 1}  # 0.5 + 0.3 >= 0.7: the tail is never drawn
    a = [int(Sampler(SamplingConfig(temperature=1.0, seed=5))(logits)[0]) for _ in range(3)]
    b = [int(Sampler(SamplingConfig(temperature=1.0, seed=5))(logits)[0]) for _ in range(3)]
    assert a == b
    assert Sampler(SamplingConfig())(logits)[0] == 0
