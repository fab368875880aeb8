"""The HyperDAS training loop: mesh, models, a deterministic data order, periodic eval, checkpoints, metrics.

Run directory: `<run>/config.json` (the resolved config), `<run>/checkpoints/` (Orbax, see
checkpoint.py), `<run>/metrics.jsonl` (one JSON object per log, eval or preemption event).

Determinism: batch `p` of the run is a pure function of (data, seed, p), and the step-`s` RNG is
fold_in(key(seed), s); a checkpoint stores the step and the data position, so a resumed run
continues bit for bit where the interrupted one stopped (on the same mesh and devices).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import signal
import sys
import time
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from flax import nnx

from hyperdas_jax.checkpoint import CheckpointError, RunCheckpoints, abstract_like, target_tokenizer
from hyperdas_jax.clean_states import make_cache
from hyperdas_jax.config import ConfigError, ExperimentConfig, check_fits_target, from_dict, to_dict
from hyperdas_jax.models.hyperdas import HyperDAS, build_hyperdas
from hyperdas_jax.sharding import (
    abstract_module,
    mesh_from_config,
    shard_batch,
    use_mesh,
)
from hyperdas_jax.target import build_target, read_model_config, target_model_config
from hyperdas_jax.train import Steps, label_window, make_optimizer

IGNORE = -100
# Config fields that may change when a run is resumed; anything else must match the checkpoint.
# train.steps may grow to extend a run (the schedules tied to it, sparsity warm-up and temperature, stretch).
RESUMABLE_CHANGES = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.state_cache", "eval.", "data.validation", "data.test", "mesh.",
                     "name")


# --------------------------------------------------------------------------------------------
# Models


def abstract_hyperdas(target_cfg, cfg: ExperimentConfig, mesh):
    """(graphdef, abstract sharded state) of the HyperDAS model for a target of ModelConfig `target_cfg`,
    nothing allocated (restore target)."""
    return abstract_module(lambda: HyperDAS(target_cfg, cfg, rngs=nnx.Rngs(0)), mesh)


# --------------------------------------------------------------------------------------------
# Data: every source maps a global position to a batch, so the order is reproducible on resume


class ShuffledRows:
    """Encoded RAVEL rows in a fresh seeded permutation per epoch; full batches only (training)."""

    def __init__(self, encoded, options, seed: int):
        from hyperdas_jax.data.collate import collate_batch

        self.encoded, self.options, self.seed = encoded, options, seed
        self.per_epoch = len(encoded.examples) // options.batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{len(encoded.examples)} training examples make no full batch of {options.batch_size}")
        self._collate = collate_batch
        self._epoch, self._order = -1, None

    def batch(self, position: int) -> dict[str, np.ndarray]:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, epoch]).permutation(len(self.encoded.examples))
        b = self.options.batch_size
        chunk = self._order[index * b:(index + 1) * b]
        return self._collate([self.encoded.examples[j] for j in chunk], self.options, self.encoded.pad_id)


class SyntheticBatches:
    """Random collated batches for a random target (smoke runs, tests); batch p depends on (seed, p) only.

    Rows look like RAVEL's: editor = BOS + instruction; base = BOS + prefix + suffix + answer with
    labels on the answer; source = BOS + prefix + suffix; the prefixes are intervention-visible.
    """

    def __init__(self, batch_size: int, vocab_size: int, seed: int, *, editor_len: int = 12, length: int = 16):
        self.b, self.vocab, self.seed, self.te, self.t = batch_size, vocab_size, seed, editor_len, length

    def batch(self, position: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, position])
        b, t, te = self.b, self.t, self.te
        ids = lambda *shape: rng.integers(3, self.vocab, shape).astype(np.int32)  # noqa: E731
        n_e = rng.integers(4, te + 1, b)
        n_pre, n_suf, n_ans = rng.integers(3, t // 2, b), rng.integers(1, 4, b), rng.integers(1, 4, b)
        n_spre, n_ssuf = rng.integers(3, t // 2, b), rng.integers(1, 4, b)
        pos_e, pos = np.arange(te)[None], np.arange(t)[None]
        start_e, start_b, start_s = te - n_e[:, None], t - (1 + n_pre + n_suf + n_ans)[:, None], \
            t - (1 + n_spre + n_ssuf)[:, None]
        ans_from = t - n_ans[:, None]
        out = {
            "editor_ids": np.where(pos_e > start_e, ids(b, te), np.where(pos_e == start_e, 1, 0)).astype(np.int32),
            "editor_mask": (pos_e >= start_e).astype(np.int32),
            "base_ids": np.where(pos > start_b, ids(b, t), np.where(pos == start_b, 1, 0)).astype(np.int32),
            "base_mask": (pos >= start_b).astype(np.int32),
            "base_intervention_mask": ((pos >= start_b) & (pos <= start_b + n_pre[:, None])).astype(np.int32),
            "source_ids": np.where(pos > start_s, ids(b, t), np.where(pos == start_s, 1, 0)).astype(np.int32),
            "source_mask": (pos >= start_s).astype(np.int32),
            "source_intervention_mask": ((pos >= start_s) & (pos <= start_s + n_spre[:, None])).astype(np.int32),
            "base_entity_pos": (start_b[:, 0] + n_pre).astype(np.int32),
            "source_entity_pos": (start_s[:, 0] + n_spre).astype(np.int32),
            "base_anchor_pos": (start_e[:, 0] + 1).astype(np.int32),  # n_e >= 4: BOS + at least 3 tokens
            "source_anchor_pos": (start_e[:, 0] + 2).astype(np.int32),
            "is_causal": np.arange(b) % 2 == 0,
            "valid": np.ones(b, bool),
        }
        out["labels"] = np.where(pos >= ans_from, out["base_ids"], IGNORE).astype(np.int32)
        return out


class _Cycle:
    def __init__(self, items: Sequence[Mapping[str, np.ndarray]]):
        if not items:
            raise ValueError("no batches given")
        self.items = items

    def batch(self, position: int):
        return self.items[position % len(self.items)]


class _Stream:
    """A one-pass iterable; on resume the first `position` batches are skipped."""

    def __init__(self, iterable: Iterable):
        self.it, self.next = iter(iterable), 0

    def batch(self, position: int):
        if position < self.next:
            raise ValueError("an iterable batch source cannot go back; pass a sequence or a BatchSource")
        while True:
            try:
                item = next(self.it)
            except StopIteration:
                raise ValueError(f"the batch iterable ran out at position {self.next}") from None
            self.next += 1
            if self.next > position:
                return item


def as_source(batches):
    """Anything with `.batch(position)`, a sequence (cycled), a callable position -> batch, or an iterable."""
    if hasattr(batches, "batch"):
        return batches
    if isinstance(batches, Sequence):
        return _Cycle(batches)
    if callable(batches):
        return type("_Fn", (), {"batch": staticmethod(batches)})()
    return _Stream(batches)


def collate_options(cfg: ExperimentConfig, batch_size: int):
    from hyperdas_jax.data.collate import CollateOptions

    return CollateOptions(batch_size=batch_size, base_suffix_visible=cfg.data.base_suffix_visible,
                          source_suffix_visible=cfg.data.source_suffix_visible)


def training_source(cfg: ExperimentConfig, tokenizer, vocab_size: int):
    """The run's training batches: arrow rows from data.train, or synthetic ones for a random target."""
    if cfg.data.train is not None:
        from hyperdas_jax.data.collate import encode_rows
        from hyperdas_jax.data.ravel_store import load_rows

        if tokenizer is None:
            raise ValueError("data.train needs the target's tokenizer; a random target has none")
        options = collate_options(cfg, cfg.train.batch_size)
        return ShuffledRows(encode_rows(load_rows(cfg.data.train), tokenizer, options), options, cfg.train.seed)
    if cfg.target.random is None:
        raise ValueError("no training data: set data.train (an arrow folder from tools/prepare_ravel.py)")
    print("data.train is not set and the target is random: training on synthetic batches", file=sys.stderr)
    return SyntheticBatches(cfg.train.batch_size, vocab_size, cfg.train.seed)


