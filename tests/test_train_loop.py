"""The training loop: deterministic data order, injected batches, and exact resume after kill -9 / SIGTERM."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from hyperdas_fixtures import make_batch
from hyperdas_jax.checkpoint import RunCheckpoints
from hyperdas_jax.config import load_config
from hyperdas_jax.data.collate import CollateOptions, EncodedExample, EncodedRows
from hyperdas_jax.loop import ShuffledRows, SyntheticBatches, as_source, train
from hyperdas_jax.sharding import make_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL = ["target.random.num_hidden_layers=2", "intervention.layer=1", "hypernet.num_layers=1"]
RUN = SMALL + ["train.steps=12", "train.checkpoint_every=3", "train.log_every=1", "eval.modes=[soft]",
               "train.keep_checkpoints=2"]


# --------------------------------------------------------------------------------------------
# Data order


def encoded_rows(n):
    ex = [EncodedExample(editor_ids=(1, 5 + i % 7), base_ids=(1, 4, 5, 9 + i % 5), base_prompt_len=3, base_n_suffix=1,
                         base_entity=1, source_ids=(1, 6 + i % 3, 7), source_n_suffix=1, source_entity=1,
                         is_causal=bool(i % 2), row_index=i) for i in range(n)]
    return EncodedRows(tuple(ex), {}, n, 0)


def test_data_order_is_a_pure_function_of_seed_and_position():
    options = CollateOptions(batch_size=4, length_buckets=(8,), editor_buckets=(4,))
    a, b = ShuffledRows(encoded_rows(10), options, seed=3), ShuffledRows(encoded_rows(10), options, seed=3)
    rows = lambda src, p: tuple(src.batch(p)["row_index"])  # noqa: E731
    first_epoch = [rows(a, p) for p in range(2)]  # 10 rows -> 2 full batches per epoch
    assert len(set(sum(first_epoch, ()))) == 8
    assert [rows(a, p) for p in (5, 1, 4)] == [rows(b, p) for p in (5, 1, 4)]  # random access = resume
    assert rows(a, 2) != rows(a, 0) or rows(a, 3) != rows(a, 1)  # a new permutation per epoch
    assert rows(ShuffledRows(encoded_rows(10), options, seed=4), 0) != rows(a, 0)

    synth = SyntheticBatches(4, 97, seed=1)
    for key, value in synth.batch(7).items():
        np.testing.assert_array_equal(value, SyntheticBatches(4, 97, seed=1).batch(7)[key])
    batch = synth.batch(0)
    labels = batch["labels"]
    assert ((labels != -100) <= (batch["base_mask"] > 0)).all() and ((labels != -100).sum(1) >= 1).all()
    assert (batch["base_intervention_mask"] <= batch["base_mask"]).all()
    assert (batch["base_ids"][np.arange(4), batch["base_mask"].argmax(1)] == 1).all()  # one BOS first

    stream = as_source(iter(range(100)))
    assert [stream.batch(p) for p in (3, 4, 9)] == [3, 4, 9]  # an iterable is skipped ahead on resume
    assert as_source([10, 11]).batch(5) == 11


# --------------------------------------------------------------------------------------------
# In process: injected batches


def test_loop_with_injected_batches(tmp_path):
    cfg = load_config("configs/tiny.yaml", SMALL + ["train.steps=3", "train.checkpoint_every=2", "train.log_every=2"])
    batches = [make_batch(np.random.default_rng(i)) for i in range(2)]
    seen = []

    def evaluate(method):  # the subprocess runs below cover the default evaluation
        seen.append(method.params)
        return {"accuracy": 0.25}

    result = train(cfg, tmp_path / "run", batches=iter(batches * 2), eval_fn=evaluate, progress=False,
                   mesh=make_mesh((1, 1, 1)))
    assert result.status == "finished" and result.step == 3 and result.eval == {"accuracy": 0.25}
    assert len(seen) == 1 and seen[0] is result.params
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["event"], r["step"]) for r in records] == [("train", 2), ("train", 3), ("eval", 3)]
    assert all(np.isfinite(r["loss"]) and r["examples_per_s"] > 0 for r in records if r["event"] == "train")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["steps"] == 3
    ckpt = RunCheckpoints(tmp_path / "run" / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2, 3] and ckpt.best_step() == 3


# --------------------------------------------------------------------------------------------
# tools/train.py as a subprocess: kill -9 and SIGTERM, then --resume


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Runs tools/train.py; programs are shared through a compilation cache so only the first run compiles."""
    cache = tmp_path_factory.mktemp("jax_cache")
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", JAX_COMPILATION_CACHE_DIR=str(cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               # LLVM optimisation is most of the CPU compile time; every run here uses the same setting.
               XLA_FLAGS="--xla_backend_optimization_level=0")

    def start(run, *extra):
        cmd = [sys.executable, "-m", "tools.train", "--config", "configs/tiny.yaml", "--run", str(run),
               "--no-progress", *[a for s in RUN for a in ("--set", s)], *extra]
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    return start


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def wait_for_step(proc, run, step, timeout=240):
    """Polls metrics.jsonl until `step` has been logged; returns the last logged step."""
    deadline = time.time() + timeout
    path = run / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists():
            steps = [r["step"] for r in read_jsonl(path)]
            if steps and steps[-1] >= step:
                return steps[-1]
        if proc.poll() is not None:
            raise AssertionError(f"training exited early:\n{proc.stdout.read()}")
        time.sleep(0.01)
    raise AssertionError("timed out waiting for training")


