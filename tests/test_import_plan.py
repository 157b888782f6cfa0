"""The import plan: the evaluation side (evaluators, the runner, AutoAttack) and the config
library build on score_jax.parallel, not on the train step; score_jax.setup builds on nothing of
the PyTorch bridge, which builds on it; config.init_from's loading (score_jax.init_from) sits
above both."""

import ast
import glob
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imported(path: str) -> set[str]:
    """The modules (and `from m import name` as m.name) that any import in `path` names, at any
    depth: deferred imports inside functions included."""
    with open(path) as f:
        tree = ast.parse(f.read())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def _loaded(statements: str) -> list[str]:
    """The names in sys.modules after `statements` run in a fresh Python process."""
    code = f"import sys\n{statements}\nprint(repr(sorted(sys.modules)))"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return ast.literal_eval(out.stdout.strip().splitlines()[-1])


def test_the_evaluation_side_and_the_config_library_import_no_training():
    loaded = _loaded(
        "import score_jax.evaluators, score_jax.evaluate, score_jax.autoattack\n"
        "from score_jax import config_lib\n"
        "config_lib.validate(config_lib.load_config_file('configs/digits.py'))"
    )
    assert "score_jax.parallel" in loaded and "score_jax.evaluate" in loaded
    training = ("score_jax.train", "score_jax.trainer", "score_jax.setup")
    assert not [m for m in loaded if m in training or m.startswith("score_jax.torch_bridge")]


def test_setup_imports_nothing_of_the_torch_bridge():
    source = os.path.join(REPO, "score_jax", "setup.py")
    assert not [m for m in _imported(source) if "torch_bridge" in m]
    loaded = _loaded("import score_jax.setup")
    assert not [m for m in loaded if m.startswith("score_jax.torch_bridge") or m == "torch"]


def test_the_torch_bridge_imports_nothing_above_it():
    above = ("score_jax.init_from", "score_jax.trainer", "score_jax.main")
    for path in glob.glob(os.path.join(REPO, "score_jax", "torch_bridge", "*.py")):
        assert not [m for m in _imported(path) if m in above], path