def cached_examples(cfg: ExperimentConfig, source, tokenizer, eval_batches=None):
    """The encoded examples a run's clean-state cache serves (training rows, then validation rows),
    or None when they are not known up front (injected or synthetic batches)."""
    if not isinstance(source, ShuffledRows):
        return None
    examples = list(source.encoded.examples)
    if eval_batches is None and cfg.data.validation is not None:
        from hyperdas_jax.data.collate import encode_rows
        from hyperdas_jax.data.ravel_store import load_rows

        options = collate_options(cfg, cfg.eval.batch_size)
        examples += encode_rows(load_rows(cfg.data.validation), tokenizer, options).examples
    return examples


# --------------------------------------------------------------------------------------------
# Evaluation


def _host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class ShardedMethod:
    """The evaluator's eval-step interface on the loop's live parameters, batches put on the mesh."""

    name = "hyperdas"

    def __init__(self, steps: Steps, params, mesh):
        self.steps, self.params, self.mesh = steps, params, mesh
        self.n_answer_tokens = steps.n_answer_tokens

    def eval_batch(self, batch, mode):
        out = self.steps.evaluate(self.params, shard_batch(self.steps.prepare(batch), self.mesh), mode,
                                  window=label_window(batch["labels"]))
        return {"correct": _host(out["correct"]), "selection": _host(out["selection"])}

    def eval_modes(self, batch, modes):
        outs = self.steps.evaluate_modes(self.params, shard_batch(self.steps.prepare(batch), self.mesh), modes,
                                         window=label_window(batch["labels"]))
        return {mode: {"correct": _host(out["correct"]), "selection": _host(out["selection"])}
                for mode, out in outs.items()}

    def baseline_batch(self, batch):
        out = self.steps.baseline(shard_batch(self.steps.prepare_baseline(batch), self.mesh),
                                  window=label_window(batch["labels"]))
        return {"correct": _host(out["correct"])}


