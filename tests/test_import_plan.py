"""The import plan: score_jax.setup builds on nothing of the PyTorch bridge, which builds on it;
config.init_from's loading (score_jax.init_from) sits above both."""

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


def test_setup_imports_nothing_of_the_torch_bridge():
    source = os.path.join(REPO, "score_jax", "setup.py")
    assert not [m for m in _imported(source) if "torch_bridge" in m]
    code = (
        "import sys, score_jax.setup; "
        "print([m for m in sys.modules if m.startswith('score_jax.torch_bridge') or m == 'torch'])"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_torch_bridge_imports_nothing_above_it():
    above = ("score_jax.init_from", "score_jax.trainer", "score_jax.main")
    for path in glob.glob(os.path.join(REPO, "score_jax", "torch_bridge", "*.py")):
        assert not [m for m in _imported(path) if m in above], path
