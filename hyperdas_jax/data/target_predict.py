"""Next-token argmax of a frozen target through one jitted function, as the RAVEL filter's `predict_fn`."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PredictFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _argmax_step(state, ids, mask, *, graphdef):
    """(b, t) int32 argmax of the logits; real tokens numbered from 0 (left pads ignored)."""
    model = nnx.merge(graphdef, state)
    h = model.run_layers(model.embed(ids), model.attn_inputs(mask))  # (b, t, d)
    return jnp.argmax(model.unembed(h), axis=-1).astype(jnp.int32)  # (b, t)


def make_predict_fn(target: Any) -> PredictFn:
    """Wraps a target as `predict_fn(ids, mask) -> argmax`, the callable `ravel_filter.filter_rows` takes.

    The target's state is an argument of the jitted function, never closed over, so the weights do
    not become compile-time constants. One program is compiled per input shape; the filter buckets
    its shapes, so a whole run compiles only a few.

    Args:
        target: a `hyperdas_jax.target.Target` (its `.model` is used) or a Flax NNX `Llama`.

    Returns:
        predict_fn(input_ids (b, t) int, attention_mask (b, t) int) -> (b, t) int32 numpy array of
        next-token argmax ids. Inputs are left-padded; position ids number the real tokens from 0,
        as the HyperDAS forward and the no-intervention baseline do.
    """
    model = getattr(target, "model", target)
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda state, ids, mask: _argmax_step(state, ids, mask, graphdef=graphdef))

    def predict_fn(input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        ids = np.asarray(input_ids, np.int32)
        mask = np.asarray(attention_mask, np.int32)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"predict_fn needs (batch, time) ids and mask of one shape, got {ids.shape}, {mask.shape}")
        return np.asarray(step(state, ids, mask))

    return predict_fn