def batch_accuracy(method, batches: Iterable[Mapping[str, np.ndarray]], modes: Sequence[str]) -> dict[str, float]:
    """Exact-match accuracy over the valid rows of `batches` per mode; "accuracy" is their mean over modes."""
    from hyperdas_jax.evaluate import mode_outputs

    hits, total = dict.fromkeys(modes, 0), 0
    for batch in batches:
        valid = np.asarray(batch["valid"], bool)
        for mode, got in mode_outputs(method, batch, modes).items():
            hits[mode] += int((np.asarray(got["correct"]).astype(bool) & valid).sum())
        total += int(valid.sum())
    out = {f"{mode}/accuracy": hits[mode] / max(total, 1) for mode in modes}
    out["accuracy"] = float(np.mean([out[f"{mode}/accuracy"] for mode in modes]))
    return out


def ravel_accuracy(method, rows, tokenizer, cfg: ExperimentConfig) -> dict[str, float]:
    """RAVEL scores and localisation through hyperdas_jax.evaluate. Keys: "<mode>/<cause|isolate|disentangle>",
    "<mode>/<localisation metric>", and "accuracy", the mean over `eval.modes` of the overall disentangle:
    the figure the "best" checkpoint is chosen by, so a run evaluated in soft and a hard mode keeps the
    step that does well in both."""
    from hyperdas_jax.evaluate import evaluate

    results = evaluate(method, rows, tokenizer, modes=cfg.eval.modes, baseline=False, progress=False,
                       collate_options=collate_options(cfg, cfg.eval.batch_size),
                       n_answer_tokens=cfg.eval.n_answer_tokens)
    out = {}
    for mode in cfg.eval.modes:
        scores = results["modes"][mode]
        overall = {**scores["overall"], **scores.get("localisation", {}).get("overall", {})}
        for key, value in overall.items():
            out[f"{mode}/{key}"] = float("nan") if value is None else value
    out["accuracy"] = float(np.mean([out[f"{mode}/disentangle"] for mode in cfg.eval.modes]))
    return out


