"""Converter bad inputs: one-line error, non-zero exit, no partial output."""

import json
import os
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from tools import convert_hf_llama

TINY = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.fixture
def hf_dir(tmp_path, capsys):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    src = tmp_path / "hf"
    model.save_pretrained(src)
    capsys.readouterr()  # drop save_pretrained's progress bar
    return src


def run_fails(capsys, tmp_path, src, *extra, match):
    out = tmp_path / "out"
    code = convert_hf_llama.main(["--source", str(src), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error: ") and "\n" not in err, err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")], "temporary output left behind"
    return err


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, match", [
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope_type 'yarn'"),
    (dict(sliding_window=128), "sliding_window"),
    (dict(model_type="mistral"), "model_type"),
    (dict(hidden_size=None), "hidden_size"),
])
def test_unsupported_config(capsys, tmp_path, hf_dir, changes, match):
    edit_config(hf_dir, **changes)
    run_fails(capsys, tmp_path, hf_dir, match=match)


def test_legacy_rope_keys_are_read(tmp_path, hf_dir):
    edit_config(hf_dir, rope_parameters=None, rope_theta=12345.0,
                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32})
    out = tmp_path / "out"
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(out)]) == 0
    cfg = json.loads((out / "model_config.json").read_text())
    assert cfg["rope_theta"] == 12345.0 and cfg["rope_scaling"]["original_max_position_embeddings"] == 32


def test_missing_weight_file(capsys, tmp_path, hf_dir):
    (hf_dir / "model.safetensors").unlink()
    run_fails(capsys, tmp_path, hf_dir, match="missing weight file")


def test_truncated_weight_file(capsys, tmp_path, hf_dir):
    f = hf_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    run_fails(capsys, tmp_path, hf_dir, match="unreadable safetensors")


def test_wrong_tensor_shape(capsys, tmp_path, hf_dir):
    from safetensors.numpy import load_file

    tensors = load_file(hf_dir / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((47, 32), np.float32)
    save_file(tensors, hf_dir / "model.safetensors")
    run_fails(capsys, tmp_path, hf_dir, match="model.layers.1.mlp.up_proj.weight")


def test_missing_and_unexpected_tensors(capsys, tmp_path, hf_dir):
    from safetensors.numpy import load_file

    tensors = load_file(hf_dir / "model.safetensors")
    del tensors["model.layers.0.post_attention_layernorm.weight"]
    save_file(tensors, hf_dir / "model.safetensors")
    run_fails(capsys, tmp_path, hf_dir, match="layers.0.post_attention_layernorm.weight")
    tensors["model.layers.0.post_attention_layernorm.weight"] = np.ones(32, np.float32)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.ones(32, np.float32)
    save_file(tensors, hf_dir / "model.safetensors")
    run_fails(capsys, tmp_path, hf_dir, match="q_proj.bias")


def test_existing_out_needs_overwrite_and_only_a_converted_target_is_replaced(capsys, tmp_path, hf_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(out)]) != 0
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite never replaces a folder the converter did not write (e.g. `--out .`), nor a file.
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "is not a converted target" in err, err
    assert (out / "keep.txt").read_text() == "user data"
    file = tmp_path / "file.txt"
    file.write_text("user file")
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(file), "--overwrite"]) == 1
    assert "is not a converted target" in capsys.readouterr().err
    assert file.read_text() == "user file" and sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "hf", "out"]
    # A converted target is replaced, with the usual folder permissions (not a temp folder's 0700).
    target = tmp_path / "target"
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(target)]) == 0
    (target / "stale.txt").write_text("from the earlier conversion")
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(target), "--overwrite"]) == 0
    assert (target / "model_config.json").is_file() and not (target / "stale.txt").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask


def test_a_killed_conversion_leaves_nothing_a_later_one_keeps(capsys, tmp_path, hf_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that no longer runs: the writer was killed
    stale = tmp_path / f".out.{dead.pid}.abc123.tmp"
    (stale / "params").mkdir(parents=True)
    out = tmp_path / "out"
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(out)]) == 0
    assert not stale.exists() and (out / "model_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_damaged_weights_and_foreign_tokenizers_are_refused(capsys, tmp_path, hf_dir, smollm2_target_dir):
    from safetensors.numpy import load_file

    run_fails(capsys, tmp_path, hf_dir, "--tokenizer", str(tmp_path / "no_such_tokenizer"),
              match="tokenizer folder")
    run_fails(capsys, tmp_path, hf_dir, "--tokenizer", str(smollm2_target_dir),
              match="the tokenizer has 49152 tokens but the model's embedding only 61")
    tensors = load_file(hf_dir / "model.safetensors")
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name][3, 5] = np.nan
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    run_fails(capsys, tmp_path, hf_dir, match="layers.1.mlp.down_proj")


def test_non_llama_gguf_and_missing_source(capsys, tmp_path):
    import gguf

    bad = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(bad), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    run_fails(capsys, tmp_path, bad, match="gpt2")
    run_fails(capsys, tmp_path, tmp_path / "nope", match="does not exist")


def test_sharded_index_is_followed(tmp_path, hf_dir):
    from safetensors.numpy import load_file

    tensors = load_file(hf_dir / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    parts = {"a.safetensors": names[:half], "b.safetensors": names[half:]}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, hf_dir / fname)
    (hf_dir / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert convert_hf_llama.main(["--source", str(hf_dir), "--out", str(tmp_path / "out")]) == 0