def final_state(run, step=12):
    path = run / "checkpoints" / str(step)
    return {name: jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path / name))
            for name in ("params", "opt_state")}


def assert_bit_identical(a, b):
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def read_jsonl(path):
    """The complete records (kill -9 can cut the last line of a file short)."""
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def train_losses(run):
    return {r["step"]: r["loss"] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "train"}


@pytest.fixture(scope="module")
def uninterrupted(cli, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    code, out = finish(cli(run))
    assert code == 0, out
    assert "finished at step 12" in out and "mesh: {'data': 1, 'fsdp': 1, 'tensor': 1}" in out
    return run


def test_kill9_and_sigterm_then_resume_is_bit_identical(cli, uninterrupted, tmp_path):
    """kill -9 at a random step, resume; SIGTERM at a later random step, resume; the end state is
    bit for bit the uninterrupted run's."""
    run = tmp_path / "run"
    rng = np.random.default_rng()
    kill_at, stop_at = int(rng.integers(4, 9)), int(rng.integers(9, 11))
    where = f"(kill -9 at step {kill_at}, SIGTERM at step {stop_at})"

    proc = cli(run)
    while not (run / "checkpoints" / "3").is_dir():  # the step-3 checkpoint has landed
        wait_for_step(proc, run, 3)
        time.sleep(0.01)
    killed = wait_for_step(proc, run, kill_at)
    proc.send_signal(signal.SIGKILL)
    code, _ = finish(proc)
    assert code == -signal.SIGKILL, f"the run ended before the kill {where}"
    resumed_from = RunCheckpoints(run / "checkpoints", read_only=True).latest_step()
    assert 3 <= resumed_from <= killed < 12, where

    proc = cli(run, "--resume")
    wait_for_step(proc, run, stop_at)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0 and "preempted at step" in out, out
    saved = RunCheckpoints(run / "checkpoints", read_only=True).latest_step()
    assert stop_at <= saved < 12, where
    events = read_jsonl(run / "metrics.jsonl")
    assert events[-1] == {"event": "preempted", "step": saved}

    code, out = finish(cli(run, "--resume"))
    assert code == 0 and "finished at step 12" in out, out
    assert_bit_identical(final_state(run), final_state(uninterrupted))
    # Every logged loss of the interrupted runs equals the uninterrupted run's at the same step.
    reference = train_losses(uninterrupted)
    assert all(r["loss"] == reference[r["step"]] for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "train")


# --------------------------------------------------------------------------------------------
# --branch-from: a new run from another run's checkpoint


def test_branch_with_the_same_settings_repeats_the_origin_bit_for_bit(cli, uninterrupted, tmp_path):
    run = tmp_path / "branch"
    before = sorted(p.name for p in (uninterrupted / "checkpoints").iterdir())
    code, out = finish(cli(run, "--branch-from", str(uninterrupted), "--branch-step", "9"))
    assert code == 0 and "finished at step 12" in out, out
    assert_bit_identical(final_state(run), final_state(uninterrupted))
    records = read_jsonl(run / "metrics.jsonl")
    origin = read_jsonl(uninterrupted / "metrics.jsonl")
    copied = [r for r in origin if r["step"] <= 9]
    assert records[:len(copied)] == copied  # the origin's curve up to the branch point
    assert records[len(copied)] == {"event": "branch", "step": 9, "from": str(uninterrupted.absolute()),
                                    "changed": []}
    untimed = lambda rs: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rs]  # noqa: E731
    assert untimed(records[len(copied) + 1:]) == untimed(r for r in origin if r["step"] > 9)
    assert RunCheckpoints(run / "checkpoints", read_only=True).all_steps() == [12]  # 9 and below stay the origin's
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir()) == before  # the origin is only read