def default_eval_fn(cfg: ExperimentConfig, tokenizer, vocab_size: int, eval_batches=None):
    """eval(method) -> metrics, from injected batches, data.validation rows, or synthetic batches; or None."""
    if eval_batches is not None:
        batches = list(eval_batches)
        return lambda method: batch_accuracy(method, batches, cfg.eval.modes)
    if cfg.data.validation is not None:
        from hyperdas_jax.data.ravel_store import load_rows

        rows = load_rows(cfg.data.validation)
        return lambda method: ravel_accuracy(method, rows, tokenizer, cfg)
    if cfg.target.random is not None and cfg.data.train is None:
        source = SyntheticBatches(cfg.eval.batch_size, vocab_size, cfg.train.seed + 1_000_003)
        batches = [source.batch(i) for i in range(2)]
        return lambda method: batch_accuracy(method, batches, cfg.eval.modes)
    return None


# --------------------------------------------------------------------------------------------
# Preemption


class StopFlag:
    """SIGTERM (preemption) or SIGINT (Ctrl-C) sets the flag; the loop saves and returns at the next
    step boundary. A second Ctrl-C interrupts at once (KeyboardInterrupt), as usual.

    With several processes a local flag could differ between hosts (and a save is collective), so
    there the decision comes from JAX's preemption sync point, agreed by all hosts.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = None  # the signal that asked to stop
        self._previous = {}

    def __enter__(self):
        if jax.process_count() == 1:
            with contextlib.suppress(ValueError):  # not the main thread: no handler, no flag
                for sig in self.SIGNALS:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.raised is not None:
            raise KeyboardInterrupt
        self.raised = signum

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    @property
    def interrupted(self) -> bool:
        """Whether the stop came from Ctrl-C (SIGINT) rather than a preemption."""
        return self.raised == signal.SIGINT

    def should_stop(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self.raised is not None
        from jax.experimental import multihost_utils

        return bool(multihost_utils.reached_preemption_sync_point(step))


# --------------------------------------------------------------------------------------------
# The loop


def json_safe(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record with NaN / infinite floats as null (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()}


def truncate_metrics(path: pathlib.Path, step: int) -> None:
    """Keeps metrics.jsonl's records up to `step` (where training continues from), so the steps a
    resumed run replays are not logged twice; a line cut short by a kill is dropped."""
    if path.is_file():
        replace_text(path, "".join(_lines_up_to(path, step)))


def _lines_up_to(path: pathlib.Path, step: int) -> list[str]:
    """metrics.jsonl's complete lines whose record is at or before `step` (a line cut short by a kill is dropped)."""
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or record.get("step", 0) <= step:
            kept.append(line + "\n")
    return kept


def copy_metrics(origin: pathlib.Path, path: pathlib.Path, step: int, record: dict) -> None:
    """Writes `path` as `origin`'s records up to `step` (none if it is missing) followed by `record`."""
    kept = _lines_up_to(origin, step) if origin.is_file() else []
    replace_text(path, "".join(kept) + json.dumps(record) + "\n")


