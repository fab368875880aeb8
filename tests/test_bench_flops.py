"""The train-step benchmark's analytic FLOP count: the anchor prior's instruction pass is counted and cached."""

import pytest

from hyperdas_jax.benchmarks import train_step as bench
from hyperdas_jax.config import ModelConfig, load_config

SMOLLM2 = ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


@pytest.mark.parametrize("anchor_layer, blocks", [("null", 15), (10, 10), (3, 3)])
def test_instruction_pass_is_its_anchor_layers_blocks_over_the_instruction(anchor_layer, blocks):
    b, te = 16, 20
    cfg = load_config("configs/smollm2_ravel.yaml", [f"intervention.anchor_layer={anchor_layer}"])
    flops = bench.step_flops(SMOLLM2, cfg, b, te, te, te, 8)
    # A clean pass over a prompt as long as the instruction runs all 30 blocks: the prior runs `blocks` of them.
    per_block = flops["target clean passes (fwd)"] / 2 / SMOLLM2.num_hidden_layers
    assert flops[bench.INSTRUCTION_PASS] == pytest.approx(blocks * per_block, rel=1e-12)
    assert set(bench.CACHED) <= set(flops)


def test_no_instruction_pass_without_the_prior():
    cfg = load_config("configs/smollm2_ravel.yaml", ["intervention.anchor_prior=0"])
    assert bench.INSTRUCTION_PASS not in bench.step_flops(SMOLLM2, cfg, 16, 20, 30, 30, 8)
