"""RAVEL evaluation and data preparation: evaluator counts, the real-target filter, and the two CLIs."""

import json
import pathlib
import shutil
import tarfile

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hyperdas_jax import evaluate as ev
from hyperdas_jax.data import build, collate, ravel_store
from hyperdas_jax.data.ravel_schema import instruction_attribute, is_causal

# ----------------------------------------------------------------------------- a hand-built prediction set

_WORDS = "<unk> <s> </s> <pad> is in of the a ; - x".split() + [f"e{i}" for i in range(40)] + [
    "Country", "Continent", "Past", "Tense", "Singular", "long"]


def _word_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _row(i, domain, instructed, queried, kind, prefix_words=1):
    base, source = f"e{i}", f"e{i + 20}"
    return {
        "input_prefix": " ".join(["long"] * (prefix_words - 1) + [base]),
        "input_suffix": " is in",
        "counterfactual_input_prefix": f"the {source}",
        "counterfactual_input_suffix": " of",
        "edit_instruction": f"{base} ; {source} - {instructed}",
        "entity": base,
        "counterfactual_entity": source,
        "target": "a",
        "counterfactual_target": "x",
        "attribute_type": kind,
        "domain": domain,
        "attribute": queried,
        "verify_text": "the",
    }


# (domain, instructed attribute, queried attribute, kind, verdicts in mode "soft")
_PLAN = [
    ("city", "Country", "Country", "causal", [1, 1, 1, 0]),
    ("city", "Country", "Continent", "isolate", [1, 0]),
    ("city", "Continent", "Continent", "causal", [1, 1]),
    ("city", "Continent", "Country", "isolate", [0, 1, 0, 0]),
    ("verb", "Past Tense", "Past Tense", "causal", [0]),
    ("verb", "Past Tense", "Singular", "isolate", [1, 1, 1]),
    ("verb", "Singular", "Singular", "causal", [1, 0]),
    ("verb", "Singular", "Past Tense", "isolate", [0]),
]


def _prediction_set():
    """19 scorable rows in a shuffled order plus one too long to collate; soft verdicts per row."""
    rows, soft = [], []
    for domain, instructed, queried, kind, verdicts in _PLAN:
        for v in verdicts:
            rows.append(_row(len(rows), domain, instructed, queried, kind))
            soft.append(v)
    order = np.random.default_rng(3).permutation(len(rows))
    rows, soft = [rows[j] for j in order], [soft[j] for j in order]
    rows.insert(7, _row(19, "city", "Country", "Country", "causal", prefix_words=30))  # dropped: base too long
    soft.insert(7, 1)
    return rows, np.array(soft, bool)


class FakeMethod:
    """Looks verdicts up by row index; filler rows answer True so counting them would show."""

    name = "fake"

    def __init__(self, rows, soft, n_answer_tokens=3, tokenizer=None):
        self.rows, self.soft, self.calls = rows, soft, []
        self.n_answer_tokens, self.tokenizer = n_answer_tokens, tokenizer
        self.causal = np.array([is_causal(r) for r in rows])

    def _lookup(self, batch, table):
        idx = batch["row_index"]
        return np.where(idx >= 0, table[np.maximum(idx, 0)], True)

    def eval_batch(self, batch, mode):
        self.calls.append((mode, batch["base_ids"].shape))
        b, tb = batch["base_ids"].shape
        ts = batch["source_ids"].shape[1]
        selection = np.zeros((b, ts + 1, tb), np.float32)
        selection[:, -1] = 1.0
        selection[:, -2, -3] = 0.75  # some weight on the last source token for the heatmaps
        table = self.soft if mode == "soft" else np.zeros(len(self.rows), bool)
        return {"correct": self._lookup(batch, table), "selection": selection}

    def baseline_batch(self, batch):
        self.calls.append(("baseline", batch["base_ids"].shape))
        return {"correct": self._lookup(batch, ~self.causal)}