def test_branch_with_a_new_setting_trains_on_from_the_checkpoint(cli, uninterrupted, tmp_path):
    run = tmp_path / "branch"
    code, out = finish(cli(run, "--branch-from", str(uninterrupted), "--branch-step", "9", "--set", "train.lr=1e-2"))
    assert code == 0 and "finished at step 12" in out, out
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 1e-2
    branch = [r for r in read_jsonl(run / "metrics.jsonl") if r["event"] == "branch"]
    assert branch == [{"event": "branch", "step": 9, "from": str(uninterrupted.absolute()), "changed": ["train.lr"]}]
    losses, reference = train_losses(run), train_losses(uninterrupted)
    assert losses[10] == reference[10]  # the step-10 loss is measured before its update, at the shared state
    assert losses[11] != reference[11] and losses[12] != reference[12]
    mine, theirs = final_state(run)["params"], final_state(uninterrupted)["params"]
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)))


def test_branch_refuses_another_model_and_writes_nothing(cli, uninterrupted, tmp_path):
    run = tmp_path / "branch"
    code, out = finish(cli(run, "--branch-from", str(uninterrupted), "--set", "hypernet.num_layers=2"))
    assert code == 1 and "a branch keeps the model and its optimizer state" in out, out
    assert "it changes hypernet.num_layers" in out and "params do not match" in out, out
    assert not run.exists()
    code, out = finish(cli(run, "--branch-from", str(uninterrupted), "--branch-step", "5"))
    assert code == 1 and "no checkpoint at step 5" in out, out
    assert not run.exists()
    code, out = finish(cli(uninterrupted, "--branch-from", str(uninterrupted)))  # into a run with checkpoints
    assert code == 1 and "already holds checkpoints (latest step 12)" in out, out
    assert "WARNING" not in out, out  # opening runs read-only is by design, not worth a warning


# --------------------------------------------------------------------------------------------
# train.weight_average: evaluations see the running mean of the weights; training is unchanged


def test_weight_average_is_the_mean_of_the_sampled_steps_and_resumes_exactly(tmp_path):
    from hyperdas_jax.checkpoint import load_trained_method, to_nested

    host = lambda params: jax.tree.map(np.asarray, to_nested(params))  # noqa: E731 - as final_state reads them

    batches = [make_batch(np.random.default_rng(i)) for i in range(3)]
    mesh = make_mesh((1, 1, 1))
    base = SMALL + ["train.steps=6", "train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=10"]
    averaged = ["train.weight_average.start_ratio=0.5", "train.weight_average.every=1", "train.eval_every=2"]

    reference = tmp_path / "reference"
    train(load_config("configs/tiny.yaml", base), reference, batches=batches, eval_fn=lambda m: {"accuracy": 0.0},
          progress=False, mesh=mesh)
    trained = {s: final_state(reference, s)["params"] for s in range(1, 7)}

    seen = []

    def evaluate(method):
        seen.append(host(method.params))
        return {"accuracy": 0.0}

    run = tmp_path / "averaged"
    result = train(load_config("configs/tiny.yaml", base + averaged), run, batches=batches, eval_fn=evaluate,
                   progress=False, mesh=mesh)
    assert_bit_identical(final_state(run, 6), final_state(reference, 6))  # training itself is unchanged
    assert_bit_identical(host(result.params), trained[6])
    mean = lambda steps: jax.tree.map(lambda *x: np.mean(x, axis=0), *[trained[s] for s in steps])  # noqa: E731
    # Samples at steps >= int(0.5 * 6) = 3: evaluation at step 2 sees the trained weights, at 4 and 6 the mean.
    for got, want in zip(seen, [trained[2], mean([3, 4]), mean([3, 4, 5, 6])]):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(jax.tree.leaves(seen[2])[0], jax.tree.leaves(trained[6])[0])
    method = load_trained_method(run, step=6)
    assert method.averaged == 4
    assert_bit_identical(host(method.params), seen[2])
    method = load_trained_method(run, step=6, weights="trained")
    assert method.averaged == 0
    assert_bit_identical(host(method.params), trained[6])
    assert load_trained_method(run, step=2).averaged == 0  # before the first sample: the trained weights

    # Resumed from the step-4 checkpoint (as after a kill): the same mean at step 6 as straight through.
    pieces = tmp_path / "pieces"
    shutil.copytree(run, pieces)
    for step in (5, 6):
        shutil.rmtree(pieces / "checkpoints" / str(step))
    assert RunCheckpoints(pieces / "checkpoints", read_only=True).read_meta(4)["average_count"] == 2
    train(load_config("configs/tiny.yaml", base + averaged), pieces, resume="latest", batches=batches,
          eval_fn=lambda m: {"accuracy": 0.0}, progress=False, mesh=mesh)
    got = load_trained_method(pieces, step=6)
    assert got.averaged == 4
    assert_bit_identical(host(got.params), seen[2])
