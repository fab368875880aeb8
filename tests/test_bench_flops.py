"""Analytic FLOP counts of the benchmarks: the forward against XLA's cost analysis; the train step's anchor-prior pass."""

import pytest

from hyperdas_jax.benchmarks import flops
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


@pytest.mark.parametrize("logits", [True, False])
@pytest.mark.parametrize("batch, tokens", [(8, 16), (2, 64)])
def test_forward_flops_match_xla_cost_analysis(logits, batch, tokens):
    # XLA's own count of our compiled SmolLM2 forward (abstract weights: nothing is allocated) also counts
    # norms, RoPE and softmax, which the analytic count leaves out: they are under 1 % of it.
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from hyperdas_jax.models.llama import Llama
    from hyperdas_jax.sharding import abstract_module

    graphdef, state = abstract_module(lambda: Llama(SMOLLM2, rngs=nnx.Rngs(0)))

    def forward(state, ids, mask):
        model = nnx.merge(graphdef, state)
        return model(ids, mask) if logits else model.hidden_states(ids, mask)

    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    cost = jax.jit(forward).lower(state, ids, ids).compile().cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    analytic = flops.forward_flops(SMOLLM2, batch, tokens, logits=logits)
    assert analytic == pytest.approx(xla, rel=0.01)
    assert analytic <= xla  # nothing counted that XLA does not run


def test_train_step_blocks_use_the_forward_count():
    cfg = load_config("configs/smollm2_ravel.yaml", ["intervention.anchor_prior=0"])
    b, tb, ts = 4, 24, 32
    step = bench.step_flops(SMOLLM2, cfg, b, 16, tb, ts, 8)
    # Two clean passes without the LM head = the hidden-states-only forwards of base and source.
    both = (flops.forward_flops(SMOLLM2, b, tb, logits=False) + flops.forward_flops(SMOLLM2, b, ts, logits=False))
    assert step["target clean passes (fwd)"] == pytest.approx(both, rel=1e-12)


def test_ceiling_is_torch_time_over_time_at_peak():
    # 100 GFLOP at 200 GFLOP/s take 0.5 s at best: torch's 0.6 s is then at most 1.2x slower.
    assert flops.ceiling(0.6, 100e9, 200e9) == pytest.approx(1.2)