def test_evaluator_counts_on_a_hand_built_prediction_set(tmp_path):
    rows, soft = _prediction_set()
    tok = _word_tokenizer()
    method = FakeMethod(rows, soft)
    options = collate.CollateOptions(batch_size=4, length_buckets=(8, 16))
    results = ev.evaluate(method, rows, tok, modes=("soft", "bidding_argmax"), collate_options=options,
                          n_answer_tokens=3, heatmap_dir=tmp_path / "maps", n_heatmaps=2, progress=False)

    assert results["num_rows"] == 20 and results["num_scored"] == 19
    assert results["dropped"] == {"base_too_long": 1}
    assert list(results["modes"]) == ["no intervention", "soft", "bidding_argmax"]
    # 19 rows in batches of 4: the last batch holds 3 real rows and 1 filler row.
    assert sum(1 for m, _ in method.calls if m == "soft") == 5

    soft_scores = results["modes"]["soft"]
    country = soft_scores["attributes"]["city/Country"]
    assert country == {"domain": "city", "attribute": "Country", "cause": 0.75, "isolate": 0.5,
                       "disentangle": 0.625, "n_causal": 4, "n_isolate": 2, "correct_causal": 3,
                       "correct_isolate": 1}
    expected = {  # (cause, isolate) per attribute
        "city/Continent": (1.0, 0.25), "verb/Past Tense": (0.0, 1.0), "verb/Singular": (0.5, 0.0)}
    for key, (cause, isolate) in expected.items():
        a = soft_scores["attributes"][key]
        assert (a["cause"], a["isolate"], a["disentangle"]) == (cause, isolate, (cause + isolate) / 2)
    assert soft_scores["domains"]["city"] == {"cause": 0.875, "isolate": 0.375, "disentangle": 0.625,
                                              "attributes": ["Continent", "Country"]}
    assert soft_scores["domains"]["verb"]["cause"] == 0.25 and soft_scores["domains"]["verb"]["isolate"] == 0.5
    assert soft_scores["overall"] == {"cause": 0.5625, "isolate": 0.4375, "disentangle": 0.5}
    assert soft_scores["pooled"] == {"cause": 6 / 9, "isolate": 0.5, "disentangle": (6 / 9 + 0.5) / 2,
                                     "n_causal": 9, "n_isolate": 10}
    assert results["modes"]["bidding_argmax"]["overall"] == {"cause": 0.0, "isolate": 0.0, "disentangle": 0.0}
    baseline = results["modes"]["no intervention"]
    for entry in [baseline["overall"], *baseline["domains"].values(), *baseline["attributes"].values()]:
        assert (entry["cause"], entry["isolate"], entry["disentangle"]) == (0.0, 1.0, 0.5)

    # Heatmaps: the first two scored rows, once per intervention mode.
    assert sorted(pathlib.Path(p).name for p in results["heatmaps"]) == [
        "bidding_argmax_row0.png", "bidding_argmax_row1.png", "soft_row0.png", "soft_row1.png"]
    assert all(pathlib.Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in results["heatmaps"])

    table = ev.results_markdown(results)
    assert "| no intervention | 0.00 | 100.00 | 50.00 |" in table
    assert "| soft | 56.25 | 43.75 | 50.00 |" in table
    assert table.index("| no intervention |") < table.index("| soft |")
    assert "| city/Country | soft | 75.00 | 50.00 | 62.50 | 4 | 2 |" in table
    json_path, md_path = ev.save_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text()) == results and md_path.read_text() == table


def test_evaluator_asks_for_every_mode_at_once_when_the_method_can(tmp_path):
    class AllAtOnce(FakeMethod):  # like HyperDAS: one hypernetwork pass serves every mode
        def eval_modes(self, batch, modes):
            self.calls.append((tuple(modes), batch["base_ids"].shape))
            return {mode: FakeMethod(self.rows, self.soft).eval_batch(batch, mode) for mode in modes}

    rows, soft = _prediction_set()
    options = collate.CollateOptions(batch_size=4, length_buckets=(8, 16))
    kw = dict(modes=("soft", "bidding_argmax"), collate_options=options, n_answer_tokens=3, progress=False)
    one_by_one = ev.evaluate(FakeMethod(rows, soft), rows, _word_tokenizer(), **kw)
    method = AllAtOnce(rows, soft)
    together = ev.evaluate(method, rows, _word_tokenizer(), **kw)
    assert together == one_by_one
    asked = [m for m, _ in method.calls]
    assert asked == ["baseline", ("soft", "bidding_argmax")] * 5  # one call per batch, never a mode alone

    class Forgetful(FakeMethod):
        def eval_modes(self, batch, modes):
            return {"soft": FakeMethod.eval_batch(self, batch, "soft")}

    with pytest.raises(ValueError, match="answered modes"):
        ev.evaluate(Forgetful(rows, soft), rows, _word_tokenizer(), **kw)
    with pytest.raises(ValueError, match="each mode is scored once"):
        ev.evaluate(FakeMethod(rows, soft), rows, _word_tokenizer(), **{**kw, "modes": ("soft", "soft")})


def test_evaluator_rejects_mismatched_answer_tokens():
    rows, soft = _prediction_set()
    with pytest.raises(ValueError, match="first 1 answer tokens"):
        ev.evaluate(FakeMethod(rows, soft, n_answer_tokens=1), rows, _word_tokenizer(), modes=("soft",),
                    n_answer_tokens=3, progress=False)


def test_methods_without_a_selection_get_no_heatmaps(tmp_path):
    class NoSelection(FakeMethod):  # like MDAS: a fixed-position patch, no A
        def eval_batch(self, batch, mode):
            return {**super().eval_batch(batch, mode), "selection": None}

    rows, soft = _prediction_set()
    options = collate.CollateOptions(batch_size=4, length_buckets=(8, 16))
    results = ev.evaluate(NoSelection(rows, soft), rows, _word_tokenizer(), modes=("soft",), collate_options=options,
                          heatmap_dir=tmp_path, progress=False)
    assert results["heatmaps"] == [] and results["modes"]["soft"]["overall"]["cause"] == 0.5625


