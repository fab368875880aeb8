"""Our Flax Llama against HF transformers' torch Llama on tiny random configs, through the real converter."""

import numpy as np
import pytest
import torch
import transformers

from hyperdas_jax.target import load_target
from tools import convert_hf_llama

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
VARIANTS = {
    "mha-untied-default": dict(num_key_value_heads=4, tie_word_embeddings=False),
    "gqa-untied-llama3": dict(num_key_value_heads=2, tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
    "mqa-tied-default": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "gqa-tied-llama3": dict(num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE),
    "mha-tied-headdim": dict(num_key_value_heads=4, tie_word_embeddings=True, head_dim=8),
}
ATOL = 1e-5


def make_hf(tmp_path, **kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, rms_norm_eps=1e-5,
                attn_implementation="eager", max_position_embeddings=64)
    base.update(kw)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**base)).eval().to(torch.float32)
    with torch.no_grad():  # random non-unit norms so the norm weights are really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    src = tmp_path / "hf"
    model.save_pretrained(src)
    out = tmp_path / "converted"
    assert convert_hf_llama.main(["--source", str(src), "--out", str(out)]) == 0
    return model, load_target(out)


def torch_run(model, ids, mask=None, pos=None):
    with torch.no_grad():
        o = model(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
                  position_ids=None if pos is None else torch.tensor(pos), output_hidden_states=True)
    return o.logits.numpy(), [h.numpy() for h in o.hidden_states]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp(request.param), **VARIANTS[request.param])


def test_logits_and_every_hidden_state(pair):
    hf, ours = pair
    ids = np.random.RandomState(1).randint(0, 97, (3, 24))
    ref_logits, ref_hs = torch_run(hf, ids)
    logits, hs = ours.model(ids, output_hidden_states=True)
    assert len(hs) == len(ref_hs) == hf.config.num_hidden_layers + 1
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=ATOL, rtol=0)
    for i, (a, b) in enumerate(zip(hs, ref_hs)):
        np.testing.assert_allclose(np.asarray(a), b, atol=ATOL, rtol=0, err_msg=f"hidden state {i}")
    np.testing.assert_allclose(np.asarray(ours(ids)), ref_logits, atol=ATOL, rtol=0)  # jitted entry point
    np.testing.assert_allclose(np.asarray(ours.model.hidden_states(ids)), np.stack(ref_hs), atol=ATOL, rtol=0)


def left_pad(rows, pad_id=0):
    t = max(len(r) for r in rows)
    ids = np.full((len(rows), t), pad_id, np.int64)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        ids[i, t - len(r):] = r
        mask[i, t - len(r):] = 1
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    return ids, mask, pos


def test_left_padded_batch_equals_unpadded_runs(pair):
    hf, ours = pair
    rng = np.random.RandomState(2)
    rows = [rng.randint(0, 97, n) for n in (9, 17, 4)]
    ids, mask, pos = left_pad(rows, pad_id=5)
    ref_logits, ref_hs = torch_run(hf, ids, mask, pos)
    logits, hs = ours.model(ids, mask, pos, output_hidden_states=True)
    for i, r in enumerate(rows):
        n = len(r)
        alone = np.asarray(ours(r[None]))[0]
        np.testing.assert_allclose(np.asarray(logits)[i, -n:], alone, atol=ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(logits)[i, -n:], ref_logits[i, -n:], atol=ATOL, rtol=0)
        for layer, ref in enumerate(ref_hs):
            np.testing.assert_allclose(np.asarray(hs[layer])[i, -n:], ref[i, -n:], atol=ATOL, rtol=0)
    assert np.isfinite(np.asarray(logits)).all()  # pad rows attend to nothing real, but never NaN
    # The entry point's default position ids skip the pads.
    np.testing.assert_allclose(np.asarray(ours(ids, mask)), np.asarray(logits), atol=ATOL, rtol=0)


def test_span_forward_split_at_every_layer(pair):
    _, ours = pair
    m = ours.model
    ids, mask, pos = left_pad([np.arange(3, 15), np.arange(20, 27)])
    full_logits, hs = m(ids, mask, pos, output_hidden_states=True)
    attn = m.attn_inputs(mask, pos)
    for layer in range(m.num_layers + 1):
        h = m.run_layers(m.embed(ids), attn, 0, layer)
        if layer < m.num_layers:  # raw residual stream hs[L] (the last HF entry is post-norm)
            np.testing.assert_allclose(np.asarray(h), np.asarray(hs[layer]), atol=ATOL, rtol=0)
            # residual_stream: the same prefix with the positions a left-padded mask implies
            np.testing.assert_allclose(np.asarray(m.residual_stream(ids, mask, layer)), np.asarray(hs[layer]),
                                       atol=ATOL, rtol=0)
        logits = m.unembed(m.run_layers(h, attn, layer))
        np.testing.assert_allclose(np.asarray(logits), np.asarray(full_logits), atol=ATOL, rtol=0,
                                   err_msg=f"split at {layer}")
    with pytest.raises(ValueError):
        m.run_layers(hs[0], attn, 2, 1)


def test_bfloat16_compute_tracks_float32(pair, tmp_path):
    _, ours = pair
    bf = load_target(ours.path, dtype="bfloat16", param_dtype="bfloat16")
    ids = np.random.RandomState(3).randint(0, 97, (2, 16))
    a, b = np.asarray(ours(ids)), np.asarray(bf(ids))
    assert b.dtype == np.float32  # logits are always float32
    assert np.abs(a - b).max() < 0.1 * np.abs(a).max()
    assert bf.model.layers[0].mlp.up_proj.kernel[...].dtype == np.dtype("bfloat16")
