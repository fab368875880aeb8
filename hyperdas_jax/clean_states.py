"""Host cache of the frozen target's clean hidden states, one entry per distinct prompt.

A HyperDAS step needs every hidden state of the target's clean passes over the base and the
source prompt (the hypernetwork's cross-attention memories and the hs[L] that is patched). The
target is frozen, so those states are the same for the same prompt in every epoch and in every
evaluation mode. The cache computes them once per prompt (on the first batch that holds it, with
one pass over that batch) and afterwards hands them to the step as batch inputs, so the step runs
only the hypernetwork and blocks [L, n) of the target.

When the rows are known up front (`make_cache`), every distinct prompt is computed before training
in one fixed order, so a resumed run reads exactly the states an uninterrupted one reads.
States are stored unpadded (the prompt's real tokens only, in the target's compute dtype, on the host)
and left-padded with zeros into each batch. A real token's state does not depend on padding (positions count real
tokens, pads are masked keys), and the model never reads a pad position's state (masked in the
memories, the selection and the upper blocks' attention), so the cached step computes the same
loss and gradients as the uncached one (tests/test_clean_states.py).

With `instruction_layer=A` (HyperDAS with `intervention.anchor_prior`; A its anchor layer) the cache also
keeps hs[A] of every distinct instruction (editor_ids) and attaches it as `editor_layer_states` (b, e, d):
the states the anchor prior reads (hyperdas_jax/models/hyperdas.py `forward`).

A cache built with `layer=L` keeps only hs[L] (the residual stream entering block L) and attaches
it as `base_layer_states` / `source_layer_states` (b, t, d): all the MDAS baseline's step reads of
the clean passes (hyperdas_jax/mdas.py).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hyperdas_jax.sharding import use_mesh

# Batch keys the step reads instead of running the clean passes: (b, n+1, t, d), or with a `layer` cache
# (b, t, d), in the target's compute dtype.
STATE_KEYS = {"base_ids": "base_states", "source_ids": "source_states"}
LAYER_STATE_KEYS = {"base_ids": "base_layer_states", "source_ids": "source_layer_states"}
INSTRUCTION_STATE_KEYS = {"editor_ids": "editor_layer_states"}
_MASKS = {"base_ids": "base_mask", "source_ids": "source_mask", "editor_ids": "editor_mask"}
_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256)  # fill's padded widths: a few compiled shapes


def distinct_prompts(examples: Iterable[Any]) -> list[tuple[int, ...]]:
    """The distinct base and source token sequences of encoded examples (`collate.EncodedExample`),
    shortest first (ties by ids): the fixed order in which `CleanStateCache.fill` computes them."""
    prompts = {e.base_ids for e in examples} | {e.source_ids for e in examples}
    return sorted(prompts, key=lambda p: (len(p), p))


def estimate_bytes(examples: Iterable[Any], num_states: int, hidden_size: int, itemsize: int = 4) -> int:
    """Host bytes of the cache for encoded examples: every distinct prompt's states (`num_states` per
    token: n+1, or 1 for a `layer` cache; `itemsize` bytes each: the target's compute dtype)."""
    return sum(len(p) for p in distinct_prompts(examples)) * num_states * hidden_size * itemsize