def replace_text(path: pathlib.Path, text: str) -> None:
    """Writes `path` whole or not at all (a sibling temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class NonFiniteError(RuntimeError):
    """Training met a non-finite loss or gradient; nothing was saved from that step on."""

    def __init__(self, step: int, metrics: Mapping[str, float], last_good: int | None, run: pathlib.Path):
        self.step, self.metrics, self.last_good = step, dict(metrics), last_good
        shown = ", ".join(f"{k} {metrics[k]:g}" for k in ("loss", "grad_norm") if k in metrics)
        good = (f"the last good checkpoint is step {last_good} in {run / 'checkpoints'} "
                f"(tools/train.py --run {run} --resume {last_good})" if last_good is not None
                else "no checkpoint was saved")
        super().__init__(f"step {step}: the loss or gradient is not finite ({shown}); training stopped "
                         f"without saving it; {good}. A lower train.lr usually helps")


@dataclasses.dataclass
class RunResult:
    step: int
    status: str  # "finished", "preempted" (SIGTERM) or "interrupted" (Ctrl-C)
    metrics: dict[str, float]  # the last logged training metrics
    eval: dict[str, float] | None  # the last evaluation
    params: Any = None  # the final HyperDAS parameters (nnx.State)
    steps: Steps | None = None


def config_differences(stored: Mapping, current: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, name + ".")
        elif a != b:
            out.append(name)
    return out


def with_defaults(stored: Mapping) -> Mapping:
    """A stored config dict with the fields it lacks (it predates them) at their defaults; as stored if invalid."""
    try:
        return to_dict(from_dict(ExperimentConfig, dict(stored)))
    except ConfigError:
        return stored  # compared as stored: the differences name the fields


def check_resume_config(stored: Mapping, current: Mapping, where: str) -> None:
    """Refuses a resume whose config differs from the checkpoint's outside RESUMABLE_CHANGES.

    A field the stored config lacks (written by an older version, before the field existed) takes its
    default, which keeps the older behaviour.
    """
    stored = with_defaults(stored)
    bad = [k for k in config_differences(stored, current) if not k.startswith(RESUMABLE_CHANGES)]
    if bad:
        shown = ", ".join(f"{k} (checkpoint: {_get(stored, k)!r}, now: {_get(current, k)!r})" for k in bad[:6])
        raise CheckpointError(f"{where}: the config differs from the checkpoint's in {shown}; resume with "
                              "the stored config (tools/train.py --run DIR --resume without --config) "
                              "or start a new run")


def _get(tree, dotted):
    for k in dotted.split("."):
        tree = tree.get(k) if isinstance(tree, Mapping) else None
    return tree


class Branch(NamedTuple):
    """Where a new run starts: another run's checkpoint (see `train`'s `branch`)."""

    run: str | pathlib.Path
    step: str | int = "latest"  # "latest", "best" or a step number


def check_branch(branch: Branch, cfg: ExperimentConfig, target_cfg, mesh) -> tuple[int, list[str]]:
    """(the branch's start step, the config fields it changes); a clear error before anything is written.

    The model and optimizer trees of `cfg` must match the checkpoint's (names, shapes, dtypes): a
    branch changes how training goes on, never what is trained.
    """
    origin = pathlib.Path(branch.run)
    checkpoints = RunCheckpoints(origin / "checkpoints", read_only=True)
    try:
        step = checkpoints.resolve(branch.step)
        stored = checkpoints.read_meta(step)["config"]
        changed = config_differences(with_defaults(stored), to_dict(cfg))
        if step > cfg.train.steps:
            raise ConfigError(f"train.steps={cfg.train.steps} is below the branch point, step {step} of {origin}")
        params = abstract_like(nnx.split(nnx.merge(*abstract_hyperdas(target_cfg, cfg, mesh)), nnx.Param)[1])
        opt = jax.eval_shape(make_optimizer(cfg.train).init, params)
        try:
            checkpoints.check(step, params, opt)
        except CheckpointError as e:
            raise CheckpointError(f"{e}\na branch keeps the model and its optimizer state; it changes "
                                  f"{', '.join(changed) or 'nothing'}") from None
    finally:
        checkpoints.close()
    return step, changed


def train(cfg: ExperimentConfig, run_dir: str | pathlib.Path, *, resume: str | int | None = None,
          branch: Branch | None = None, batches=None, eval_batches=None,
          eval_fn: Callable[[Any], dict] | None = None, mesh=None, progress: bool = True,
          async_checkpoints: bool = True) -> RunResult:
    """Trains HyperDAS as `cfg` says, writing config, checkpoints and metrics under `run_dir`.

    Args:
      cfg: the resolved experiment config.
      run_dir: the run directory (created).
      resume: None (a fresh run; an existing checkpoint is an error), "latest" or a step number
        (continue from that checkpoint; none is an error), or "auto" (latest if there is one).
      branch: a run without checkpoints starts from this other run's checkpoint instead of from
        scratch: its parameters, optimizer state, step and data position, under `cfg`'s settings
        (which may differ from the checkpoint's anywhere that keeps the parameter and optimizer
        trees). The RNG follows `cfg.train.seed`, so a branch with the checkpoint's settings repeats
        the origin run bit for bit. The origin's metrics up to the branch step are copied, then a
        "branch" record naming the origin, the step and the changed fields. Ignored once the run
        has checkpoints of its own (a resumed branch continues itself).
      batches: training batches instead of data.train: a sequence (cycled), a callable
        position -> batch, an object with `.batch(position)`, or an iterable.
      eval_batches: evaluation batches instead of data.validation.
      eval_fn: method -> metrics dict with an "accuracy" entry, replacing the default evaluation.
      mesh: the device mesh (default: from cfg.mesh).
      progress: show a progress bar.
      async_checkpoints: save checkpoints in the background.
    Returns:
      RunResult with the final step, "finished" or "preempted", and the last metrics.
    """
    run = pathlib.Path(run_dir)
    # Settings that depend on the target's shape fail before anything is written.
    target_cfg = read_model_config(cfg.target.path) if cfg.target.path else target_model_config(cfg)
    check_fits_target(cfg, target_cfg)
    mesh = mesh if mesh is not None else mesh_from_config(cfg.mesh)
    lead = jax.process_index() == 0
    t = cfg.train
    own = run / "checkpoints"
    latest = None
    if own.is_dir():
        existing = RunCheckpoints(own, read_only=True)
        latest = existing.latest_step()
        existing.close()
    if resume is None and latest is not None:
        raise CheckpointError(f"{run} already holds checkpoints (latest step {latest}); pass --resume to "
                              "continue it or choose another --run")
    if resume == "auto":
        resume = "latest" if latest is not None else None
    branch_step, changed = None, []
    if branch is not None and resume is None:
        branch_step, changed = check_branch(branch, cfg, target_cfg, mesh)
    checkpoints = RunCheckpoints(own, keep=t.keep_checkpoints, async_save=async_checkpoints)
    start = checkpoints.resolve(resume) if resume is not None else None
    if start is not None:  # before building anything: a mismatched config fails fast
        stored = checkpoints.read_meta(start)["config"]
        check_resume_config(stored, to_dict(cfg), str(run / "checkpoints" / str(start)))
        if start > t.steps:
            raise ConfigError(f"train.steps={t.steps} is below the checkpoint's step {start}; resume with "
                              f"train.steps >= {start}")
        if lead and stored != to_dict(cfg):  # config.json describes the run as it continues
            replace_text(run / "config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
        if _get(stored, "train.steps") != t.steps and lead:
            verb = "extending" if t.steps > _get(stored, "train.steps") else "shortening"
            print(f"{verb} the run from train.steps={_get(stored, 'train.steps')} to {t.steps}: the sparsity, "
                  "temperature and learning-rate schedules follow the new length", file=sys.stderr)

    target = build_target(cfg, mesh)
    tokenizer = target_tokenizer(cfg)
    average_on = t.weight_average.start_ratio is not None
    average, count = None, 0  # the running mean of the weights (train.weight_average) and its sample count
    if start is None and branch_step is None:
        model = build_hyperdas(target, cfg, seed=t.seed + 1, mesh=mesh)
        steps = Steps(model, target, cfg)
        params, opt_state = steps.params, steps.init_opt_state(steps.params)
        step, position, base_key = 0, 0, jax.random.key(t.seed)
    else:
        graphdef, abstract = abstract_hyperdas(target.config, cfg, mesh)
        steps = Steps(nnx.merge(graphdef, abstract), target, cfg)
        abstract_opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    jax.eval_shape(steps.tx.init, steps.params), steps.opt_shardings)
        origin = checkpoints if start is not None else RunCheckpoints(pathlib.Path(branch.run) / "checkpoints",
                                                                      read_only=True)
        from_step = start if start is not None else branch_step
        params, opt_state, meta = origin.restore(from_step, abstract_like(steps.params), abstract_opt)
        steps.params = params
        step, position = meta["step"], meta["position"]
        if average_on and meta.get("average_count", 0) > 0:
            average = origin.restore_average(from_step, abstract_like(params))
            count = meta["average_count"]
        if start is not None:
            base_key = jax.random.wrap_key_data(np.asarray(meta["rng"], np.uint32))
        else:
            origin.close()
            base_key = jax.random.key(t.seed)  # the checkpoint's key when the seed is unchanged
    if start is None and lead:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
        if branch_step is not None:
            copy_metrics(pathlib.Path(branch.run) / "metrics.jsonl", run / "metrics.jsonl", branch_step,
                         {"event": "branch", "step": branch_step, "from": str(pathlib.Path(branch.run).absolute()),
                          "changed": changed})

    source = as_source(batches) if batches is not None else training_source(cfg, tokenizer, target.config.vocab_size)
    steps.cache = make_cache(steps, cached_examples(cfg, source, tokenizer, eval_batches), progress=progress and lead)
    if eval_fn is None:
        evaluator = default_eval_fn(cfg, tokenizer, target.config.vocab_size, eval_batches)
        eval_fn = None if evaluator is None else (lambda method: evaluator(method))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    step_key = jax.jit(lambda k, s: jax.random.fold_in(k, s), out_shardings=replicated)
    # mean + (x − mean) / n: with n = 1 a fresh copy of x (the parameters are donated to the next step).
    add_to_average = jax.jit(lambda mean, x, n: jax.tree.map(lambda m, p: m + (p - m) / n, mean, x),
                             out_shardings=steps.param_shardings)

    if lead:
        truncate_metrics(run / "metrics.jsonl", step)
    metrics_file = open(run / "metrics.jsonl", "a") if lead else None  # noqa: SIM115

    def log(record):
        if metrics_file is not None:
            metrics_file.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
            metrics_file.flush()

    def save(evaluation=None):
        meta = {"position": position, "rng": np.asarray(jax.random.key_data(base_key)).tolist(),
                "seed": t.seed, "config": to_dict(cfg), "average_count": count}
        checkpoints.save(step, params, opt_state, meta, metrics=evaluation, average=average)

    from tqdm import tqdm

    bar = tqdm(total=t.steps, initial=step, unit="step", disable=not (progress and lead), dynamic_ncols=True)
    last, evaluation, status = {}, None, "finished"
    seen, since = 0, time.perf_counter()
    try:
        with StopFlag() as stop, use_mesh(mesh):
            while step < t.steps and not stop.should_stop(step):
                host_batch = source.batch(position)
                window = label_window(host_batch["labels"])
                params, opt_state, out = steps.train(params, opt_state, shard_batch(steps.prepare(host_batch), mesh),
                                                     step, step_key(base_key, step), window=window)
                if not bool(out.pop("finite")):
                    stopped = {k: float(v) for k, v in out.items()}
                    log({"event": "nonfinite", "step": step + 1, **stopped})
                    checkpoints.wait()
                    raise NonFiniteError(step + 1, stopped, checkpoints.latest_step(), run)
                step, position = step + 1, position + 1
                if t.weight_average.samples(step, t.steps):
                    count += 1
                    average = add_to_average(params if average is None else average, params, np.float32(count))
                seen += int(np.asarray(host_batch["valid"]).sum())
                bar.update(1)
                if step % max(t.log_every, 1) == 0 or step == t.steps:
                    now = time.perf_counter()
                    last = {k: float(v) for k, v in out.items()}
                    last["examples_per_s"] = seen / max(now - since, 1e-9)
                    seen, since = 0, now
                    log({"event": "train", "step": step, **last})
                    bar.set_postfix(loss=f"{last['loss']:.4f}", ex_s=f"{last['examples_per_s']:.1f}")
                evaluated = None
                if eval_fn is not None and ((t.eval_every and step % t.eval_every == 0) or step == t.steps):
                    evaluated = {k: float(v) for k, v in eval_fn(ShardedMethod(
                        steps, params if average is None else average, mesh)).items()}
                    evaluation = evaluated
                    log({"event": "eval", "step": step, **evaluated})
                    bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in evaluated.items()))
                if evaluated is not None or step == t.steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    save(evaluated)
            if step < t.steps:  # preempted or interrupted: save where we are, then leave cleanly
                status = "interrupted" if stop.interrupted else "preempted"
                save()
                log({"event": status, "step": step})
                bar.write(f"{status}: saved step {step} in {run / 'checkpoints'}")
        checkpoints.wait()
    finally:
        bar.close()
        checkpoints.close()
        if metrics_file is not None:
            metrics_file.close()
    steps.params = params
    return RunResult(step, status, last, evaluation, params, steps)