def test_heatmap_axes_are_real_tokens_and_self():
    tok = _word_tokenizer()
    rows, soft = _prediction_set()
    opts = collate.CollateOptions(batch_size=2, length_buckets=(8, 16))
    batch = next(collate.iterate_batches(collate.encode_rows(rows[:1], tok, opts), opts))
    selection = FakeMethod(rows, soft).eval_batch(batch, "soft")["selection"][0]
    fields = {k: batch[k][0] for k in ("base_ids", "base_mask", "labels", "source_ids", "source_mask")}
    grid, x_labels, y_labels = ev.selection_grid(selection, fields, tok)
    base, source = rows[0]["entity"], rows[0]["counterfactual_entity"]
    assert x_labels == ["<s>", base, "is", "in"]  # the answer token and the pads are not drawn
    assert y_labels == ["<s>", "the", source, "of", "SELF"]
    expected = np.zeros((5, 4))
    expected[-1] = 1.0
    expected[3, 2] = 0.75  # source "of" -> base "is"
    np.testing.assert_array_equal(grid, expected)


def test_eval_cli_with_an_in_process_method(tmp_path, monkeypatch, capsys):
    from tools import eval_ravel

    rows, soft = _prediction_set()
    rows, soft = rows[:7] + rows[8:], np.r_[soft[:7], soft[8:]]  # without the long row: the CLI would keep it
    tok = _word_tokenizer()
    ravel_store.save_rows(rows, tmp_path / "test")
    method = FakeMethod(rows, soft, tokenizer=tok)
    method.step = 450  # what a trained run's method carries: the checkpoint it was restored from
    asked = []
    monkeypatch.setattr(eval_ravel, "load_method",
                        lambda run_dir, target=None, step="best", weights="average": asked.append(step) or method)
    out = tmp_path / "eval"
    argv = ["--run", "unused", "--data", str(tmp_path / "test"), "--modes", "soft", "--out", str(out),
            "--batch-size", "4", "--heatmaps", "1", "--quiet", "--step", "450"]
    assert eval_ravel.main(argv) == 0 and asked == ["450"]
    printed = capsys.readouterr().out
    assert "| no intervention | 0.00 | 100.00 | 50.00 |" in printed and "| soft | 56.25 |" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["n_answer_tokens"] == 3 and results["data"] == str(tmp_path / "test")
    heatmap = out / "heatmaps" / "soft_row0.png"
    assert results["heatmaps"] == [str(heatmap)] and heatmap.is_file()
    assert results["step"] == 450
    assert (out / "results.md").read_text().startswith("# RAVEL evaluation: fake (checkpoint step 450)\n")
    # Bad input: clear one-line error, exit 1, no output folder and no leftovers.
    for bad in (["--data", str(tmp_path / "nope")], ["--modes", "sideways"], ["--n-answer-tokens", "1"]):
        args = argv[:2] + ["--data", str(tmp_path / "test"), "--out", str(tmp_path / "bad"), "--quiet", "--modes",
                           "soft"] + bad
        assert eval_ravel.main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert not (tmp_path / "bad").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "test"]


def test_eval_cli_rebuilds_a_hyperdas_method_for_another_k():
    from hyperdas_fixtures import tiny
    from hyperdas_jax.train import HyperDASMethod, Steps
    from hyperdas_jax.train import with_answer_tokens

    cfg, target, model = tiny()
    steps = Steps(model, target, cfg)
    method = HyperDASMethod(steps, steps.params)
    assert with_answer_tokens(method, 3) is method
    method.tokenizer = "kept"
    rebuilt = with_answer_tokens(method, None)
    assert isinstance(rebuilt, HyperDASMethod) and rebuilt.tokenizer == "kept"
    assert rebuilt.steps.n_answer_tokens is None and rebuilt.steps.cfg.eval.n_answer_tokens is None
    assert rebuilt.steps.forward_fn is steps.forward_fn and rebuilt.params is method.params
    assert method.steps.n_answer_tokens == 3


def test_eval_cli_bad_run_dir(tmp_path, capsys):
    from tools import eval_ravel

    rows, _ = _prediction_set()
    ravel_store.save_rows(rows, tmp_path / "test")
    capsys.readouterr()
    argv = ["--run", str(tmp_path / "no_run"), "--data", str(tmp_path / "test"), "--out", str(tmp_path / "eval")]
    assert eval_ravel.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and not (tmp_path / "eval").exists()


# ----------------------------------------------------------------------------- prepare_ravel: bad inputs


@pytest.fixture()
def fake_target(tmp_path):
    """A directory that passes the cheap target checks (the RAVEL errors come before any loading)."""
    from hyperdas_jax.config import ModelConfig, to_dict

    path = tmp_path / "target"
    path.mkdir()
    (path / "model_config.json").write_text(json.dumps(to_dict(ModelConfig())))
    (path / "tokenizer.json").write_text("{}")
    return path


def _prepare(argv, capsys):
    from tools import prepare_ravel

    rc = prepare_ravel.main(argv)
    captured = capsys.readouterr()
    return rc, captured.err.strip()


