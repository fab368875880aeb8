"""Orbax checkpoints of a HyperDAS run: trainable params, optimizer state, step, data position, RNG, config.

Layout of `<run>/checkpoints/<step>/`: `params/` and `opt_state/` (Orbax PyTree items, stored as
nested dicts keyed by the tree paths, so the on-disk names read like the model), `meta/` (JSON:
step, data position, RNG key data, resolved config) and Orbax's own metadata. Orbax writes each
step under a temporary name and renames it when complete, so a half-written step is never listed.
Restoring takes abstract targets carrying shardings, so a checkpoint loads onto any mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import pathlib
import re
import shutil
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

FORMAT = 1
ITEMS = ("params", "opt_state", "meta")


class _QuietByDesign(logging.Filter):
    """Orbax warnings about what this module does on purpose: steps saved between evaluations carry
    no metrics, and a run is opened read-only to list or read its checkpoints."""

    EXPECTED = ("did not provide metrics", "read_only=True, setting save_interval_steps=0",
                "Given directory is read only")

    def filter(self, record):
        message = record.getMessage()
        return not any(text in message for text in self.EXPECTED)


class _OneLineSaveErrors(logging.Filter):
    """Orbax logs a failed background write once per thread involved, each with a traceback; the
    failure reaches the caller as one CheckpointError (RunCheckpoints.save / wait), so its log records
    keep their message and lose the traceback."""

    def filter(self, record):
        if record.levelno >= logging.ERROR and "orbax" in record.pathname:
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


logging.getLogger("absl").addFilter(_QuietByDesign())
logging.getLogger("absl").addFilter(_OneLineSaveErrors())


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message names the directory and the problem."""


# --------------------------------------------------------------------------------------------
# Trees <-> nested dicts (the on-disk form)