class CleanStateCache:
    """Clean hidden states per prompt, computed once with the frozen target and reused.

    Args:
      graphdef, state: the frozen target split by `nnx.split` (as `train.Steps` holds it).
      limit_bytes: refuse to grow past this many bytes (the caller sized it from `estimate_bytes`);
        prompts beyond it are computed for their batch and not kept.
      layer: keep only hs[layer], computed by blocks [0, layer) alone, and attach it under
        `LAYER_STATE_KEYS`; None keeps every hs[0..n] under `STATE_KEYS`.
      keys: which id arrays to serve, under which batch key (default: as `layer` says).
      instruction_layer: also keep hs[instruction_layer] of each distinct instruction (`instructions`,
        a cache of its own, outside `limit_bytes`) and attach it under `INSTRUCTION_STATE_KEYS`.
    """

    def __init__(self, graphdef, state, limit_bytes: int | None = None, layer: int | None = None,
                 keys: dict[str, str] | None = None, instruction_layer: int | None = None):
        self._target_state = state
        self._mesh = jax.tree.leaves(state)[0].sharding.mesh
        self.layer = layer
        self.keys = keys or (STATE_KEYS if layer is None else LAYER_STATE_KEYS)
        self.instructions = None if instruction_layer is None else CleanStateCache(
            graphdef, state, None, instruction_layer, keys=INSTRUCTION_STATE_KEYS)
        if layer is None:
            self._fn = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state).hidden_states(ids, mask))
        else:
            n = nnx.merge(graphdef, state).config.num_hidden_layers
            if not 0 <= layer <= n:
                raise ValueError(f"layer must be in [0, {n}], got {layer}")
            self._fn = jax.jit(
                lambda state, ids, mask: nnx.merge(graphdef, state).residual_stream(ids, mask, layer)[None])
        self._store: dict[bytes, np.ndarray] = {}
        self.limit_bytes = limit_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    def _store_missing(self, ids: np.ndarray, mask: np.ndarray, keys: list[bytes]) -> dict[bytes, np.ndarray]:
        """Runs the target once over a left-padded batch if any row is missing; returns those rows' entries
        (n+1, n_real, d) and keeps them while the byte limit allows."""
        fresh: dict[bytes, np.ndarray] = {}
        missing = {}  # key -> its first row (a batch may hold one prompt twice, e.g. filler rows)
        for i, k in enumerate(keys):
            if k not in self._store:
                missing.setdefault(k, i)
        if not missing:
            return fresh
        with use_mesh(self._mesh):
            computed = np.asarray(self._fn(self._target_state, ids, mask))  # (n+1, b, t, d)
        t = ids.shape[1]
        for i in missing.values():
            entry = np.ascontiguousarray(computed[:, i, t - int((mask[i] > 0).sum()):])
            self.misses += 1
            fresh[keys[i]] = entry
            if self.limit_bytes is None or self.nbytes + entry.nbytes <= self.limit_bytes:
                self._store[keys[i]] = entry
                self.nbytes += entry.nbytes
        return fresh

    def _states(self, ids: np.ndarray, mask: np.ndarray, last: bool = False) -> np.ndarray:
        """(b, n+1, t, d) states of a left-padded id array, zeros at pads; (b, t, d) with `layer` or `last`
        (the last stored state only)."""
        ids, mask = np.asarray(ids), np.asarray(mask)
        keys = [row[m > 0].astype(np.int32).tobytes() for row, m in zip(ids, mask)]
        fresh = self._store_missing(ids, mask, keys)
        self.hits += len(keys) - len(fresh)
        b, t = ids.shape
        out = None
        for i, key in enumerate(keys):
            entry = fresh.get(key)
            if entry is None:
                entry = self._store[key]
            if last:
                entry = entry[-1:]
            if out is None:
                out = np.zeros((b, entry.shape[0], t, entry.shape[-1]), entry.dtype)
            out[i, :, t - entry.shape[1]:] = entry
        return out[:, 0] if self.layer is not None or last else out

    def final_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(b, t, d): hs[n], the final RMSNorm's output, of a left-padded id array (zeros at pads): all the
        do-nothing baseline needs besides the LM head. Full caches only (a `layer` cache has no hs[n])."""
        if self.layer is not None:
            raise ValueError(f"this cache keeps hs[{self.layer}] only, not the final states")
        return self._states(ids, mask, last=True)

    def fill(self, prompts: Sequence[Sequence[int]], *, batch_size: int = 32, progress: bool = True) -> None:
        """Computes the states of `prompts` now, in their order, `batch_size` at a time.

        The order fixes which prompts share a pass, so the stored states (equal to a lone pass up
        to float rounding) are the same in every run over the same rows, resumed or not.
        """
        from tqdm import tqdm

        from hyperdas_jax.data.collate import bucket_length

        todo = [p for p in prompts if np.asarray(p, np.int32).tobytes() not in self._store]
        for start in tqdm(range(0, len(todo), batch_size), desc="clean states", unit="batch",
                          disable=not progress or not todo):
            chunk = todo[start:start + batch_size]
            longest = max(len(p) for p in chunk)
            width = bucket_length(longest, _BUCKETS) if longest <= _BUCKETS[-1] else longest
            ids = np.zeros((len(chunk), width), np.int32)
            mask = np.zeros((len(chunk), width), np.int32)
            for i, p in enumerate(chunk):
                ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
            self._store_missing(ids, mask, [np.asarray(p, np.int32).tobytes() for p in chunk])

    def attach(self, batch: dict) -> dict:
        """The batch with `base_states` and `source_states` (or with `layer`, `base_layer_states` and
        `source_layer_states`; with `instruction_layer` also `editor_layer_states`) added (host numpy arrays)."""
        out = dict(batch)
        for ids_key, states_key in self.keys.items():
            out[states_key] = self._states(batch[ids_key], batch[_MASKS[ids_key]])
        return out if self.instructions is None else self.instructions.attach(out)


def make_cache(steps, examples: Iterable[Any] | None, *, what: str = "training", progress: bool = True,
               layer: int | None = None) -> CleanStateCache | None:
    """The cache `steps.cfg.train.state_cache` asks for, or None.

    "never": None. "always": a cache (refused with several processes: each would hold only its own
    rows' states). "auto": a cache when one process runs, the examples are known and their
    estimate fits in `train.state_cache_gb`; otherwise None (the step recomputes the clean
    passes). The estimate and the decision are printed.

    Args:
      steps: the run's `train.Steps` (its config, target graph and state).
      examples: the encoded examples the cache will serve (`collate.EncodedExample`), or None.
      what: how the printed line names them.
      progress: show a progress bar while the cache is filled (up front, in a fixed order).
      layer: cache only hs[layer] (see `CleanStateCache`).
    """
    t = steps.cfg.train
    if t.state_cache == "never":
        return None
    multi = jax.process_count() > 1
    if t.state_cache == "always" and multi:
        raise ValueError("train.state_cache=always needs a single process; use auto or never on a multi-host mesh")
    limit = int(t.state_cache_gb * 2**30)
    # HyperDAS with the anchor prior also reads the target's hs[A] of each instruction (A: its anchor layer).
    iv = steps.cfg.intervention
    instruction_layer = iv.anchor_states_layer if layer is None and iv.anchor_prior else None
    if examples is None or multi:
        if t.state_cache == "auto":
            return None
        return CleanStateCache(steps.target_graphdef, steps.target_state, limit, layer,
                               instruction_layer=instruction_layer)
    cfg = nnx.merge(steps.target_graphdef, steps.target_state).config
    examples = list(examples)
    itemsize = np.dtype(jnp.dtype(cfg.dtype)).itemsize  # states are kept in the target's compute dtype
    need = estimate_bytes(examples, cfg.num_hidden_layers + 1 if layer is None else 1, cfg.hidden_size, itemsize)
    instructions = sorted({e.editor_ids for e in examples}, key=lambda p: (len(p), p)) \
        if instruction_layer is not None else []
    need += sum(len(p) for p in instructions) * cfg.hidden_size * itemsize
    on = t.state_cache == "always" or need <= limit
    print(f"clean-state cache for {what}: {need / 2**30:.2f} GiB estimated (limit {t.state_cache_gb:g} GiB): "
          f"{'on' if on else 'off, the step recomputes the clean passes'}", file=sys.stderr)
    if not on:
        return None
    cache = CleanStateCache(steps.target_graphdef, steps.target_state, None if t.state_cache == "always" else limit,
                            layer, instruction_layer=instruction_layer)
    start = time.perf_counter()
    prompts = distinct_prompts(examples)
    cache.fill(prompts, progress=progress)
    if cache.instructions is not None:
        cache.instructions.fill(instructions, progress=progress)
    kept = cache.nbytes + (cache.instructions.nbytes if cache.instructions is not None else 0)
    held = f"{len(prompts)} prompts" + (f" and {len(instructions)} instructions" if instructions else "")
    print(f"clean-state cache for {what}: {held}, {kept / 2**30:.2f} GiB in "
          f"{time.perf_counter() - start:.0f}s", file=sys.stderr)
    return cache