@pytest.mark.parametrize("case", ["malformed_json", "missing_file", "unknown_domain", "unknown_attribute",
                                  "unreachable_url", "not_a_target", "existing_out"])
def test_prepare_bad_inputs_fail_cleanly(case, tmp_path, ravel_tgz, fake_target, capsys):
    folder = tmp_path / "ravel"
    with tarfile.open(ravel_tgz) as archive:
        archive.extractall(folder, filter="data")
    out_parent = tmp_path / "data"
    out_parent.mkdir()
    out = out_parent / "set"
    args = {"--ravel": str(folder), "--target": str(fake_target), "--domains": "city", "--out": str(out),
            "--cache-dir": str(tmp_path / "cache")}
    extra = ["--n-train", "4", "--n-test", "2", "--quiet"]
    expected = {
        "malformed_json": "malformed JSON in RAVEL file ravel_city_entity_attributes.json",
        "missing_file": "RAVEL file missing",
        "unknown_domain": "unknown RAVEL domain 'town'",
        "unknown_attribute": "unknown attribute(s) 'Population'",
        "unreachable_url": "cannot download RAVEL from http://127.0.0.1:9/data.tgz",
        "not_a_target": "model_config.json missing",
        "existing_out": "output folder already exists",
    }[case]
    if case == "malformed_json":
        (folder / "data" / "ravel_city_entity_attributes.json").write_text('{"Paris": {"Country": "France"')
    elif case == "missing_file":
        (folder / "data" / "ravel_city_prompt_to_split.json").unlink()
    elif case == "unknown_domain":
        args["--domains"] = "town"
    elif case == "unknown_attribute":
        extra += ["--attributes", "Country", "Population"]
    elif case == "unreachable_url":
        args["--ravel"] = "http://127.0.0.1:9/data.tgz"
    elif case == "not_a_target":
        args["--target"] = str(tmp_path)
    elif case == "existing_out":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    argv = [x for kv in args.items() for x in kv] + extra
    rc, err = _prepare(argv, capsys)
    assert rc == 1
    assert err.startswith("error: ") and "\n" not in err and expected in err, err
    if case == "existing_out":
        assert [p.name for p in out_parent.iterdir()] == ["set"] and (out / "keep.txt").read_text() == "mine"
    else:
        assert list(out_parent.iterdir()) == []
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_validation_templates_are_disjoint_from_train(ravel_tgz):
    from hyperdas_jax.data.ravel_raw import load_domain
    from hyperdas_jax.data.build import generate_splits

    domain = load_domain(ravel_tgz, "city")
    rows, held = generate_splits(domain, ("Country", "Timezone"), n_train=60, n_test=20, validation_fraction=0.25,
                                 seed=0)
    assert [len(rows[s]) for s in ("train", "validation", "test")] == [90, 30, 40]
    templates = {s: {r[c] for r in rows[s] for c in ("base_template", "source_template")} for s in rows}
    assert not templates["train"] & templates["validation"]
    assert not templates["test"] & (templates["train"] | templates["validation"])
    held_all = {t for ts in held.values() for t in ts}
    assert {r["base_template"] for r in rows["validation"]} <= held_all
    assert all(domain.template_split[r["base_template"]] == "train" for r in rows["validation"])
    assert all(domain.template_split[r["base_template"]] in ("val", "test") for r in rows["test"])


# ----------------------------------------------------------------------------- the real SmolLM2 target

_SEPARATOR_FREE_ENDINGS = (" ", '"', "'", "(")


@pytest.fixture(scope="module")
def smol(smollm2_target_dir):
    from hyperdas_jax.target import load_target

    return load_target(smollm2_target_dir)


# A causal row the original rule keeps although it proves nothing: after BOS, SmolLM2 answers
# "city: Lahore, country:" with " India" (Lahore is in Pakistan), the value of the source Hyderabad.
# With no intervention at all the target already "produces the source's value".
_LAHORE = {
    "input_prefix": "city: Lahore", "input_suffix": ", country:",
    "counterfactual_input_prefix": "Hyderabad", "counterfactual_input_suffix": " is a city in",
    "edit_instruction": "Lahore ; Hyderabad - Country", "entity": "Lahore", "counterfactual_entity": "Hyderabad",
    "target": "Pakistan", "counterfactual_target": "India", "attribute_type": "causal", "domain": "city",
    "attribute": "Country", "verify_text": "city: Hyderabad, country:",
    "base_template": "city: %s, country:", "source_template": "%s is a city in",
    "base_template_type": "template", "source_template_type": "template",
}


@pytest.fixture(scope="module")
def sample(ravel_tgz):
    """41 city rows: causal Continent rows and isolate rows asking Country or Continent (what SmolLM2-135M
    knows best, so both kinds of row survive the filter), plus the Lahore row."""
    from hyperdas_jax.data.ravel_generate import GenerationOptions, generate_rows

    pool = generate_rows(ravel_tgz, GenerationOptions("city", ("Country", "Continent"), n_per_attribute=120, seed=7))
    causal = [r for r in pool if r["attribute_type"] == "causal" and r["attribute"] == "Continent"]
    isolate = [r for r in pool if r["attribute_type"] == "isolate" and r["attribute"] in ("Country", "Continent")]
    return causal[:20] + isolate[:20] + [_LAHORE]


