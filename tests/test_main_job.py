"""The quick main job end to end on the real SmolLM2: its report's numbers are the evaluator's."""

import json
import re

import pytest

from hyperdas_jax.config import to_dict
from hyperdas_jax.pipeline.main_job import report_rows
from tools import main_job

pytestmark = pytest.mark.slow


def test_quick_main_job_report_matches_the_evaluator(tmp_path, smollm2_target_dir):
    args = ["--quick", "--target", str(smollm2_target_dir), "--reports", str(tmp_path / "reports"),
            "--data", str(tmp_path / "data")]
    assert main_job.main(args) == 0
    run = tmp_path / "reports" / "quick"
    report = (run / "report.md").read_text()
    hyper = json.loads((run / "hyperdas" / "eval" / "results.json").read_text())
    mdas = json.loads((run / "mdas" / "eval" / "results.json").read_text())
    table = {}
    for line in report.splitlines():
        m = re.fullmatch(r"\| (.+?) \| ([0-9.-]+) \| ([0-9.-]+) \| ([0-9.-]+) \| \[([0-9.]+), ([0-9.]+)\] \|", line)
        if m:
            table[m.group(1)] = [None if x == "-" else float(x) for x in m.groups()[1:]]
    expected = report_rows(hyper, mdas)
    assert [label for label, _, _ in expected] == list(table)
    for label, overall, ci in expected:
        want = [None if overall[k] is None else round(100 * overall[k], 2) for k in ("cause", "isolate", "disentangle")]
        assert table[label] == want + [round(100 * ci[0], 2), round(100 * ci[1], 2)], label
        assert ci[0] <= overall["disentangle"] <= ci[1]
    assert "- HyperDAS soft − MDAS: " in report and "## Localisation" in report
    evals = [json.loads(line) for line in (run / "hyperdas" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert len(evals) >= 2 and all("soft/entity_share" in e and "bidding_argmax/disentangle" in e for e in evals)
    assert (run / "learning_curves.png").stat().st_size > 0
    assert list((run / "hyperdas" / "eval" / "heatmaps").glob("*.png"))
    # Under the default (strict) filter doing nothing never causes and always isolates.
    none = hyper["modes"]["no intervention"]["overall"]
    assert none["cause"] in (0.0, None) and none["isolate"] in (1.0, None)
    assert "| **total** |" in report and "Entities the target knows (city" in report
    # Rerunning skips every finished stage and rewrites the same report, wall times included.
    assert main_job.main(args) == 0
    assert (run / "report.md").read_text() == report


def test_main_job_refuses_to_reuse_a_stage_trained_with_other_settings(tmp_path, capsys):
    from hyperdas_jax.mdas import TRAIN_OVERRIDES
    from hyperdas_jax.pipeline import main_job as job

    target, data = tmp_path / "target", tmp_path / "data"
    args = ["--quick", "--target", str(target), "--reports", str(tmp_path / "reports"), "--data", str(data)]
    run = tmp_path / "reports" / "quick"
    cfg = job.experiment(data / "smollm2_city_quick", target, job.PRESETS["quick"]["hyperdas"])
    mdas_cfg = job.experiment(data / "smollm2_city_quick", target, [*TRAIN_OVERRIDES, *job.PRESETS["quick"]["mdas"]])
    for folder, settings in ((run / "hyperdas", cfg), (run / "mdas", mdas_cfg)):
        folder.mkdir(parents=True)
        changed = to_dict(settings)
        changed["train"]["iso_loss_weight"] = 9.0
        (folder / "config.json").write_text(json.dumps(changed))
    assert main_job.main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hyperdas holds a HyperDAS run made with other settings (train.iso_loss_weight)" in err
    (run / "hyperdas" / "config.json").write_text(json.dumps(to_dict(cfg)))  # the same settings pass
    assert main_job.main(args) == 1
    assert "mdas holds a MDAS run made with other settings (train.iso_loss_weight)" in capsys.readouterr().err
    assert not target.exists() and not data.exists()  # refused before any work


@pytest.mark.parametrize("overrides, averaged, expected, absent", [
    ([], 0, ["reflect subspace of rank 128, 32 reflections; selection logits + 4 x the instruction-anchor prior",
             "reflection-vector lr 4e-05",
             "sparsity weight ramp 0.15 -> 2 from step 250", "weights averaged every 50 steps from step 350",
             "straight-through bidding_argmax on 25% of each batch from step 350"],
     ["mean of the weights", "similarity prior"]),
    (["intervention.anchor_layer=10"], 0, ["+ 4 x the instruction-anchor prior at hs[10]"], []),
    (["intervention.anchor_layer=15"], 0, ["+ 4 x the instruction-anchor prior"], ["prior at hs["]),
    (["intervention.anchor_prior=0", "intervention.similarity_prior=0.5"], 0,
     ["32 reflections; selection logits + 0.5 x the similarity prior"], ["anchor"]),
    (["train.reflect_lr=1e-3", "train.sparsity.schedule=constant", "train.sparsity.start=0.25"], 0,
     ["reflection-vector lr 0.001", "sparsity weight constant 0.25"], ["->"]),
    (["train.sparsity.form=log"], 0, ["sparsity weight ramp 0.15 -> 2 from step 250 (log form)"], []),
    (["train.sparsity.schedule=linear"], 0, ["sparsity weight linear 0.15 -> 2 from step 250"], ["ramp"]),
    (["intervention.subspace=das", "intervention.reflections=1", "train.sparsity.enabled=false"], 0,
     ["das subspace of rank 128", "sparsity weight off"], ["reflection"]),
    (["train.straight_through.start_ratio=0.5", "train.straight_through.share=0.25"], 0,
     ["straight-through bidding_argmax on 25% of each batch from step 250"], ["selection-head lr x"]),
    (["train.straight_through.head_lr_scale=0.5"], 0, ["from step 350 (selection-head lr x0.5 from then)"], []),
    (["train.straight_through.mode=null"], 0, [], ["straight-through"]),
    # The shipped recipe's checkpoint at 450 holds the mean of the weights at 350, 400 and 450.
    ([], 3, ["with the mean of the weights at steps 350, 400, 450"], []),
    (["train.weight_average.start_ratio=null"], 0, [], ["averaged", "mean of the weights"]),
    # No sampled step within the run (12 steps, every 50): no averaging to report.
    (["train.steps=12"], 0, [], ["averaged", "mean of the weights"]),
    # A count the schedule cannot give (a run resumed with another schedule) is named as a count.
    (["train.weight_average.every=100"], 3, ["weights averaged every 100 steps from step 400",
                                             "with the mean of the weights at 3 steps"], []),
])
def test_report_settings_name_what_was_trained(tmp_path, overrides, averaged, expected, absent):
    from hyperdas_jax.mdas import TRAIN_OVERRIDES
    from hyperdas_jax.pipeline import main_job as job

    data = tmp_path / "data"
    # 500 steps, whatever the preset says: the expected step numbers below are fractions of it.
    cfg = job.experiment(data, tmp_path / "target", [*job.PRESETS["full"]["hyperdas"], "train.steps=500", *overrides])
    mdas_cfg = job.experiment(data, tmp_path / "target", [*TRAIN_OVERRIDES, *job.PRESETS["full"]["mdas"]])
    hyperdas_lines = "\n".join(job.settings_lines(cfg, mdas_cfg, step=450, averaged=averaged)[:2])
    for text in expected:
        assert text in hyperdas_lines
    for text in absent:
        assert text not in hyperdas_lines
    assert "scored: step 450" in hyperdas_lines


def test_main_job_gives_mdas_a_target_in_its_configs_dtype(tmp_path, monkeypatch, smollm2_target_dir):
    """MDAS trains on the target its config describes (a bfloat16 config once got a float32 target)."""
    import hyperdas_jax.data.ravel_store as store
    import hyperdas_jax.mdas as mdas
    from hyperdas_jax.pipeline import main_job as job

    class Reached(Exception):
        pass

    def train_mdas(model, cfg, rows, tokenizer, **kw):
        seen.update(model=model.config.dtype, config=cfg.target.dtype)
        raise Reached

    seen = {}
    real_experiment = job.experiment
    monkeypatch.setattr(job, "experiment", lambda data, target, overrides: real_experiment(
        data, target, [*overrides, "target.dtype=bfloat16"]))
    monkeypatch.setattr(job, "ensure_data", lambda *a: False)  # no data build: the stages before MDAS are stubs
    monkeypatch.setattr(job, "train_hyperdas", lambda cfg, run: (None, False))
    monkeypatch.setattr(job, "evaluate_method", lambda *a, **k: {})
    monkeypatch.setattr(store, "load_rows", lambda path: iter(()))
    monkeypatch.setattr(mdas, "train_mdas", train_mdas)
    with pytest.raises(Reached):
        job.run(quick=True, target=str(smollm2_target_dir), reports=str(tmp_path / "reports"),
                data=str(tmp_path / "data"))
    assert seen == {"model": "bfloat16", "config": "bfloat16"}


def test_main_job_screens_the_data_in_the_dtype_it_trains_in(tmp_path, monkeypatch, capsys):
    """Data screened by a float32 target is rebuilt for a bfloat16 run (whose target answers some base prompts
    differently), reused for a float32 one; a report from before the dtype was recorded counts as float32. Another
    share of held-out validation templates rebuilds it too."""
    from hyperdas_jax.data import build as build_module
    from hyperdas_jax.pipeline import main_job as job

    preset = job.PRESETS["quick"]
    built = []

    def build(options):
        built.append(options)
        (out / "report.json").write_text(json.dumps(
            {"attributes": options.attributes, "isolate_attributes": options.isolate_attributes,
             "n_train": options.n_train, "n_test": options.n_test,
             "validation_fraction": options.validation_fraction,
             "screen": {"n_entities": options.screen_entities}, "dtype": options.dtype}))

    monkeypatch.setattr(build_module, "build", build)
    out = tmp_path / "data"
    out.mkdir()
    assert job.ensure_data(tmp_path / "target", out, preset, "float32") is True
    assert [o.dtype for o in built] == ["float32"] and not built[0].overwrite
    stored = json.loads((out / "report.json").read_text())
    del stored["dtype"]  # a report written before the build recorded its dtype
    (out / "report.json").write_text(json.dumps(stored))
    assert job.ensure_data(tmp_path / "target", out, preset, "float32") is False
    assert job.ensure_data(tmp_path / "target", out, preset, "bfloat16") is True
    assert [o.dtype for o in built] == ["float32", "bfloat16"] and built[1].overwrite
    assert job.ensure_data(tmp_path / "target", out, preset, "bfloat16") is False
    assert len(built) == 2
    wider = {**preset, "validation_fraction": 0.25}  # another validation split: rebuilt with it
    assert job.ensure_data(tmp_path / "target", out, wider, "bfloat16") is True
    assert built[2].validation_fraction == 0.25 and built[2].overwrite
    assert job.ensure_data(tmp_path / "target", out, wider, "bfloat16") is False
    assert "was built with other settings; rebuilding it" in capsys.readouterr().out