def _key_name(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _path(path) -> tuple[str, ...]:
    return tuple(_key_name(k) for k in path)


def to_nested(tree) -> dict:
    """{"a": {"b": leaf}} keyed by the names along each leaf's tree path (Variables' `value` included)."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        node = out
        *head, last = _path(path) or ("_",)
        for k in head:
            node = node.setdefault(k, {})
        node[last] = leaf
    return out


def from_nested(like, nested: dict):
    """The inverse of `to_nested`: a tree shaped like `like` with leaves taken from `nested`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for k in _path(path) or ("_",):
            node = node[k]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) for the leaves of `tree`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _flat_meta(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        shape, dtype = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
        out["/".join(_path(path))] = (tuple(shape) if shape is not None else None, str(np.dtype(dtype)) if dtype else None)
    return out


def _compare(stored: dict, wanted: dict, what: str, where: str) -> None:
    missing = sorted(set(wanted) - set(stored))
    extra = sorted(set(stored) - set(wanted))
    changed = [f"{k}: stored {stored[k][0]} {stored[k][1]}, expected {wanted[k][0]} {wanted[k][1]}"
               for k in sorted(set(stored) & set(wanted)) if stored[k] != wanted[k]]
    if missing or extra or changed:
        lines = ([f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in extra[:5]] + changed[:5])
        raise CheckpointError(
            f"{where}: {what} do not match this model ({len(missing)} missing, {len(extra)} unexpected, "
            f"{len(changed)} with another shape/dtype), e.g.\n  " + "\n  ".join(lines)
            + "\nwas the checkpoint written with a different config?")


def _first_line(error: Exception, limit: int = 160) -> str:
    """An exception's first line without the storage specs some Orbax / TensorStore errors append."""
    line = next((x.strip() for x in str(error).splitlines() if x.strip()), type(error).__name__)
    return line.split(" [source locations=")[0].split("; spec=")[0].split(" spec=")[0][:limit]


def _write_reason(error: Exception) -> str:
    """Why a write failed: the operating system's words where TensorStore quotes them ("No space left
    on device [os_error_code='28']" ends its message), the error's first line otherwise."""
    found = re.search(r"([^:]+) \[os_error_code='?(\d+)'?\]", str(error))
    return f"{found.group(1).strip()} (errno {found.group(2)})" if found else _first_line(error)


def _abandoned_read(unraisable) -> bool:
    """An unraisable error of a read that a failed Orbax restore abandoned: its coroutine, or its
    callback finding the restore's event loop closed."""
    error = unraisable.exc_value
    return asyncio.iscoroutine(unraisable.object) or (
        isinstance(error, RuntimeError) and "Event loop is closed" in str(error))


@contextlib.contextmanager
def _quiet_abandoned_reads():
    """A failed Orbax restore abandons its other reads; Python would print a traceback for each one
    ("Exception ignored in: <coroutine ...>", "RuntimeError: Event loop is closed") whenever they
    end, up to interpreter exit, and some end while the failing restore is still unwinding. Those,
    and only those, are dropped from the start of the read (and after a failure until exit), so the
    one-line CheckpointError is all a user sees."""
    previous = sys.unraisablehook
    sys.unraisablehook = lambda u: None if _abandoned_read(u) else previous(u)
    try:
        yield
    except Exception:
        gc.collect()
        raise
    sys.unraisablehook = previous


# --------------------------------------------------------------------------------------------
# The manager


class RunCheckpoints:
    """Orbax CheckpointManager for one run: async saves, keep the last `keep` plus the best by `metric`."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 2, metric: str = "accuracy",
                 async_save: bool = True, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        self.metric = metric
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoint directory at {self.directory}")
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=max(keep, 1)),
            # Steps saved without an evaluation carry no metrics and are not "best" candidates.
            policies.BestN(get_metric_fn=lambda m: float(m[metric]), n=1, keep_checkpoints_without_metrics=False),
        ])
        # best_fn only makes Orbax write the metrics next to a step; retention is the policy's.
        options = ocp.CheckpointManagerOptions(
            best_fn=lambda m: float(m[metric]), best_mode="max",
            preservation_policy=None if read_only else policy, enable_async_checkpointing=async_save,
            create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only)
        handlers = {"params": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(), "average": ocp.StandardCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)
        self._writing: int | None = None  # the step of the save in flight (asynchronous saves)
        self._failed = False

    # -- queries -------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the highest `metric`; None if no checkpoint was saved with an evaluation."""
        scored = [(m[self.metric], s) for s in self.all_steps()
                  if (m := self.manager.metrics(s)) is not None and self.metric in m]
        return max(scored)[1] if scored else None

    def resolve(self, step: str | int) -> int:
        """"latest", "best" or a step number -> an existing step; a clear error otherwise."""
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step == "latest":
            return steps[-1]
        if step == "best":
            best = self.best_step()
            if best is None:  # the run never evaluated (no validation data): say so, use the latest
                print(f"warning: no checkpoint in {self.directory} carries an evaluation '{self.metric}'; "
                      f"using the latest, step {steps[-1]}", file=sys.stderr)
                return steps[-1]
            return best
        try:
            step = int(step)
        except (TypeError, ValueError):
            raise CheckpointError(f"checkpoint step must be 'latest', 'best' or an integer, got {step!r}") from None
        if step not in steps:
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} (available: {steps})")
        return step

    # -- save / restore ------------------------------------------------------------------------

    def save(self, step: int, params, opt_state, meta: dict[str, Any], metrics: dict | None = None,
             average=None) -> None:
        """Starts an (asynchronous) save; the device->host copy is done before this returns, so the
        caller may donate `params`/`opt_state` to the next step straight away. `average`: the running
        mean of the weights (train.weight_average), a tree like `params`, or None."""
        meta = {"format": FORMAT, "step": int(step), **meta}
        items = dict(params=ocp.args.StandardSave(to_nested(params)),
                     opt_state=ocp.args.StandardSave(to_nested(opt_state)), meta=ocp.args.JsonSave(meta))
        if average is not None:
            items["average"] = ocp.args.StandardSave(to_nested(average))
        args = ocp.args.Composite(**items)
        if step in self.manager.all_steps():
            return
        metrics = None if metrics is None else {k: float(v) for k, v in metrics.items()}
        try:  # Orbax first waits for the previous save, whose failure surfaces here
            self.manager.save(step, args=args, metrics=metrics, force=True)
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types; the reason is what matters
            failed = self._writing if self._writing is not None and self._writing not in self.all_steps() else step
            raise self._write_failed(failed, e) from None
        self._writing = step

    def read_meta(self, step: int) -> dict:
        where = self.directory / str(step)
        try:
            with _quiet_abandoned_reads():
                meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - orbax raises many types; the message is what matters
            raise CheckpointError(f"{where}: cannot read the checkpoint's meta item ({type(e).__name__}: "
                                  f"{_first_line(e)}); it is corrupt or not a HyperDAS checkpoint. "
                                  f"{self._others(step)}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise CheckpointError(f"{where}: unknown checkpoint format {meta.get('format') if isinstance(meta, dict) else meta!r}")
        return meta

    def check(self, step: int, abstract_params, abstract_opt_state=None) -> dict:
        """The meta of `step` once its trees are known to match the abstract ones (names, shapes, dtypes).

        Reads metadata only, no arrays. Raises CheckpointError as `restore` does.
        """
        where = self.directory / str(step)
        if step not in self.all_steps():
            raise CheckpointError(f"{self.directory}: no checkpoint at step {step} (available: {self.all_steps()})")
        meta = self.read_meta(step)
        try:
            with _quiet_abandoned_reads():
                stored = self.manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{where}: cannot read the checkpoint metadata ({type(e).__name__}: "
                                  f"{_first_line(e)}); the checkpoint is corrupt or incomplete. "
                                  f"{self._others(step)}") from None
        items = {"params": abstract_params}
        if abstract_opt_state is not None:
            items["opt_state"] = abstract_opt_state
        for name, like in items.items():
            tree = stored.get(name) if hasattr(stored, "get") else getattr(stored, name, None)
            if tree is None:
                raise CheckpointError(f"{where}: item '{name}' is missing")
            _compare(_flat_meta(tree), _flat_meta(to_nested(like)), name, str(where))
        return meta

    def restore(self, step: int, abstract_params, abstract_opt_state=None) -> tuple[Any, Any, dict]:
        """(params, opt_state or None, meta) at `step`, placed as the abstract trees' shardings say.

        Raises:
          CheckpointError: the step is missing, its files are corrupt, or its trees do not match
            the abstract ones (names, shapes, dtypes).
        """
        where = self.directory / str(step)
        meta = self.check(step, abstract_params, abstract_opt_state)
        items = {"params": abstract_params}
        if abstract_opt_state is not None:
            items["opt_state"] = abstract_opt_state
        args = {name: ocp.args.StandardRestore(to_nested(like)) for name, like in items.items()}
        try:
            with _quiet_abandoned_reads():
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{where}: cannot restore the arrays ({type(e).__name__}: {_first_line(e)}); "
                                  f"the checkpoint is corrupt or incomplete. {self._others(step)}") from None
        params = from_nested(abstract_params, restored["params"])
        opt_state = from_nested(abstract_opt_state, restored["opt_state"]) if abstract_opt_state is not None else None
        return params, opt_state, meta

    def restore_average(self, step: int, abstract_params):
        """The running mean of the weights saved at `step` (a tree like `abstract_params`), or None if
        the step holds none."""
        where = self.directory / str(step)
        if not (where / "average").is_dir():
            return None
        with _quiet_abandoned_reads():
            stored = self.manager.item_metadata(step)
        tree = stored.get("average") if hasattr(stored, "get") else getattr(stored, "average", None)
        _compare(_flat_meta(tree), _flat_meta(to_nested(abstract_params)), "average", str(where))
        try:
            with _quiet_abandoned_reads():
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    average=ocp.args.StandardRestore(to_nested(abstract_params))))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{where}: cannot restore the weight average ({type(e).__name__}: "
                                  f"{_first_line(e)}); the checkpoint is corrupt or incomplete. "
                                  f"{self._others(step)}") from None
        return from_nested(abstract_params, restored["average"])

    def _others(self, step: int) -> str:
        """The hint naming the run's other checkpoints, which a damaged one leaves intact."""
        others = [s for s in self.all_steps() if s != step]
        if not others:
            return "No other checkpoint exists in this run."
        return (f"The other checkpoints ({', '.join(map(str, others))}) are separate; resume from one with "
                f"--resume {max(others)}, or delete {step}/ to make it the latest.")

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._write_failed(self._writing, e) from None

    def _write_failed(self, step: int | None, error: Exception) -> CheckpointError:
        """A save that could not be written (a full disk, a quota, permissions): its incomplete files are
        removed, the complete checkpoints stay, and the error says how to go on."""
        self._failed = True
        if step is not None and jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
        done = self.all_steps()
        kept = "no complete checkpoint exists yet" if not done else (
            f"the complete checkpoints ({', '.join(map(str, done))}) are intact; after freeing space continue with "
            "--resume latest (tools.train) or rerun the main job")
        which = "a checkpoint" if step is None else f"the checkpoint of step {step}"
        return CheckpointError(f"{self.directory}: could not write {which}: {_write_reason(error)}; its partial files "
                               f"were removed, {kept}")

    def close(self) -> None:
        try:
            self.manager.close()
        except Exception:  # noqa: BLE001 - the failed save was already reported by save() / wait()
            if not self._failed:
                raise


