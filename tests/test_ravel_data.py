"""RAVEL data pipeline: raw loading, generation, filtering, storage and collation (no model needed)."""

import functools
import http.server
import json
import shutil
import tarfile
import threading

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from hyperdas_jax.data import collate, ravel_filter, ravel_screen, ravel_store, ravel_tokens
from hyperdas_jax.data.ravel_generate import GenerationOptions, generate_rows, split_template
from hyperdas_jax.data.ravel_raw import RAVEL_DOMAINS, RavelError, load_domain, resolve_ravel
from hyperdas_jax.data.ravel_schema import ROW_COLUMNS, TEMPLATE_COLUMNS, expected_answer, instruction_attribute

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def raw(ravel_tgz):
    """domain -> {file key -> parsed JSON}, read straight from the archive (independent of the loader)."""
    out = {}
    with tarfile.open(ravel_tgz) as archive:
        for d in RAVEL_DOMAINS:
            files = {
                "attrs": f"data/ravel_{d}_entity_attributes.json",
                "prompts": f"data/ravel_{d}_attribute_to_prompts.json",
                "prompt_split": f"data/ravel_{d}_prompt_to_split.json",
                "entity_split": f"data/ravel_{d}_entity_to_split.json",
                "wiki": f"data/wikipedia_{d}_entity_prompts.json",
            }
            out[d] = {k: json.load(archive.extractfile(v)) for k, v in files.items()}
    return out


@pytest.fixture(scope="module")
def domains(ravel_tgz):
    return {d: load_domain(ravel_tgz, d) for d in RAVEL_DOMAINS}


@pytest.fixture(scope="module")
def extracted(ravel_tgz, tmp_path_factory):
    root = tmp_path_factory.mktemp("ravel")
    with tarfile.open(ravel_tgz) as archive:
        archive.extractall(root, filter="data")
    return root  # holds data/*.json


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_gguf):
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


_WORDS = (
    "<unk> <s> </s> <pad> city : Paris , country Germany France Berlin is in Rome Italy ; - Country "
    "Continent Lyon United States Kingdom Europe"
).split()


