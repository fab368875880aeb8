"""Faults and bad inputs a user meets, driven through the CLIs: a one-line error (never a traceback),
the exit code, and what is left on disk. Converter faults are in test_convert.py."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from hyperdas_jax.checkpoint import CheckpointError, RunCheckpoints, load_trained_method
from hyperdas_jax.config import load_config, to_dict
from tools import generate
from tools import train as train_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["target.random.num_hidden_layers=2", "intervention.layer=1", "hypernet.num_layers=1",
         "train.batch_size=2", "eval.batch_size=2", "train.log_every=1", "eval.modes=[soft]"]
NOISE = ("Traceback", "Exception ignored", "RuntimeError", "absl")


def assert_one_error_line(stderr: str, match: str) -> None:
    """stderr ends in one `error: ...` line holding `match`, with no traceback or shutdown noise."""
    assert not [n for n in NOISE if n in stderr], stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and match in last, stderr


def strict_json_lines(path: pathlib.Path) -> list[dict]:
    """Every line of a JSONL file, parsed without Python's NaN / Infinity extensions."""
    def refuse(token):
        raise AssertionError(f"{path} holds the non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Config values that cannot work: refused when the config is loaded, nothing written


@pytest.mark.parametrize("override, match", [
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.lr=-1e-3", "train.lr must be > 0"),
    ("train.checkpoint_every=-1", "train.checkpoint_every must be >= 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("eval.batch_size=0", "eval.batch_size must be >= 1"),
    ("train.sparsity.warmup_ratio=1.5", "train.sparsity.warmup_ratio must be in [0, 1)"),
    ("train.sparsity.form=entropy", "train.sparsity.form must be 'mass' or 'log'"),
    ("train.lr_decay_ratio=-0.1", "train.lr_decay_ratio must be in [0, 1]"),
    ("train.straight_through.mode=groundtruth", "train.straight_through.mode must be null or one of"),
    ("train.straight_through.mode=bidding_argmax train.straight_through.share=0",
     "train.straight_through.share must be in (0, 1]"),
    ("train.straight_through.head_lr_scale=-1", "train.straight_through.head_lr_scale must be >= 0"),
    ("train.weight_average.start_ratio=1", "train.weight_average.start_ratio must be null or in [0, 1)"),
    ("train.weight_average.start_ratio=0.5 train.weight_average.every=0", "train.weight_average.every must be >= 1"),
    ("intervention.reflections=0", "intervention.reflections must be >= 1"),
    ("intervention.reflections=2 intervention.subspace=das",
     "intervention.reflections=2 needs intervention.subspace=reflect"),
    ("intervention.rank=65", "intervention.rank=65 exceeds the target's hidden size 64"),
    ("intervention.layer=9", "intervention.layer=9 must be below the target's 2 layers"),
    ("intervention.anchor_layer=2", "intervention.anchor_layer=2 must be below the target's 2 layers"),
    ("intervention.anchor_layer=-1", "intervention.anchor_layer must be >= 0 or null"),
    ("target.dtype=bf16", "target.dtype must be one of ('float32', 'bfloat16', 'float16', 'auto'), got 'bf16'"),
    ("target.param_dtype=auto", "target.param_dtype must be one of ('float32', 'bfloat16', 'float16') or null"),
    ("hypernet.dtype=half", "hypernet.dtype must be one of ('float32', 'bfloat16', 'float16', 'auto')"),
    ("hypernet.param_dtype=auto", "hypernet.param_dtype must be one of ('float32', 'bfloat16', 'float16')"),
])
def test_bad_config_values_are_one_line_errors_and_write_nothing(override, match, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["--config", "configs/tiny.yaml", "--run", str(run), "--no-progress"]
    code = train_cli.main(argv + [a for s in SMALL + override.split() for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 1
    assert_one_error_line(err, match)
    assert not run.exists()


def test_missing_target_path_fails_before_any_device_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tools.train", "--config", "configs/tiny.yaml", "--run", str(tmp_path / "run"),
         "--set", "target.random=null", "--set", f"target.path={tmp_path / 'no_target'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert_one_error_line(proc.stderr, "no_target is not a converted target")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# tools/train.py as a subprocess: NaN, Ctrl-C, extending a finished run, a damaged checkpoint


class Cli:
    def __init__(self, cache: pathlib.Path):
        self.env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1",
                        JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                        XLA_FLAGS="--xla_backend_optimization_level=0")

    def start(self, run, *sets, resume=False):
        cmd = [sys.executable, "-m", "tools.train", "--config", "configs/tiny.yaml", "--run", str(run),
               "--no-progress", *[a for s in SMALL + list(sets) for a in ("--set", s)]]
        cmd += ["--resume"] if resume else []
        return subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    @staticmethod
    def finish(proc, timeout=300):
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    return Cli(tmp_path_factory.mktemp("jax_cache"))


def logged_steps(run: pathlib.Path, event: str = "train") -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line being written
            continue
        if record.get("event") == event:
            out.append(record["step"])
    return out


def test_nonfinite_loss_stops_before_saving_and_names_the_last_good_checkpoint(cli, tmp_path):
    run = tmp_path / "run"
    code, out, err = cli.finish(cli.start(run, "train.lr=1e30", "train.steps=8", "train.checkpoint_every=1",
                                          "train.keep_checkpoints=1"))
    assert code == 1, out + err
    assert_one_error_line(err, "the loss or gradient is not finite")
    checkpoints = RunCheckpoints(run / "checkpoints", read_only=True)
    steps = checkpoints.all_steps()
    assert steps and f"the last good checkpoint is step {steps[-1]}" in err, err
    records = strict_json_lines(run / "metrics.jsonl")
    assert records[-1]["event"] == "nonfinite" and records[-1]["step"] == steps[-1] + 1
    assert all(r["loss"] is not None for r in records if r["event"] == "train")  # nothing non-finite was kept
    checkpoints.close()


def test_ctrl_c_saves_resume_extends_and_a_damaged_checkpoint_names_the_others(cli, tmp_path):
    run = tmp_path / "run"
    every = "train.checkpoint_every=2"
    # Far more steps than are reached: the interrupt lands mid-run however the two processes are scheduled.
    proc = cli.start(run, "train.steps=400", every)
    deadline = time.time() + 240
    while len(logged_steps(run)) < 3:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    code, out, err = cli.finish(proc)
    assert code == 130 and "interrupted at step" in out, out + err
    assert "Traceback" not in err, err
    saved = RunCheckpoints(run / "checkpoints", read_only=True).latest_step()
    assert 3 <= saved < 400 and strict_json_lines(run / "metrics.jsonl")[-1] == {"event": "interrupted", "step": saved}

    end = saved + 3
    code, out, err = cli.finish(cli.start(run, f"train.steps={end}", every, resume=True))
    assert code == 0 and f"finished at step {end}" in out and "shortening the run" in err, out + err
    code, out, err = cli.finish(cli.start(run, f"train.steps={end + 2}", every, resume=True))
    assert code == 0 and f"finished at step {end + 2}" in out and "extending the run" in err, out + err
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == end + 2
    assert logged_steps(run) == list(range(1, end + 3))  # the steps replayed after the interrupt are logged once

    # Damage the latest checkpoint's array files: resuming names the intact ones.
    kept = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert kept[-1] == end + 2 and len(kept) >= 2
    for f in (run / "checkpoints" / str(end + 2) / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    code, out, err = cli.finish(cli.start(run, f"train.steps={end + 4}", every, resume=True))
    assert code == 1
    assert_one_error_line(err, "corrupt or incomplete")
    assert f"--resume {kept[-2]}" in err, err


# --------------------------------------------------------------------------------------------
# Evaluation and generation


def test_eval_from_another_folder_says_how_to_name_the_target(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config("configs/smollm2_ravel.yaml", ["target.path=checkpoints/smollm2_elsewhere"])
    (run / "config.json").write_text(json.dumps(to_dict(cfg)))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="pass the target's folder \\(--target DIR\\)"):
        load_trained_method(run)


def test_generate_refuses_what_it_cannot_complete(smollm2_target_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--target", str(smollm2_target_dir), "--max-new-tokens", "-1", "Paris is in"])
    assert exit_info.value.code == 2 and "expected a positive integer" in capsys.readouterr().err
    assert generate.main(["--target", str(smollm2_target_dir), ""]) == 1
    assert_one_error_line(capsys.readouterr().err, "prompt 1 is empty")
    assert generate.main(["--target", str(smollm2_target_dir), "--max-new-tokens", "9000", "Paris is in"]) == 1
    assert_one_error_line(capsys.readouterr().err, "exceeds the model's context of 8192")
