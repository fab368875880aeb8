"""Orbax run checkpoints: exact round trip, other meshes, retention, and clear errors for bad checkpoints."""

import json
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from hyperdas_jax.checkpoint import CheckpointError, RunCheckpoints, load_trained_method
from hyperdas_jax.config import load_config, to_dict
from hyperdas_jax.loop import check_resume_config, target_model_config, train
from hyperdas_jax.models.hyperdas import HyperDAS
from hyperdas_jax.sharding import abstract_module, make_mesh
from hyperdas_jax.train import make_optimizer, opt_state_shardings

# Orbax reads arrays concurrently; when a read of the corrupt checkpoint fails, the other reads
# are abandoned unawaited and garbage-collected later, during whichever test runs then.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

OVERRIDES = ["target.random.num_hidden_layers=2", "intervention.layer=1", "hypernet.num_layers=1",
             "target.random.vocab_size=96"]


def abstract_state(cfg, mesh):
    """Abstract (sharded) HyperDAS params and optimizer state for `cfg` on `mesh`; nothing allocated."""
    _, params = abstract_module(lambda: HyperDAS(target_model_config(cfg), cfg, rngs=nnx.Rngs(0)), mesh)
    tx = make_optimizer(cfg.train)
    opt = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                       jax.eval_shape(tx.init, params), opt_state_shardings(tx, params))
    return params, opt


def random_like(abstract, seed):
    """Random values laid out as `abstract` says (host-drawn: no device program to compile)."""
    rng = np.random.default_rng(seed)

    def draw(a):
        value = rng.integers(1, 9, a.shape) if np.dtype(a.dtype).kind == "i" else rng.standard_normal(a.shape)
        return jax.device_put(np.asarray(value, a.dtype), a.sharding)

    return jax.tree.map(draw, abstract)


def assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with steps 1..4 saved (eval metrics at 2 and 4) from a one-device mesh."""
    cfg = load_config("configs/tiny.yaml", OVERRIDES)
    run = tmp_path_factory.mktemp("run")
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    abstract_params, abstract_opt = abstract_state(cfg, make_mesh((1, 1, 1)))
    ckpt = RunCheckpoints(run / "checkpoints", keep=1)
    states = {}
    for step in (1, 2, 3, 4):
        params, opt = random_like(abstract_params, step), random_like(abstract_opt, 10 + step)
        meta = {"position": step + 10, "rng": [0, step], "config": to_dict(cfg)}
        ckpt.save(step, params, opt, meta, metrics={2: {"accuracy": 0.75}, 4: {"accuracy": 0.5}}.get(step))
        states[step] = jax.tree.map(np.asarray, (params, opt))
    ckpt.wait()
    ckpt.close()
    return cfg, run, states


def test_round_trip_is_exact_and_retention_keeps_latest_plus_best(saved):
    cfg, run, states = saved
    ckpt = RunCheckpoints(run / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2, 4]  # keep=1 latest, plus the best evaluation (step 2)
    assert ckpt.best_step() == 2 and ckpt.resolve("best") == 2 and ckpt.resolve("latest") == 4
    params, opt, meta = ckpt.restore(4, *abstract_state(cfg, make_mesh((1, 1, 1))))
    assert_trees_equal((params, opt), states[4])
    assert jax.tree.structure(opt) == jax.tree.structure(states[4][1])
    assert meta["step"] == 4 and meta["position"] == 14 and meta["rng"] == [0, 4]
    assert meta["config"] == to_dict(cfg)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2)])
def test_restore_onto_another_mesh(saved, shape):
    cfg, run, states = saved
    mesh = make_mesh(shape)
    params, opt, _ = RunCheckpoints(run / "checkpoints", read_only=True).restore(2, *abstract_state(cfg, mesh))
    assert_trees_equal((params, opt), states[2])
    kernel = params["hypernet"]["layers"][0]["mlp"]["gate_proj"]["kernel"][...]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.sharding.spec == P("fsdp", "tensor")
    want = (64 // mesh.shape["fsdp"], 96 // mesh.shape["tensor"])
    assert {s.data.shape for s in kernel.addressable_shards} == {want}


def test_load_trained_method(saved):
    cfg, run, states = saved
    method = load_trained_method(run, step="best")
    assert method.step == 2 and method.tokenizer is None and method.config == cfg
    assert_trees_equal(method.params, states[2][0])
    with pytest.raises(CheckpointError, match="no checkpoint at step 3"):
        load_trained_method(run, step=3)


def test_eval_cli_scores_the_checkpoint_step_asked_for(saved, tmp_path, capsys):
    from tools import eval_ravel

    _, run, states = saved
    method = eval_ravel.load_method(str(run), step="4")  # what `--step 4` loads
    assert method.step == 4
    assert_trees_equal(method.params, states[4][0])
    # A step that was not kept: one clear line, exit 1, nothing written (before any data is read).
    out = tmp_path / "eval"
    for step, says in (("3", "no checkpoint at step 3 (available: [2, 4])"), ("first", "must be 'latest', 'best'")):
        argv = ["--run", str(run), "--data", str(tmp_path / "unread"), "--step", step, "--out", str(out), "--quiet"]
        assert eval_ravel.main(argv) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and says in err and "\n" not in err, err
        assert not out.exists()


def copy_run(saved, tmp_path):
    _, run, _ = saved
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def test_half_written_checkpoint_is_never_picked_up(saved, tmp_path):
    run = copy_run(saved, tmp_path)
    # What a save interrupted by kill -9 leaves: the step under Orbax's temporary name.
    shutil.copytree(run / "checkpoints" / "4", run / "checkpoints" / "9.orbax-checkpoint-tmp-1700000000")
    ckpt = RunCheckpoints(run / "checkpoints", read_only=True)
    assert ckpt.latest_step() == 4 and 9 not in ckpt.all_steps()


def test_corrupt_checkpoint_is_a_clear_error_never_a_fresh_start(saved, tmp_path):
    cfg, _, _ = saved
    abstract_params, _ = abstract_state(cfg, make_mesh((1, 1, 1)))
    run = copy_run(saved, tmp_path)
    for f in (run / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and "ocdbt" in str(f.relative_to(run)) and f.parent.name == "d":
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        RunCheckpoints(run / "checkpoints", read_only=True).restore(4, abstract_params)
    with pytest.raises(CheckpointError, match="corrupt"):
        train(cfg, run, resume="latest", batches=[{}], progress=False)
    shutil.rmtree(run / "checkpoints" / "2" / "meta")
    with pytest.raises(CheckpointError, match="meta"):
        RunCheckpoints(run / "checkpoints", read_only=True).restore(2, abstract_params)


def test_missing_checkpoint_is_a_clear_error(saved, tmp_path):
    cfg, _, _ = saved
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        train(cfg, tmp_path / "empty", resume="latest", batches=[{}], progress=False)
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        RunCheckpoints(tmp_path / "nowhere", read_only=True)
    with pytest.raises(CheckpointError, match="not a training run"):
        load_trained_method(tmp_path / "empty")
    run = copy_run(saved, tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint at step 7"):
        train(cfg, run, resume=7, batches=[{}], progress=False)
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        train(cfg, run, batches=[{}], progress=False)  # a fresh run must not overwrite an old one


def test_mismatched_checkpoint_is_a_clear_error(saved, tmp_path):
    cfg, run, _ = saved
    other = load_config("configs/tiny.yaml", OVERRIDES + ["intervention.rank=4", "hypernet.self_attention=original"])
    abstract_params, _ = abstract_state(other, make_mesh((1, 1, 1)))
    with pytest.raises(CheckpointError, match="(?s)params do not match this model.*reflectors.*: stored \\(64, 8\\)"):
        RunCheckpoints(run / "checkpoints", read_only=True).restore(4, abstract_params)
    with pytest.raises(CheckpointError, match="intervention.rank \\(checkpoint: 8, now: 4\\)"):
        check_resume_config(to_dict(cfg), to_dict(other), "here")
    with pytest.raises(CheckpointError, match="intervention.rank"):
        train(other, copy_run(saved, tmp_path), resume="latest", batches=[{}], progress=False)
    # Cadence and evaluation settings may change on resume.
    check_resume_config(to_dict(cfg), to_dict(load_config("configs/tiny.yaml", OVERRIDES + [
        "train.checkpoint_every=7", "eval.modes=[soft]", "mesh.shape=[1,8,1]"])), "here")
    # A checkpoint written before a field existed resumes: the missing field takes its default.
    older = to_dict(cfg)
    del older["intervention"]["self_positions"]
    check_resume_config(older, to_dict(cfg), "here")
    with pytest.raises(CheckpointError, match="intervention.self_positions \\(checkpoint: 'real', now: 'original'\\)"):
        check_resume_config(older, to_dict(load_config("configs/tiny.yaml", OVERRIDES + [
            "intervention.self_positions=original"])), "here")


def test_best_falls_back_to_latest_when_nothing_was_evaluated(saved, tmp_path, capsys):
    cfg, _, _ = saved
    params, opt = abstract_state(cfg, make_mesh((1, 1, 1)))
    ckpt = RunCheckpoints(tmp_path / "checkpoints", async_save=False)
    for step in (5, 6):
        ckpt.save(step, random_like(params, step), random_like(opt, step), {"position": step, "rng": [0, 0]})
    assert ckpt.best_step() is None and ckpt.resolve("best") == 6
    assert "carries an evaluation 'accuracy'; using the latest, step 6" in capsys.readouterr().err
    ckpt.close()


def test_abandoned_reads_are_quiet_while_a_restore_fails_and_after(monkeypatch):
    # TensorStore reports a read that finds the restore's event loop closed through sys.unraisablehook
    # (object None), sometimes while the failing restore is still unwinding: dropped then and afterwards.
    import types

    from hyperdas_jax.checkpoint import _quiet_abandoned_reads

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
    other = types.SimpleNamespace(exc_value=ValueError("a real problem"), object=None)
    with _quiet_abandoned_reads():  # a successful read: the user's hook comes back afterwards
        sys.unraisablehook(closed)
    assert seen == [] and sys.unraisablehook == seen.append
    with pytest.raises(OSError):
        with _quiet_abandoned_reads():
            sys.unraisablehook(closed)  # during the failure
            sys.unraisablehook(other)
            raise OSError("damaged")
    sys.unraisablehook(closed)  # after it
    assert seen == [other]


WRITE_FAILS = """
import resource, signal, sys
import numpy as np
from hyperdas_jax.checkpoint import RunCheckpoints
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write then fails with EFBIG, as a full disk fails
ckpt = RunCheckpoints(sys.argv[1], keep=2)
small = {"w": np.ones((8, 8), np.float32)}
ckpt.save(1, small, small, {"x": 1})
ckpt.wait()
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
large = {"w": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}  # 256 KiB, incompressible
try:
    ckpt.save(2, large, small, {"x": 2})
    ckpt.wait() if sys.argv[2] == "wait" else ckpt.save(3, large, small, {"x": 3})
finally:
    ckpt.close()
"""


@pytest.mark.parametrize("surfaces_in", ["wait", "save"])
def test_a_failed_write_is_one_clear_error_and_leaves_no_partial_step(tmp_path, surfaces_in):
    # The write fails in Orbax's background thread; the failure reaches the caller at the next wait()
    # or save() as one CheckpointError naming the step and the operating system's reason.
    import subprocess

    run = tmp_path / "checkpoints"
    done = subprocess.run([sys.executable, "-c", WRITE_FAILS, str(run), surfaces_in], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("hyperdas_jax.checkpoint.CheckpointError: ") and "step 2: File too large (errno 27)" in last
    assert "complete checkpoints (1) are intact" in last and "--resume latest" in last
    assert done.stderr.count("Traceback") == 1  # ours; Orbax's log records keep one line each
    assert sorted(p.name for p in run.iterdir()) == ["1"]  # the partial step 2 is gone, step 1 untouched
    ckpt = RunCheckpoints(run, read_only=True)
    assert ckpt.all_steps() == [1] and ckpt.read_meta(1)["x"] == 1
    ckpt.close()