def _tiny_tokenizer(auto_bos: bool) -> PreTrainedTokenizerFast:
    """Word-level tokenizer; with auto_bos its post-processor adds <s> itself, like Hub Llama-3."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if auto_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def _row(prefix, suffix, cf_prefix, cf_suffix, entity, cf_entity, target, cf_target, kind, attribute, instructed,
         verify_text=None):
    if verify_text is None:
        verify_text = prefix + suffix
    return {
        "input_prefix": prefix,
        "input_suffix": suffix,
        "counterfactual_input_prefix": cf_prefix,
        "counterfactual_input_suffix": cf_suffix,
        "edit_instruction": f"{entity} ; {cf_entity} - {instructed}",
        "entity": entity,
        "counterfactual_entity": cf_entity,
        "target": target,
        "counterfactual_target": cf_target,
        "attribute_type": kind,
        "domain": "city",
        "attribute": attribute,
        "verify_text": verify_text,
    }


# Two hand-built rows in the tiny vocabulary: a causal one and an isolate one.
HAND_ROWS = [
    _row("city: Paris", ", country:", "Berlin", " is in", "Paris", "Berlin", "France", "Germany", "causal",
         "Country", "Country", verify_text="city: Berlin, country:"),
    _row("Rome", " is in", "city: Berlin", ", country:", "Rome", "Berlin", "Italy", "Germany", "isolate",
         "Country", "Continent"),
]

# ----------------------------------------------------------------------------- raw loading


def test_load_domain_matches_raw_files(domains, raw):
    counts = {"city": 3552, "nobel_prize_winner": 928, "occupation": 799, "physical_object": 563, "verb": 986}
    for d, n in counts.items():
        dom = domains[d]
        assert len(dom.entity_attributes) == n
        assert dom.entity_attributes == raw[d]["attrs"]
        assert {a: list(t) for a, t in dom.attribute_templates.items()} == raw[d]["prompts"]
        assert len(dom.wikipedia) == len(raw[d]["wiki"])
    city = domains["city"]
    assert city.entity_attributes["Aalborg"] == {
        "Continent": "Europe", "Country": "Denmark", "Language": "Danish",
        "Latitude": "57", "Longitude": "10", "Timezone": "Europe/Copenhagen",
    }
    assert len(city.template_split) == 273
    assert [len(city.entities(s)) for s in ("train", "test", "both")] == [1787, 818 + 947, 3552]
    assert sum(f.entity is not None for f in city.wikipedia) == 914
    assert sum(len(city.templates(a, "train")) for a in city.attributes) == 131
    assert sum(len(city.templates(a, "test")) for a in city.attributes) == 73 + 69
    occupation = domains["occupation"]
    assert "Gender Bias" in occupation.attributes
    assert occupation.valued_attributes == ("Duty", "Industry", "Work Location")


def test_load_from_extracted_folder_with_and_without_data_level(extracted, domains):
    for source in (extracted, extracted / "data"):
        assert load_domain(source, "verb") == domains["verb"]


def test_bad_sources_raise_clear_errors(extracted, tmp_path, ravel_tgz):
    with pytest.raises(RavelError, match="unknown RAVEL domain 'planet'"):
        load_domain(ravel_tgz, "planet")
    with pytest.raises(RavelError, match="not found"):
        load_domain(tmp_path / "nowhere.tgz", "city")

    broken = tmp_path / "broken"
    shutil.copytree(extracted / "data", broken)
    (broken / "ravel_city_prompt_to_split.json").write_text('{"a %s": "train",')
    with pytest.raises(RavelError, match=r"malformed JSON in RAVEL file ravel_city_prompt_to_split\.json"):
        load_domain(broken, "city")
    (broken / "ravel_verb_entity_to_split.json").unlink()
    with pytest.raises(RavelError, match=r"missing .*ravel_verb_entity_to_split\.json"):
        load_domain(broken, "verb")
    (broken / "ravel_occupation_entity_attributes.json").write_text('["not", "an", "object"]')
    with pytest.raises(RavelError, match=r"ravel_occupation_entity_attributes\.json"):
        load_domain(broken, "occupation")

    # An archive lacking a file names it too.
    partial = tmp_path / "partial.tgz"
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(extracted / "data" / "ravel_city_entity_attributes.json", "data/ravel_city_entity_attributes.json")
    with pytest.raises(RavelError, match=r"ravel_city_attribute_to_prompts\.json"):
        load_domain(partial, "city")


def test_packaged_archive_is_the_default_and_is_checked(tmp_path, monkeypatch, domains):
    from hyperdas_jax.data import ravel_raw

    assert load_domain(None, "verb") == domains["verb"]
    # A truncated or altered packaged archive is a one-line error naming the file.
    for name, damage in (("truncated", lambda b: b[: len(b) // 2]), ("flipped", lambda b: b[:-1] + bytes([b[-1] ^ 1]))):
        copy = tmp_path / name / "data.tgz"
        copy.parent.mkdir()
        copy.write_bytes(damage(ravel_raw.BUNDLED_RAVEL.read_bytes()))
        monkeypatch.setattr(ravel_raw, "BUNDLED_RAVEL", copy.resolve())
        for load in (lambda: load_domain(None, "city"), lambda: resolve_ravel(copy)):
            with pytest.raises(RavelError) as info:
                load()
            message = str(info.value)
            assert "\n" not in message and str(copy.resolve()) in message and "damaged" in message
    copy.unlink()
    with pytest.raises(RavelError, match="packaged RAVEL archive .* is missing"):
        ravel_raw.check_bundled(copy)


def test_unreachable_url_raises_and_leaves_nothing(tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(RavelError, match=r"cannot download RAVEL from http://127\.0\.0\.1:9/"):
        resolve_ravel("http://127.0.0.1:9/data.tgz", cache_dir=cache)
    assert not cache.exists()
    # An existing cache folder keeps no temporary file either.
    with pytest.raises(RavelError, match="cannot download"):
        resolve_ravel("http://127.0.0.1:9/data.tgz", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_download_checks_sha256_and_caches(tmp_path, ravel_tgz):
    served = tmp_path / "served"
    served.mkdir()
    shutil.copy(ravel_tgz, served / "data.tgz")
    (served / "fake.tgz").write_bytes(b"not the archive")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    cache = tmp_path / "cache"
    try:
        with pytest.raises(RavelError, match="sha256"):
            resolve_ravel(f"{url}/fake.tgz", cache_dir=cache)
        assert not cache.exists()
        got = resolve_ravel(f"{url}/data.tgz", cache_dir=cache)
        assert got == cache / "data.tgz" and got.read_bytes() == ravel_tgz.read_bytes()
    finally:
        server.shutdown()
        server.server_close()
    # Served from the cache now that the server is gone.
    assert resolve_ravel(f"{url}/data.tgz", cache_dir=cache) == got
    assert sorted(p.name for p in cache.iterdir()) == ["data.tgz"]


# ----------------------------------------------------------------------------- generation


def test_generation_is_deterministic(domains):
    opts = GenerationOptions("city", n_per_attribute=60, seed=3)
    first = generate_rows(domains["city"], opts)
    assert generate_rows(domains["city"], opts) == first
    assert generate_rows(domains["city"], GenerationOptions("city", n_per_attribute=60, seed=4)) != first
    # A target's rows do not depend on which other targets are generated with it.
    only = generate_rows(domains["city"], GenerationOptions("city", ("Continent",), n_per_attribute=60, seed=3))
    assert only == [r for r in first if instruction_attribute(r) == "Continent"]


def test_generation_counts_and_schema(domains):
    rows = generate_rows(domains["city"], GenerationOptions("city", ("Country",), n_per_attribute=103))
    assert len(rows) == 103
    assert all(list(r) == [*ROW_COLUMNS, *TEMPLATE_COLUMNS] and all(isinstance(v, str) for v in r.values())
               for r in rows)
    kinds = [(r["attribute_type"], r["attribute"]) for r in rows]
    assert kinds.count(("causal", "Country")) == 51
    # 52 isolate rows over 5 attributes: the first two take one extra each.
    assert [kinds.count(("isolate", a)) for a in ("Continent", "Latitude", "Longitude", "Language", "Timezone")] \
        == [11, 11, 10, 10, 10]
    assert {instruction_attribute(r) for r in rows} == {"Country"}
    bare = generate_rows(domains["city"], GenerationOptions("city", n_per_attribute=4, include_template_columns=False))
    assert len(bare) == 24 and all(tuple(r) == ROW_COLUMNS for r in bare)


def test_hand_checked_rows(domains):
    rows = generate_rows(domains["city"], GenerationOptions("city", ("Country",), n_per_attribute=6, seed=42))
    causal, isolate = rows[0], rows[3]
    # Carhue is in Argentina and Kadoma in Zimbabwe (ravel_city_entity_attributes.json).
    assert {k: causal[k] for k in ROW_COLUMNS} == {
        "input_prefix": "city to country: Mexico City is in Mexico. Carhue",
        "input_suffix": " is in",
        "counterfactual_input_prefix": '[{"city": "Beijing", "lang": "Mandarin Chinese"}, {"city": "Kadoma',
        "counterfactual_input_suffix": '", "lang": "',
        "edit_instruction": "Carhue ; Kadoma - Country",
        "entity": "Carhue",
        "counterfactual_entity": "Kadoma",
        "target": "Argentina",
        "counterfactual_target": "Zimbabwe",
        "attribute_type": "causal",
        "domain": "city",
        "attribute": "Country",
        "verify_text": "city to country: Mexico City is in Mexico. Kadoma is in",
    }
    assert expected_answer(causal) == "Zimbabwe"
    # Piura is in South America, Solola in North America; the base asks Continent, instruction says Country.
    assert isolate["edit_instruction"] == "Piura ; Solola - Country"
    assert (isolate["attribute_type"], isolate["attribute"]) == ("isolate", "Continent")
    assert (isolate["target"], isolate["counterfactual_target"]) == ("South America", "North America")
    assert isolate["input_prefix"] + isolate["input_suffix"] == isolate["verify_text"] == (
        '[{"city": "Toronto", "continent": "North America"}, {"city": "Piura", "continent": "'
    )
    assert expected_answer(isolate) == "South America"


@pytest.mark.parametrize("domain", RAVEL_DOMAINS)
def test_rows_agree_with_raw_json(domain, domains, raw):
    rows = generate_rows(domains[domain], GenerationOptions(domain, n_per_attribute=80, seed=1))
    r = raw[domain]
    wiki_entity = {t: info["entity"] for t, info in r["wiki"].items()}
    for row in rows:
        base, source, attribute = row["entity"], row["counterfactual_entity"], row["attribute"]
        assert row["target"] == r["attrs"][base][attribute]
        assert row["counterfactual_target"] == r["attrs"][source][attribute]
        assert row["target"] != row["counterfactual_target"] and row["target"].strip()
        assert row["input_prefix"].endswith(base)
        assert row["counterfactual_input_prefix"].endswith(source)
        assert row["input_prefix"] + row["input_suffix"] == row["base_template"].replace("%s", base)
        assert row["base_template"] in r["prompts"][attribute]
        filled_source = row["source_template"].replace("%s", source)
        assert row["counterfactual_input_prefix"] + row["counterfactual_input_suffix"] == filled_source
        if row["source_template_type"] == "wikipedia":
            assert wiki_entity[row["source_template"]] == source
        else:
            assert any(row["source_template"] in ts for ts in r["prompts"].values())
        if row["attribute_type"] == "causal":
            assert attribute == instruction_attribute(row)
            assert row["verify_text"] == row["base_template"].replace("%s", source)
            assert expected_answer(row) == row["counterfactual_target"]
        else:
            assert row["attribute_type"] == "isolate" and attribute != instruction_attribute(row)
            assert row["verify_text"] == row["input_prefix"] + row["input_suffix"]
            assert expected_answer(row) == row["target"]


def test_template_splits_are_disjoint(domains, raw):
    for domain in RAVEL_DOMAINS:
        template_split, wiki = raw[domain]["prompt_split"], raw[domain]["wiki"]
        used = {}
        for split in ("train", "test"):
            rows = generate_rows(domains[domain], GenerationOptions(domain, n_per_attribute=200, template_split=split))
            allowed = {"train"} if split == "train" else {"val", "test"}
            splits = {template_split[r["base_template"]] for r in rows}
            # Nobel's Wikipedia file repeats 15 RAVEL templates as generic fragments with other
            # splits; only entity-bound fragments are used, so look each source up where it came from.
            splits |= {wiki[r["source_template"]]["split"] if r["source_template_type"] == "wikipedia"
                       else template_split[r["source_template"]] for r in rows}
            assert splits <= allowed
            used[split] = {r["base_template"] for r in rows} | {r["source_template"] for r in rows}
        assert used["train"].isdisjoint(used["test"])


def test_entity_split_option(domains, raw):
    rows = generate_rows(domains["nobel_prize_winner"],
                         GenerationOptions("nobel_prize_winner", n_per_attribute=100, entity_split="train"))
    split = raw["nobel_prize_winner"]["entity_split"]
    assert {split[r["entity"]] for r in rows} == {split[r["counterfactual_entity"]] for r in rows} == {"train"}


def test_unknown_or_valueless_attribute(domains):
    with pytest.raises(RavelError, match="unknown attribute 'Population'"):
        generate_rows(domains["city"], GenerationOptions("city", ("Population",), n_per_attribute=2))
    with pytest.raises(RavelError, match="'Gender Bias' has no values"):
        generate_rows(domains["occupation"], GenerationOptions("occupation", ("Gender Bias",), n_per_attribute=2))
    rows = generate_rows(domains["occupation"], GenerationOptions("occupation", n_per_attribute=2))
    assert [instruction_attribute(r) for r in rows[::2]] == ["Duty", "Industry", "Work Location"]
    with pytest.raises(RavelError, match="template_split"):
        GenerationOptions("city", template_split="val")


def test_split_template_uses_the_slot():
    assert split_template("%s is in", "Paris") == ("Paris", " is in")
    # The last occurrence of "die" is inside "audience"; the slot is the entity mention.
    template = "made such an impression on his first %s to a New York audience."
    assert split_template(template, "die") == ("made such an impression on his first die", " to a New York audience.")


# ----------------------------------------------------------------------------- storage


def test_save_load_round_trip(tmp_path, domains):
    rows = generate_rows(domains["physical_object"], GenerationOptions("physical_object", n_per_attribute=10))
    path = ravel_store.save_rows(rows, tmp_path / "out")
    loaded = ravel_store.load_rows(path)
    assert loaded.column_names == [*ROW_COLUMNS, *TEMPLATE_COLUMNS]
    assert loaded.to_list() == rows
    with pytest.raises(RavelError, match="already exists"):
        ravel_store.save_rows(rows, path)
    ravel_store.save_rows(rows[:3], path, overwrite=True)
    assert ravel_store.load_rows(path).to_list() == rows[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # An empty split still loads, with the columns it was given.
    empty = ravel_store.load_rows(ravel_store.save_rows([], tmp_path / "empty", columns=list(rows[0])))
    assert len(empty) == 0 and empty.column_names == [*ROW_COLUMNS, *TEMPLATE_COLUMNS]


def test_atomic_directory_replaces_or_keeps(tmp_path):
    from hyperdas_jax.atomic import atomic_directory

    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(out) as tmp:
            (tmp / "a.txt").write_text("two")
            raise KeyboardInterrupt
    assert (out / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("three")
    assert [p.name for p in out.iterdir()] == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_save_leaves_no_output(tmp_path):
    bad = [dict(HAND_ROWS[0]), dict(HAND_ROWS[1], target=7)]
    with pytest.raises(RavelError, match="not strings"):
        ravel_store.save_rows(bad, tmp_path / "out")
    with pytest.raises(RavelError, match="columns"):
        ravel_store.save_rows([HAND_ROWS[0], {"target": "x"}], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RavelError, match="not found"):
        ravel_store.load_rows(tmp_path / "out")


# ----------------------------------------------------------------------------- collation


def test_hand_built_batch_literal_arrays():
    opts = collate.CollateOptions(batch_size=3, length_buckets=(8, 16), editor_buckets=(4, 8))
    batches = {}
    for auto_bos in (False, True):
        tok = _tiny_tokenizer(auto_bos)
        assert ravel_tokens.adds_bos(tok) is auto_bos
        encoded = collate.encode_rows(HAND_ROWS, tok, opts)
        (batches[auto_bos],) = collate.iterate_batches(encoded, opts)
    for key in batches[False]:
        np.testing.assert_array_equal(batches[False][key], batches[True][key], err_msg=key)
    b = batches[True]
    ignore = -100
    # Tokens: <s>=1 <pad>=3 city=4 :=5 Paris=6 ,=7 country=8 Germany=9 Berlin=11 is=12 in=13 Rome=14
    # Italy=15 ;=16 -=17 Country=18 Continent=19. Row 2 is filler (a copy of row 0, valid=False).
    expected = {
        "base_ids": [[1, 4, 5, 6, 7, 8, 5, 9], [3, 3, 3, 1, 14, 12, 13, 15], [1, 4, 5, 6, 7, 8, 5, 9]],
        "base_mask": [[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]],
        "base_intervention_mask": [[1, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]],
        "labels": [[ignore] * 7 + [9], [ignore] * 7 + [15], [ignore] * 7 + [9]],
        "source_ids": [[3, 3, 3, 3, 1, 11, 12, 13], [3, 1, 4, 5, 11, 7, 8, 5], [3, 3, 3, 3, 1, 11, 12, 13]],
        "source_mask": [[0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]],
        "source_intervention_mask": [[0, 0, 0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 0, 0]],
        # The visible positions in order, then -1, to the smallest bucket holding the most (8 here).
        "base_memory_index": [[0, 1, 2, 3] + [-1] * 4, [3, 4] + [-1] * 6, [0, 1, 2, 3] + [-1] * 4],
        "source_memory_index": [[4, 5] + [-1] * 6, [1, 2, 3, 4] + [-1] * 4, [4, 5] + [-1] * 6],
        "editor_ids": [[3, 3, 1, 6, 16, 11, 17, 18], [3, 3, 1, 14, 16, 11, 17, 19], [3, 3, 1, 6, 16, 11, 17, 18]],
        "editor_mask": [[0, 0, 1, 1, 1, 1, 1, 1]] * 3,
        "base_entity_pos": [3, 4, 3],
        "source_entity_pos": [5, 4, 5],
        # Where the instruction names the base and the source entity ("Paris ; Berlin - Country").
        "base_anchor_pos": [3, 3, 3],
        "source_anchor_pos": [5, 5, 5],
        "is_causal": [True, False, True],
        "valid": [True, True, False],
        "row_index": [0, 1, -1],
    }
    assert set(b) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(b[key], np.array(value), err_msg=key)
        assert b[key].dtype == (bool if key in ("is_causal", "valid") else np.int32), key

    visible = collate.CollateOptions(batch_size=3, length_buckets=(8, 16), editor_buckets=(4, 8),
                                     base_suffix_visible=True, source_suffix_visible=True)
    (b,) = collate.iterate_batches(collate.encode_rows(HAND_ROWS, _tiny_tokenizer(True), visible), visible)
    np.testing.assert_array_equal(b["base_intervention_mask"][:2], [[1] * 7 + [0], [0, 0, 0, 1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(b["source_intervention_mask"][:2], b["source_mask"][:2])


def test_bucket_shapes_and_partial_batch():
    tok = _tiny_tokenizer(True)
    long_row = _row("city: Paris, country: France, city: Rome, country: Italy, city: Berlin", ", country:",
                    "Rome", " is in", "Berlin", "Rome", "Germany", "Italy", "causal", "Country", "Country")
    rows = HAND_ROWS * 3 + [long_row]  # 7 rows; the long base has 1 + 20 + 1 = 22 tokens
    opts = collate.CollateOptions(batch_size=4, length_buckets=(8, 16, 24, 32), editor_buckets=(8, 16))
    encoded = collate.encode_rows(rows, tok, opts)
    assert collate.num_batches(encoded, opts) == 2
    first, second = collate.iterate_batches(encoded, opts)
    assert first["base_ids"].shape == (4, 8) and first["source_ids"].shape == (4, 8)
    assert first["editor_ids"].shape == (4, 8)
    assert second["base_ids"].shape == (4, 24) and second["source_ids"].shape == (4, 8)
    assert second["valid"].tolist() == [True, True, True, False]
    assert second["row_index"].tolist() == [4, 5, 6, -1]
    assert len(list(collate.iterate_batches(encoded, opts, drop_remainder=True))) == 1
    shuffled = [b["row_index"] for b in collate.iterate_batches(encoded, opts, shuffle=True, seed=5)]
    again = [b["row_index"] for b in collate.iterate_batches(encoded, opts, shuffle=True, seed=5)]
    assert all(np.array_equal(x, y) for x, y in zip(shuffled, again))
    assert sorted(np.concatenate(shuffled).tolist()) == [-1, 0, 1, 2, 3, 4, 5, 6]
    with pytest.raises(RavelError, match="ascending"):
        collate.CollateOptions(length_buckets=(32, 16))


def test_memory_index_lists_the_visible_positions_in_a_bucket():
    mask = np.zeros((3, 48), np.int32)
    mask[0, [30, 31, 40]] = 1
    mask[1, 20:40] = 1  # the most: 20 visible -> width 24, half the padded length
    index = collate.visible_index(mask, (8, 16, 24, 32, 48))
    assert index.shape == (3, 24) and index.dtype == np.int32
    assert index[0].tolist() == [30, 31, 40] + [-1] * 21
    assert index[1].tolist() == list(range(20, 40)) + [-1] * 4
    assert (index[2] == -1).all()
    assert collate.visible_index(np.ones((2, 20)), (8, 64)).tolist() == [list(range(20))] * 2  # never wider than t


def test_too_long_rows_are_dropped_and_counted():
    tok = _tiny_tokenizer(False)
    long_base = _row("city: Paris, country: France, city: Rome, country: Italy, city: Berlin", ", country:",
                     "Rome", " is in", "Berlin", "Rome", "Germany", "Italy", "causal", "Country", "Country")
    long_source = _row("Rome", " is in", "city: Paris, country: France, city: Rome, country: Italy, city: Berlin",
                       ", country:", "Rome", "Berlin", "Italy", "Germany", "isolate", "Country", "Continent")
    empty = dict(HAND_ROWS[1], target="")
    opts = collate.CollateOptions(batch_size=2, length_buckets=(8, 16, 32), max_length=16)
    encoded = collate.encode_rows([HAND_ROWS[0], long_base, long_source, empty, HAND_ROWS[1]], tok, opts)
    assert encoded.num_rows == 5
    assert encoded.dropped == {"base_too_long": 1, "source_too_long": 1, "empty_answer": 1}
    assert [e.row_index for e in encoded.examples] == [0, 4]
    # The kept rows still carry every answer token.
    (batch,) = collate.iterate_batches(encoded, opts)
    assert [row[row != -100].tolist() for row in batch["labels"]] == [[9], [15]]


def test_smollm2_batches_one_bos_entity_and_labels(smollm2_tokenizer, domains):
    tok = smollm2_tokenizer
    assert not ravel_tokens.adds_bos(tok)
    bos = tok.bos_token_id
    rows = []
    for d in RAVEL_DOMAINS:
        rows += generate_rows(domains[d], GenerationOptions(d, n_per_attribute=24, seed=7))
    opts = collate.CollateOptions(batch_size=16)
    encoded = collate.encode_rows(rows, tok, opts)
    assert encoded.dropped == {} and len(encoded.examples) == len(rows)
    shapes = set()

    def text(ids):
        return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)

    for batch in collate.iterate_batches(encoded, opts):
        shapes.add((batch["editor_ids"].shape, batch["base_ids"].shape, batch["source_ids"].shape))
        for i in np.flatnonzero(batch["valid"]):
            row = rows[batch["row_index"][i]]
            for name in ("editor", "base", "source"):
                ids, mask = batch[f"{name}_ids"][i], batch[f"{name}_mask"][i]
                first = int(np.argmax(mask))
                assert mask[first:].all() and ids[first] == bos and (ids[mask == 1] == bos).sum() == 1
            labels = batch["labels"][i]
            prompt = row["input_prefix"] + row["input_suffix"]
            assert text(labels[labels != -100]) == ravel_tokens.answer_separator(prompt) + expected_answer(row)
            for side, prefix_key, entity_key in (("base", "input_prefix", "entity"),
                                                 ("source", "counterfactual_input_prefix", "counterfactual_entity")):
                ids = batch[f"{side}_ids"][i]
                pos = batch[f"{side}_entity_pos"][i]
                upto = text(ids[batch[f"{side}_mask"][i].argmax() + 1 : pos + 1])
                # The entity's last token ends the prefix (it may run on into the suffix when the
                # tokenizer merges across, e.g. 'Jr.' + '",' -> '.",').
                assert upto.startswith(row[prefix_key]) and len(upto) - len(row[prefix_key]) <= 3
                visible = ids[batch[f"{side}_intervention_mask"][i] == 1]
                assert text(visible[1:]) == upto
            # The instruction's anchors end the two names it holds ("{entity} ; {cf entity} - {attribute}").
            editor, first = batch["editor_ids"][i], int(batch["editor_mask"][i].argmax())
            base_anchor, source_anchor = batch["base_anchor_pos"][i], batch["source_anchor_pos"][i]
            assert text(editor[first + 1 : base_anchor + 1]) == row["entity"]
            assert text(editor[base_anchor + 1 : source_anchor + 1]) == " ; " + row["counterfactual_entity"]
    assert all(te in (16, 32) and tb in (16, 32, 48, 64, 96) and ts in (16, 32, 48, 64)
               for (_, te), (_, tb), (_, ts) in shapes)


def test_answer_separator_and_answer_tokens(smollm2_tokenizer):
    assert [ravel_tokens.answer_separator(p) for p in ("is in", 'country": "', "is in ", "born (", "it's '")] \
        == [" ", "", "", "", ""]
    tok = smollm2_tokenizer
    answers = ravel_tokens.encode_answers(tok, ["is in", 'country": "', "is in "], ["United States"] * 3)
    assert [tok.convert_ids_to_tokens(a) for a in answers] == [
        ["ĠUnited", "ĠStates"], ["United", "ĠStates"], ["United", "ĠStates"]
    ]


# ----------------------------------------------------------------------------- filter


def _perfect(ids, mask):
    """A model that always predicts the next input token (so every answer is reproduced)."""
    out = np.zeros_like(ids)
    out[:, :-1] = ids[:, 1:]
    return out


def test_filter_rules_with_fake_model():
    tok = _tiny_tokenizer(True)
    lyon = tok.convert_tokens_to_ids("Lyon")
    calls = []

    def ignorant_of_lyon(ids, mask):
        calls.append((ids.shape, ids.dtype, mask.dtype, mask.copy()))
        out = _perfect(ids, mask)
        out[(ids == lyon).any(axis=1)] = 0  # it knows nothing about Lyon
        return out

    good = HAND_ROWS[0]
    same_value = dict(good, counterfactual_target="France")  # intervention effect would be invisible
    unknown_base = _row("city: Lyon", ", country:", "Berlin", " is in", "Lyon", "Berlin", "France", "Germany",
                        "causal", "Country", "Country", verify_text="city: Berlin, country:")
    unknown_isolate = _row("Lyon", " is in", "Berlin", " is in", "Lyon", "Berlin", "France", "Germany",
                           "isolate", "Country", "Continent")
    isolate_ok = HAND_ROWS[1]
    rows = [good, same_value, unknown_base, unknown_isolate, isolate_ok]
    opts = ravel_filter.FilterOptions(batch_size=4, length_buckets=(8, 16), progress=False)

    kept, report = ravel_filter.filter_rows(rows, tok, ignorant_of_lyon, opts)
    assert kept == [good, isolate_ok]
    assert report["causal/Country"] == {"generated": 3, "too_long": 0, "failed_a": 1, "failed_b": 0,
                                        "failed_c": 1, "kept": 1, "survival": 1 / 3}
    assert report["isolate/Country"] == {"generated": 2, "too_long": 0, "failed_a": 1, "failed_b": 1,
                                         "failed_c": 0, "kept": 1, "survival": 0.5}
    assert report["total"]["kept"] == 2 and report["total"]["generated"] == 5
    table = ravel_filter.format_report(report)
    assert "causal/Country" in table and "33.3%" in table
    # Fixed shapes, int32, left padding; repeated (prompt, answer) queries are run once.
    assert {c[0] for c in calls} <= {(4, 8), (4, 16)} and all(c[1] == c[2] == np.int32 for c in calls)
    assert all((m[:, -1] == 1).all() for *_, m in calls)

    kept, report = ravel_filter.filter_rows(rows, tok, ignorant_of_lyon, ravel_filter.FilterOptions(
        rule="original", batch_size=4, length_buckets=(8, 16), progress=False))
    assert kept == [good, same_value, unknown_base, isolate_ok]
    assert report["causal/Country"]["failed_a"] is None and report["causal/Country"]["kept"] == 3
    assert "-" in ravel_filter.format_report(report)


def test_filter_first_k_tokens_and_too_long():
    tok = _tiny_tokenizer(False)
    uk = _row("city: Paris", ", country:", "Berlin", " is in", "Paris", "Berlin", "United States",
              "United Kingdom", "causal", "Country", "Country", verify_text="city: Berlin, country:")
    too_long = _row("city: Paris, country: France, city: Rome, country: Italy, city: Berlin", ", country:",
                    "Rome", " is in", "Berlin", "Rome", "Germany", "Italy", "isolate", "Country", "Continent")

    def wrong_second_token(ids, mask):
        out = _perfect(ids, mask)
        out[:, -2] = 0  # the prediction for the last token (second answer token here) is wrong
        return out

    opts = dict(batch_size=2, length_buckets=(8, 16), progress=False)
    kept, report = ravel_filter.filter_rows([uk, too_long], tok, _perfect, ravel_filter.FilterOptions(**opts))
    assert kept == [uk] and report["isolate/Country"]["too_long"] == 1
    # k=1: "United" == "United", so the causal row is uninformative (c) and dropped.
    kept, report = ravel_filter.filter_rows([uk], tok, _perfect,
                                            ravel_filter.FilterOptions(n_answer_tokens=1, **opts))
    assert kept == [] and report["causal/Country"]["failed_c"] == 1
    # k=1 ignores the wrong second token; k=None does not.
    kept, _ = ravel_filter.filter_rows([uk], tok, wrong_second_token,
                                       ravel_filter.FilterOptions(n_answer_tokens=1, rule="original", **opts))
    assert kept == [uk]
    kept, _ = ravel_filter.filter_rows([uk], tok, wrong_second_token, ravel_filter.FilterOptions(**opts))
    assert kept == []


def test_filter_sees_the_collated_token_ids(smollm2_tokenizer, domains):
    rows = generate_rows(domains["city"], GenerationOptions("city", n_per_attribute=20, seed=11))
    seen = set()

    def recording(ids, mask):
        for seq, m in zip(ids, mask):
            seen.add(tuple(seq[m == 1].tolist()))
        return _perfect(ids, mask)

    kept, report = ravel_filter.filter_rows(rows, smollm2_tokenizer, recording,
                                            ravel_filter.FilterOptions(batch_size=8, progress=False))
    assert kept == rows and report["total"]["survival"] == 1.0
    opts = collate.CollateOptions(batch_size=8)
    for batch in collate.iterate_batches(collate.encode_rows(rows, smollm2_tokenizer, opts), opts):
        for i in np.flatnonzero(batch["valid"] & ~batch["is_causal"]):
            assert tuple(batch["base_ids"][i][batch["base_mask"][i] == 1].tolist()) in seen


def _knows(tokenizer, entities):
    """A fake target that answers perfectly exactly when the prompt names one of `entities`."""
    names = set(entities)
    calls = []

    def predict(ids, mask):
        calls.append(ids.shape)
        out = _perfect(ids, mask)
        for i, (row, m) in enumerate(zip(ids, mask)):
            text = tokenizer.decode(row[m == 1])
            if not any(n in text for n in names):
                out[i] = 0
        return out

    return predict, calls


def test_screen_pools_are_the_known_entities_and_rows_come_from_them(smollm2_tokenizer, domains):
    city = domains["city"]
    names = city.entities("both")
    text = " ".join([t for a in city.attributes for t in city.attribute_templates[a]]
                    + [v for e in names for v in city.entity_attributes[e].values()])
    # Names the fake can spot unambiguously: in no template, value or other entity name.
    known = [e for e in names if e[0] in "ABC" and e not in text and not any(e in o for o in names if o != e)]
    predict, calls = _knows(smollm2_tokenizer, known)
    opts = ravel_filter.FilterOptions(n_answer_tokens=3, batch_size=32, progress=False)
    cache = {}
    pools, report = ravel_screen.screen_entities(
        city, ["Country", "Continent"], smollm2_tokenizer, predict, opts,
        ravel_screen.ScreenOptions(n_entities=80, n_templates=2, seed=5), cache)
    for attribute in ("Country", "Continent"):
        probed = report[attribute]["entities"]
        assert len(probed) == 80 and report[attribute]["queries"] == 160
        assert len(report[attribute]["templates"]) == 2
        assert all(t in city.templates(attribute, "train") for t in report[attribute]["templates"])
        expected = sorted(set(probed) & set(known))
        assert pools[attribute] == expected and report[attribute]["known"] == len(expected) >= 5
        assert len(expected) < len(probed)
    assert len(cache) == 320

    n_calls = len(calls)
    again = ravel_filter.check_queries(list(cache), smollm2_tokenizer, predict, opts, cache)
    assert len(calls) == n_calls and again == list(cache.values())  # answered from the cache

    rows = generate_rows(city, GenerationOptions("city", ("Country",), n_per_attribute=40, seed=2,
                                                 entity_pools=pools, isolate_attributes=("Country", "Continent")))
    assert {r["attribute"] for r in rows} == {"Country", "Continent"}
    for r in rows:
        assert r["entity"] in pools[r["attribute"]]
        if r["attribute_type"] == "causal":
            assert r["counterfactual_entity"] in pools["Country"]
    kept, table = ravel_filter.filter_rows(rows, smollm2_tokenizer, predict, opts, cache)
    # Every row's prompts name a known entity, so only (c) can remove one.
    assert table["total"]["failed_a"] == table["total"]["failed_b"] == 0
    assert len(kept) == len(rows) - table["total"]["failed_c"]


def test_entity_pool_errors(domains):
    city = domains["city"]
    france = [e for e in city.entities("both") if city.entity_attributes[e]["Country"] == "France"][:3]
    with pytest.raises(RavelError, match="entity pool"):
        generate_rows(city, GenerationOptions("city", ("Country",), n_per_attribute=4,
                                              entity_pools={"Country": france}))
    with pytest.raises(RavelError, match="without a value"):
        generate_rows(city, GenerationOptions("city", ("Country",), n_per_attribute=4,
                                              entity_pools={"Country": ["Atlantis", *france]}))
    with pytest.raises(RavelError, match="Population"):
        generate_rows(city, GenerationOptions("city", ("Country",), n_per_attribute=4,
                                              isolate_attributes=("Population",)))
    with pytest.raises(RavelError, match="n_entities"):
        ravel_screen.ScreenOptions(n_entities=1)


def test_instruction_anchors_name_the_entities_or_are_missing():
    tok = _tiny_tokenizer(False)
    # Word-level tokens: Paris ; Berlin - Country -> 0 1 2 3 4; another form names no entity.
    assert ravel_tokens.instruction_anchors(tok, ["Paris ; Berlin - Country", "Paris Berlin Country",
                                                  "Paris ; Berlin - Country"]) == [(0, 2), (-1, -1), (0, 2)]
    assert ravel_tokens.instruction_anchors(tok, []) == []
    row = dict(HAND_ROWS[0], edit_instruction="Paris Berlin Country")
    opts = collate.CollateOptions(batch_size=2, length_buckets=(8, 16), editor_buckets=(4, 8))
    (b,) = collate.iterate_batches(collate.encode_rows([row, HAND_ROWS[1]], tok, opts), opts)
    np.testing.assert_array_equal(b["base_anchor_pos"], [-1, 3])
    np.testing.assert_array_equal(b["source_anchor_pos"], [-1, 5])