# --------------------------------------------------------------------------------------------
# Trained models for evaluation


def read_run_config(run_dir: str | pathlib.Path):
    """The resolved ExperimentConfig stored in `<run>/config.json`."""
    from hyperdas_jax.config import ConfigError, ExperimentConfig, from_dict

    file = pathlib.Path(run_dir) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{run_dir} is not a training run: config.json missing")
    try:
        return from_dict(ExperimentConfig, json.loads(file.read_text()))
    except (json.JSONDecodeError, ConfigError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def run_config(run_dir: str | pathlib.Path, config: str | None, overrides=(), *, resume: bool = False,
               branch_from: str | pathlib.Path | None = None):
    """The ExperimentConfig a training command asks for: the YAML `config` with `overrides`; without
    one, the stored config.json with `overrides` of the run when resuming it, else of `branch_from`'s
    run (ConfigError otherwise)."""
    from hyperdas_jax.config import ConfigError, ExperimentConfig, apply_overrides, from_dict, load_config, to_dict

    if config is not None:
        return load_config(config, overrides)
    stored_in = None
    if resume and (pathlib.Path(run_dir) / "config.json").is_file():
        stored_in = run_dir
    elif branch_from is not None:
        stored_in = branch_from
    if stored_in is None:
        raise ConfigError("give --config (or --resume on a run that has config.json, or --branch-from a run)")
    try:
        stored = read_run_config(stored_in)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    return from_dict(ExperimentConfig, apply_overrides(to_dict(stored), list(overrides)))


def target_tokenizer(cfg):
    """The HF tokenizer saved with a converted target (None for a random target or none saved)."""
    path = cfg.target.path
    if path is None:
        return None
    path = pathlib.Path(path)
    if not ((path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_trained_method(run_dir: str | pathlib.Path, *, mesh=None, step: str | int = "best",
                        target_path: str | pathlib.Path | None = None, weights: str = "average"):
    """A trained HyperDAS model ready for the evaluator.

    Args:
      run_dir: a run written by `hyperdas_jax.loop.train` (config.json + checkpoints/).
      mesh: where to place the target and the parameters (default: one device).
      step: "best" (highest eval accuracy), "latest", or a step number.
      target_path: the converted target to use instead of the run's `target.path` (e.g. when the
        run's relative path does not resolve from the current folder).
      weights: "average" (the running mean of train.weight_average where the checkpoint holds one,
        as the run's validation used it; else the trained weights) or "trained" (always the trained weights).
    Returns:
      A `TrainedMethod` (a `HyperDASMethod` with `.config`, `.step`, `.tokenizer`, the target's
      tokenizer or None for a random target, and `.averaged`, the number of checkpoints' weights in
      the mean used, 0 for the trained weights).
    """
    from flax import nnx

    from hyperdas_jax.target import CONFIG_FILE, build_target
    from hyperdas_jax.models.hyperdas import HyperDAS
    from hyperdas_jax.sharding import abstract_module, current_or_default_mesh
    from hyperdas_jax.train import HyperDASMethod, Steps

    class TrainedMethod(HyperDASMethod):
        def __init__(self, steps, params, *, config, step, tokenizer):
            super().__init__(steps, params)
            self.config, self.step, self.tokenizer = config, step, tokenizer

    if weights not in ("average", "trained"):
        raise ValueError(f"weights must be 'average' or 'trained', got {weights!r}")
    cfg = read_run_config(run_dir)
    if target_path is not None:
        cfg = dataclasses.replace(cfg, target=dataclasses.replace(cfg.target, path=str(target_path)))
    elif cfg.target.path is not None and not (pathlib.Path(cfg.target.path) / CONFIG_FILE).is_file():
        raise CheckpointError(f"the run's target {cfg.target.path!r} is not a converted target seen from "
                              f"{pathlib.Path.cwd()} (a relative path is read from the current folder); "
                              "run from the folder training ran in, or pass the target's folder (--target DIR)")
    mesh = current_or_default_mesh(mesh)
    checkpoints = RunCheckpoints(pathlib.Path(run_dir) / "checkpoints", read_only=True)
    resolved = checkpoints.resolve(step)
    target = build_target(cfg, mesh)
    graphdef, abstract = abstract_module(lambda: HyperDAS(target.config, cfg, rngs=nnx.Rngs(0)), mesh)
    params, _, meta = checkpoints.restore(resolved, abstract)
    if weights == "average" and meta.get("average_count", 0) > 0:
        params = checkpoints.restore_average(resolved, abstract)
    checkpoints.close()
    steps = Steps(nnx.merge(graphdef, params), target, cfg)
    method = TrainedMethod(steps, steps.params, config=cfg, step=resolved, tokenizer=target_tokenizer(cfg))
    method.averaged = meta.get("average_count", 0) if weights == "average" else 0
    return method
