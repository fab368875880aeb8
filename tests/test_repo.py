"""Repository-level promises: CI runs README's test command, and the library works without torch."""

import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (REPO / "README.md").read_text().splitlines()
    blocks, inside = [], False
    for line in text[:12]:
        if line.startswith("```"):
            inside = not inside
            continue
        if inside and line.strip():
            blocks.append(line.strip())
    return blocks


def test_readme_starts_with_the_two_commands_and_ci_runs_the_test_one():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    assert cmds[0].endswith("python -m tools.main_job") or "tools.main_job" in cmds[0]
    assert cmds[1].endswith("python -m pytest -q")
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith("#")]
    assert cmds[1] in ci, "the CI script must run README's test command verbatim"


def test_library_runs_without_torch():
    code = """
import sys
sys.modules['torch'] = None  # any import of torch now fails
import numpy as np
from flax import nnx
import hyperdas_jax, hyperdas_jax.train, hyperdas_jax.models.hyperdas
import hyperdas_jax.convert.hf_llama, hyperdas_jax.convert.gguf_llama
from hyperdas_jax.config import ModelConfig
from hyperdas_jax.models.llama import Llama
from hyperdas_jax.sharding import create_sharded
m = create_sharded(lambda: Llama(ModelConfig(), rngs=nnx.Rngs(0)))
assert np.isfinite(np.asarray(m(np.zeros((1, 4), np.int32)))).all()
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# A path that climbs out of the checkout: "../x" in a string, or a step above the repository root.
_OUTSIDE = re.compile("|".join([
    r"\.\./",                                       # ../shared, ../../data
    r"\bREPO\.parent\b", r"\bROOT\.parent\b",        # a folder beside the checkout
    r"\.parents\[[2-9]\]",                          # tests/x.py -> parents[2] is above the repo
    r"parent\.parent\.parent",
]))


def test_nothing_refers_to_a_folder_outside_the_repository():
    offenders = []
    for top in ("hyperdas_jax", "tools", "tests", "configs", ".ci"):
        for path in sorted((REPO / top).rglob("*")):
            if not path.is_file() or path.suffix in (".tgz", ".pyc") or path.name == "LICENSE":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _OUTSIDE.search(line) and path.name != "test_repo.py":
                    offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_packaged_ravel_archive_is_package_data():
    text = (REPO / "pyproject.toml").read_text()
    assert '"ravel/data.tgz"' in text and '"ravel/LICENSE"' in text
    from hyperdas_jax.data.ravel_raw import BUNDLED_RAVEL, check_bundled

    assert BUNDLED_RAVEL.is_relative_to(REPO / "hyperdas_jax") and (BUNDLED_RAVEL.parent / "LICENSE").is_file()
    check_bundled()
