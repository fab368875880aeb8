"""tools/sweep_layers.py on a tiny random target with the SmolLM2 tokenizer: plumbing, table = evaluator, resume."""

import json

import matplotlib.image
import pytest
from flax import nnx
from transformers import AutoTokenizer

from hyperdas_jax.config import ModelConfig
from hyperdas_jax.data import ravel_store
from hyperdas_jax.data.ravel_generate import GenerationOptions, generate_rows
from hyperdas_jax.models.llama import Llama
from hyperdas_jax.sharding import create_sharded
from hyperdas_jax.target import save_target
from tools import sweep_layers


@pytest.fixture()
def tiny_setup(tmp_path, smollm2_target_dir, ravel_tgz):
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_target_dir))
    config = ModelConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    target = save_target(tmp_path / "target", create_sharded(lambda: Llama(config, rngs=nnx.Rngs(0))), tokenizer)
    data = tmp_path / "data"
    for split, n, seed in (("train", 24, 1), ("validation", 12, 2)):
        options = GenerationOptions("city", ("Country", "Continent"), n_per_attribute=n, seed=seed,
                                    isolate_attributes=("Country", "Continent"))
        ravel_store.save_rows(generate_rows(ravel_tgz, options), data / split)
    return target, data


def test_sweep_table_plot_and_resume(tiny_setup, tmp_path, capsys):
    target, data = tiny_setup
    out = tmp_path / "sweep"
    args = ["--data", str(data), "--config", "configs/smollm2_ravel.yaml", "--target", str(target),
            "--layers", "1", "3", "--steps", "2", "--out", str(out), "--no-progress",
            "--set", "train.batch_size=4", "--set", "eval.batch_size=4", "--set", "hypernet.num_layers=1",
            "--set", "intervention.rank=4", "--set", "intervention.mlp_hidden=16",
            "--set", "intervention.anchor_layer=null"]  # the config's hs[10] is beyond this 4-layer target
    assert sweep_layers.main(args) == 0
    sweep = json.loads((out / "sweep.json").read_text())
    assert list(sweep["layers"]) == ["1", "3"] and sweep["split"] == "validation"
    assert sweep["n_rows"] == 12  # only the rows whose instruction names Country
    table = (out / "sweep.md").read_text()
    for layer in ("1", "3"):
        for method, mode in (("HyperDAS", "soft"), ("MDAS", "soft")):
            scored = json.loads((out / f"layer_{layer}" / method.lower() / "eval" / "results.json").read_text())
            overall = scored["modes"][mode]["overall"]
            assert sweep["layers"][layer][method] == overall
            assert scored["num_scored"] == 12
        h, m = sweep["layers"][layer]["HyperDAS"], sweep["layers"][layer]["MDAS"]
        row = (f"| {layer} | {100 * h['cause']:.2f} | {100 * h['isolate']:.2f} | {100 * h['disentangle']:.2f} "
               f"| {100 * m['cause']:.2f} | {100 * m['isolate']:.2f} | {100 * m['disentangle']:.2f} |")
        assert row in table
    image = matplotlib.image.imread(out / "sweep.png")
    assert image.ndim == 3 and image.shape[0] > 100

    # A rerun finds every layer scored and trains nothing.
    capsys.readouterr()
    assert sweep_layers.main(args) == 0
    assert ": training" not in capsys.readouterr().out
    assert json.loads((out / "sweep.json").read_text()) == sweep


def test_sweep_bad_inputs(tiny_setup, tmp_path, capsys):
    target, data = tiny_setup
    assert sweep_layers.main(["--data", str(tmp_path / "nowhere"), "--target", str(target)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert sweep_layers.main(["--data", str(data), "--target", str(target), "--layers", "9",
                              "--out", str(tmp_path / "s")]) == 1
    assert "outside [0, 3]" in capsys.readouterr().err
    assert sweep_layers.main(["--data", str(data), "--target", str(target), "--attribute", "Language",
                              "--out", str(tmp_path / "s")]) == 1
    assert "no rows for attribute 'Language'" in capsys.readouterr().err