def _direct_verdicts(target, rows):
    """Independent check: BOS + prompt + answer per query, one row per call, no left padding.

    Each sequence is right-padded to a fixed width only so one program serves every row: with causal
    attention the trailing pads cannot change any earlier position's prediction, and position ids
    number the real tokens from 0 as they would unpadded.
    """
    tok = target.tokenizer
    cache = {}

    def ok(prompt, answer, k):
        if (prompt, answer) not in cache:
            sep = "" if prompt.endswith(_SEPARATOR_FREE_ENDINGS) else " "
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(sep + answer, add_special_tokens=False)["input_ids"]
            seq = [tok.bos_token_id] + p + a
            width = 48
            assert len(seq) <= width
            ids = np.zeros((1, width), np.int32)
            mask = np.zeros((1, width), np.int32)
            ids[0, : len(seq)], mask[0, : len(seq)] = seq, 1
            pred = np.asarray(target(ids, mask))[0].argmax(-1)
            # token seq[j] is predicted at position j - 1; the answer starts at j = 1 + len(p)
            cache[(prompt, answer)] = pred[len(p): len(p) + len(a)], a
        pred, a = cache[(prompt, answer)]
        n = len(a) if k is None else min(k, len(a))
        return bool(a) and list(pred[:n]) == a[:n]

    def first(prompt, answer, k):
        sep = "" if prompt.endswith(_SEPARATOR_FREE_ENDINGS) else " "
        ids = tok(sep + answer, add_special_tokens=False)["input_ids"]
        return ids if k is None else ids[:k]

    strict, original = [], []
    for r in rows:
        base = r["input_prefix"] + r["input_suffix"]
        causal = r["attribute_type"] == "causal"
        expected = r["counterfactual_target"] if causal else r["target"]
        c = not causal or first(base, r["target"], 3) != first(base, r["counterfactual_target"], 3)
        strict.append(ok(base, r["target"], 3) and ok(r["verify_text"], expected, 3) and c)
        original.append(ok(r["verify_text"], expected, None))  # the original: the whole answer
    return strict, original


@pytest.fixture(scope="module")
def filtered(smol, sample):
    from hyperdas_jax.data.ravel_filter import FilterOptions, filter_rows
    from hyperdas_jax.data.target_predict import make_predict_fn

    predict_fn = make_predict_fn(smol)
    out = {}
    for rule, k in (("strict", 3), ("original", None)):
        options = FilterOptions(rule=rule, n_answer_tokens=k, batch_size=64, progress=False)  # one batch each
        out[rule] = filter_rows(sample, smol.tokenizer, predict_fn, options)
    return out


@pytest.mark.slow
def test_filter_keeps_exactly_what_a_direct_greedy_check_keeps(smol, sample, filtered):
    strict, original = _direct_verdicts(smol, sample)
    kept_strict, report = filtered["strict"]
    kept_original, _ = filtered["original"]
    assert kept_strict == [r for r, keep in zip(sample, strict) if keep]
    assert kept_original == [r for r, keep in zip(sample, original) if keep]
    assert report["total"]["kept"] == len(kept_strict) and len(kept_strict) < len(sample)
    assert {r["attribute_type"] for r in kept_strict} == {"causal", "isolate"}
    # The Lahore row: the default filter drops it (check (a)), the original rule keeps it.
    assert _LAHORE not in kept_strict and _LAHORE in kept_original
    assert report["causal/Country"]["failed_a"] >= 1


@pytest.mark.slow
def test_no_intervention_scores_cause_0_and_isolate_100_on_strict_rows(smol, sample, filtered, tmp_path,
                                                                        monkeypatch, capsys):
    from hyperdas_jax.config import ExperimentConfig, EvalConfig, HypernetConfig, InterventionConfig, TargetConfig
    from hyperdas_jax.models.hyperdas import build_hyperdas
    from hyperdas_jax.train import HyperDASMethod, Steps
    from tools import eval_ravel

    cfg = ExperimentConfig(target=TargetConfig(path=smol.path), hypernet=HypernetConfig(num_layers=1),
                           intervention=InterventionConfig(layer=3, rank=4, mlp_hidden=32),
                           eval=EvalConfig(n_answer_tokens=3, batch_size=16))
    steps = Steps(build_hyperdas(smol.model, cfg), smol.model, cfg)
    method = HyperDASMethod(steps, steps.params)
    kept, _ = filtered["strict"]
    ravel_store.save_rows(kept + [_LAHORE], tmp_path / "rows")
    monkeypatch.setattr(eval_ravel, "load_method", lambda run_dir, target=None, step="best", weights="average": method)
    out = tmp_path / "eval"
    assert eval_ravel.main(["--run", "unused", "--data", str(tmp_path / "rows"), "--modes", "--out", str(out),
                            "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    scores = results["modes"]["no intervention"]
    assert list(results["modes"]) == ["no intervention"] and results["num_scored"] == len(kept) + 1
    # Lahore (not a strict row) is the one causal success without any intervention.
    for key, a in scores["attributes"].items():
        assert a["correct_causal"] == (1 if key == "city/Country" else 0), key
        assert a["correct_isolate"] == a["n_isolate"], key
    assert "| no intervention |" in printed
    # Without the Lahore row: cause 0 and isolate 100 exactly, as the default filter guarantees.
    results = ev.evaluate(method, kept, smol.tokenizer, modes=(), n_answer_tokens=3,
                          collate_options=collate.CollateOptions(batch_size=16), progress=False)
    assert results["modes"]["no intervention"]["overall"] == {"cause": 0.0, "isolate": 1.0, "disentangle": 0.5}
    assert results["modes"]["no intervention"]["pooled"]["n_causal"] > 0
    assert "| no intervention | 0.00 | 100.00 | 50.00 |" in ev.results_markdown(results)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_prepare_ravel_end_to_end_on_smollm2(dtype, smollm2_target_dir, ravel_tgz, tmp_path, capsys, monkeypatch):
    from hyperdas_jax.data import target_predict
    from tools import prepare_ravel

    answered_in = []  # the compute dtype of the target that screens and filters
    real_predict_fn = target_predict.make_predict_fn
    monkeypatch.setattr(target_predict, "make_predict_fn",
                        lambda target: answered_in.append(target.model.config.dtype) or real_predict_fn(target))
    out = tmp_path / "smol_city"
    argv = ["--ravel", str(ravel_tgz), "--target", str(smollm2_target_dir), "--domains", "city",
            "--attributes", "Country", "--n-train", "10", "--n-test", "6", "--validation-fraction", "0.2",
            "--batch-size", "8", "--quiet", "--out", str(out)] + (["--dtype", dtype] if dtype != "float32" else [])
    assert prepare_ravel.main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert answered_in == [dtype] and report["dtype"] == dtype
    assert f"the target answered in {dtype}" in (out / "report.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md", "test", "train", "validation"]
    assert [report["splits"][s]["generated"] for s in ("train", "validation", "test")] == [8, 2, 6]
    for split in ("train", "validation", "test"):
        rows = ravel_store.load_rows(out / split)
        assert len(rows) == report["splits"][split]["kept"]
        assert report["splits"][split]["filter"]["city"]["total"]["kept"] == len(rows)
        assert all(instruction_attribute(r) == "Country" for r in rows)
    assert report["filter"] == {"rule": "strict", "n_answer_tokens": 3, "batch_size": 8}
    assert "| train | 8 |" in printed and "causal/Country" in (out / "report.md").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["smol_city"]  # no temporary folders left
    other = "float32" if dtype == "bfloat16" else "bfloat16"
    assert build.screened_dtype(out / "train") == dtype and build.screen_mismatch(out / "test", dtype) is None
    assert f"screened by the target in {dtype}" in build.screen_mismatch(out / "test", other)
    shutil.rmtree(out)


def _built(tmp_path, report):
    """A folder laid out as tools.prepare_ravel writes it, with `report` as its report.json."""
    rows, _ = _prediction_set()
    for split in ("train", "test"):
        ravel_store.save_rows(rows, tmp_path / "data" / split)
    (tmp_path / "data" / "report.json").write_text(report)
    return tmp_path / "data"


@pytest.mark.parametrize("report, screened", [
    ('{"dtype": "bfloat16"}', "bfloat16"),
    ('{"n_train": 10}', "float32"),  # built before the dtype was recorded: the screen answered in float32
    ("{not json", None),
])
def test_screened_dtype_is_read_from_the_build_report(report, screened, tmp_path):
    data = _built(tmp_path, report)
    assert build.screened_dtype(data / "train") == screened
    assert build.screened_dtype(data) is None  # not a split folder
    assert build.screen_mismatch(data / "test", screened or "float32") is None
    warning = build.screen_mismatch(data / "test", "float16")
    if screened is None:
        assert warning is None
    else:
        assert warning.startswith(f"warning: the rows in {data / 'test'} were screened by the target in {screened}")
        assert "computes in float16" in warning and "tools.prepare_ravel --dtype float16" in warning
    (data / "report.json").unlink()
    assert build.screened_dtype(data / "train") is None  # rows this tool did not build: nothing to compare


@pytest.mark.parametrize("screened", ["bfloat16", "float32"])
def test_evaluation_warns_when_the_rows_were_screened_in_another_dtype(screened, tmp_path, capsys):
    from types import SimpleNamespace

    from hyperdas_jax.config import load_config
    from hyperdas_jax.pipeline.eval_run import evaluate_run

    data = _built(tmp_path, json.dumps({"dtype": screened}))
    rows, soft = _prediction_set()
    cfg = load_config("configs/tiny.yaml")  # target.dtype float32
    method = FakeMethod(rows, soft, n_answer_tokens=cfg.eval.n_answer_tokens, tokenizer=_word_tokenizer())
    method.steps = SimpleNamespace(cfg=cfg, n_answer_tokens=cfg.eval.n_answer_tokens)
    results = evaluate_run(method, str(data / "test"), str(tmp_path / "eval"), modes=("soft",), heatmaps=0,
                           progress=False)
    err = capsys.readouterr().err
    assert ("were screened by the target in bfloat16" in err) == (screened == "bfloat16"), err
    (data / "report.json").unlink()  # the same rows, not built by prepare_ravel: no dtype to compare, same scores
    again = evaluate_run(method, str(data / "test"), str(tmp_path / "eval2"), modes=("soft",), heatmaps=0,
                         progress=False)
    assert "warning" not in capsys.readouterr().err
    assert again["modes"]["soft"]["overall"] == results["modes"]["soft"]["overall"]


def test_training_warns_when_the_rows_were_screened_in_another_dtype(tmp_path, capsys):
    from tools import train as train_cli

    data = _built(tmp_path, json.dumps({"dtype": "bfloat16"}))
    argv = ["--config", "configs/tiny.yaml", "--run", str(tmp_path / "run"), "--no-progress",
            "--set", f"data.train={data / 'train'}"]
    assert train_cli.main(argv) == 1  # a random target has no tokenizer for the rows: refused before training
    err = capsys.readouterr().err
    assert f"warning: the rows in {data / 'train'} were screened by the target in bfloat16" in err, err
    assert "error: data.train needs the target's tokenizer" in err


# ----------------------------------------------------------------------------- per-template scores


def test_template_scores_group_rows_by_base_template():
    rows, soft = _prediction_set()
    # Two templates per queried attribute, alternating over that attribute's rows; one holds a "|".
    seen: dict[str, int] = {}
    for row in rows:
        n = seen[row["attribute"]] = seen.get(row["attribute"], 0) + 1
        row["base_template"] = f"{row['attribute']} {'a|b' if n % 2 else 'c'} %s"
    results = ev.evaluate(FakeMethod(rows, soft), rows, _word_tokenizer(), modes=("soft",),
                          collate_options=collate.CollateOptions(batch_size=4, length_buckets=(8, 16)),
                          progress=False)
    table = results["modes"]["soft"]["templates"]
    scored = [i for i, row in enumerate(rows) if i != 7]  # row 7 is dropped (too long), never counted
    expected = {}
    for i in scored:
        row = rows[i]
        entry = expected.setdefault((row["attribute"], row["base_template"]), [0, 0, 0, 0])
        entry[0 if is_causal(row) else 2] += 1
        entry[1 if is_causal(row) else 3] += int(soft[i])
    assert [(t["attribute"], t["template"]) for t in table] == sorted(expected)
    for t in table:
        nc, cc, ni, ci = expected[(t["attribute"], t["template"])]
        assert (t["n_causal"], t["n_isolate"]) == (nc, ni)
        assert t["cause"] == (cc / nc if nc else None) and t["isolate"] == (ci / ni if ni else None)
        assert t["disentangle"] == ev._disentangle(t["cause"], t["isolate"])
    assert sum(t["n_causal"] + t["n_isolate"] for t in table) == len(scored)
    # The baseline gets its own table: every template at cause 0 / isolate 100.
    assert all(t["cause"] in (0.0, None) and t["isolate"] in (1.0, None)
               for t in results["modes"]["no intervention"]["templates"])
    # Markdown: one line per template and intervention mode, the "|" escaped, no baseline lines.
    markdown = ev.results_markdown(results)
    section = markdown[markdown.index("## Per base template"):]
    lines = [line for line in section.splitlines() if line.startswith("| ") and "`" in line]
    assert len(lines) == len(table) and all("| soft |" in line for line in lines)
    first = table[0]
    assert lines[0].startswith(f"| {first['attribute']} | `{first['template'].replace('|', chr(92) + '|')}` | soft | ")
    # Rows without the column (or with it on only some rows) get no template table.
    del rows[0]["base_template"]
    assert ev.template_scores(rows, {"soft": soft.astype(np.int8)}) is None


# ----------------------------------------------------------------------------- intervals and localisation


def test_bootstrap_point_estimate_is_the_evaluator_aggregation():
    from hyperdas_jax import bootstrap

    rows, _ = _prediction_set()
    rng = np.random.default_rng(4)
    correct = {m: rng.integers(0, 2, len(rows)).astype(np.int8) for m in ("a", "b")}
    correct["a"][7] = correct["b"][7] = -1  # not scored
    scores = ev.score_rows(rows, correct)
    point = bootstrap.replicates(rows, correct, n_boot=0)
    for mode in correct:
        assert point[mode]["overall"][0] == pytest.approx(scores[mode]["overall"]["disentangle"], abs=1e-12)
        for key, attr in scores[mode]["attributes"].items():
            assert point[mode]["attributes"][key][0] == pytest.approx(attr["disentangle"], abs=1e-12)
        for key, dom in scores[mode]["domains"].items():
            assert point[mode]["domains"][key][0] == pytest.approx(dom["disentangle"], abs=1e-12)
    # Seeded, and an interval holds its point estimate.
    ci = bootstrap.intervals(rows, correct, seed=1)
    assert ci == bootstrap.intervals(rows, correct, seed=1)
    lo, hi = ci["a"]["overall"]
    assert lo <= scores["a"]["overall"]["disentangle"] <= hi and hi - lo > 0.05


def test_bootstrap_interval_widths():
    from hyperdas_jax import bootstrap

    n = 400
    rows = [_row(i, "city", "Country", "Country", "causal" if i < n // 2 else "isolate") for i in range(n)]
    all_right = {"m": np.ones(n, np.int8)}
    assert bootstrap.intervals(rows, all_right)["m"]["overall"] == [1.0, 1.0]
    # Causal rows half right, isolate rows all right: disentangle 0.75 with sd sqrt(.25/200)/2 = 0.0177.
    verdict = np.ones(n, np.int8)
    verdict[: n // 2: 2] = 0
    lo, hi = bootstrap.intervals(rows, {"m": verdict}, n_boot=4000)["m"]["overall"]
    assert lo == pytest.approx(0.75 - 1.96 * 0.0177, abs=0.006) and hi == pytest.approx(0.75 + 1.96 * 0.0177, abs=0.006)
    # Paired difference: identical verdicts differ by exactly 0; a better method's interval excludes 0.
    same = bootstrap.difference(rows, verdict, verdict)
    assert same == {"difference": 0.0, "interval": [0.0, 0.0]}
    better = bootstrap.difference(rows, all_right["m"], verdict)
    assert better["difference"] == pytest.approx(0.25) and better["interval"][0] > 0.15


def test_localisation_of_hand_built_selections():
    from hyperdas_jax.localisation import batch_localisation

    b, ts, tb = 3, 4, 5
    a = np.zeros((b, ts + 1, tb))
    a[:, -1] = 1.0
    # Example 0: the entity pair (src 2 -> base 3) carries 0.6 of column 3; 0.2 more on (1, 1).
    a[0, 2, 3], a[0, -1, 3] = 0.6, 0.4
    a[0, 1, 1], a[0, -1, 1] = 0.2, 0.8
    # Example 1: nothing patched (a hard mode choosing SELF everywhere).
    # Example 2: all non-SELF mass off the entity; a masked cell (src 0) must not count.
    a[2, 3, 2], a[2, -1, 2] = 0.5, 0.5
    a[2, 0, 4], a[2, -1, 4] = 0.9, 0.1
    batch = {"base_intervention_mask": np.array([[1, 1, 1, 1, 0]] * 3),
             "source_intervention_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1]]),
             "base_entity_pos": np.array([3, 3, 2]), "source_entity_pos": np.array([2, 2, 1])}
    got = batch_localisation(a, batch)
    np.testing.assert_allclose(got["entity_share"], [0.75, np.nan, 0.0])
    np.testing.assert_allclose(got["source_share"], [0.75, np.nan, 0.0])
    np.testing.assert_allclose(got["base_share"], [0.75, np.nan, 1.0])
    np.testing.assert_allclose(got["self_entity"], [0.4, 1.0, 0.5])
    np.testing.assert_allclose(got["self_other"], [(1 + 0.8 + 1) / 3, 1.0, 1.0])
    np.testing.assert_array_equal(got["intervened"], [1.0, 0.0, 1.0])


def test_evaluator_reports_localisation_intervals_and_verdicts(tmp_path):
    rows, soft = _prediction_set()
    method = FakeMethod(rows, soft)
    options = collate.CollateOptions(batch_size=4, length_buckets=(8, 16))
    results = ev.evaluate(method, rows, _word_tokenizer(), modes=("soft",), collate_options=options,
                          n_answer_tokens=3, progress=False)
    assert results["verdicts"]["soft"][7] == -1 and results["verdicts"]["soft"].count(-1) == 1
    assert [v == 1 for i, v in enumerate(results["verdicts"]["soft"]) if i != 7] == list(np.delete(soft, 7))
    lo, hi = results["modes"]["soft"]["disentangle_ci"]["overall"]
    assert lo <= results["modes"]["soft"]["overall"]["disentangle"] <= hi
    assert "localisation" not in results["modes"]["no intervention"]
    loc = results["modes"]["soft"]["localisation"]
    causal_keys = {f"{r['domain']}/{instruction_attribute(r)}" for i, r in enumerate(rows) if is_causal(r) and i != 7}
    assert set(loc["attributes"]) == causal_keys
    # FakeMethod puts 0.75 on (last source token, third-last base token): never the entity cell here.
    assert loc["overall"]["self_entity"] == 1.0
    table = ev.results_markdown(results)
    assert "## Localisation" in table and "| overall | soft |" in table
    assert f"| soft | 56.25 | 43.75 | 50.00 | {ev.format_ci([lo, hi])} |" in table
