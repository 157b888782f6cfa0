"""The shipped configs: unchanged by the refactor that made them state only their differences,
one variant syntax, renamed fields refused with their new name, eps / norm following config.attack.

tests/data/config_snapshots.json holds every config:variant (and experiments/loss_table.py's row
configs) as `config.to_json_best_effort()` loaded them on main before that refactor (commit
b22647c), with its declared renames applied: loss.type -> loss.method, loss.kind ->
loss.divergence, the cifar10_basic variants respelled (`trades-se-clip-l2` -> `trades-se,clip,l2`),
the config.autoattack section (--mode autoattack) merged into config.test.autoattack (for the
shipped configs its values were the defaults; loss_table's version / attacks / num_examples now
sit in config.test.autoattack). The test proves every other field kept its value.

Changed a config on purpose? Regenerate the snapshot from the current tree and review its diff:
    PYTHONPATH=. python tests/test_configs.py --write
"""

import itertools
import json
import os
import subprocess
import sys

import ml_collections
import pytest
import shipped

from score_jax import checkpoint, config_checks, config_lib, evaluators, losses
from score_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPSHOTS = os.path.join(REPO, "tests", "data", "config_snapshots.json")


def _load(name: str, variant: str | None):
    return config_lib.load_config_file(os.path.join(REPO, "configs", name + ".py"), variant)


def shipped_configs() -> dict[str, ml_collections.ConfigDict]:
    """name:variant -> config, for every config file and variant (and loss_table's rows)."""
    sys.path.insert(0, REPO)
    from experiments import loss_table

    out = {key: shipped.load(*spec) for key, spec in shipped.shipped().items()}
    for row, budget in itertools.product(loss_table.ROWS, ("QUICK", "FULL")):
        config = loss_table.make_config(loss_table.ROWS[row], 1, getattr(loss_table, budget))
        out[f"loss_table:{row}:{budget}"] = config
    return out


def _as_json(config) -> dict:
    return json.loads(config.to_json_best_effort(sort_keys=True))


def test_configs_equal_their_snapshot_field_by_field():
    with open(SNAPSHOTS) as f:
        snapshots = json.load(f)
    configs = shipped_configs()
    assert sorted(configs) == sorted(snapshots)
    for name, config in configs.items():
        got = config_checks.leaves(ml_collections.ConfigDict(_as_json(config)))
        want = config_checks.leaves(ml_collections.ConfigDict(snapshots[name]))
        diff = {
            k: (got.get(k), want.get(k))
            for k in got.keys() | want.keys()
            if got.get(k) != want.get(k)
        }
        assert not diff, f"{name}: (now, snapshot) {diff}"


def test_shipped_variants_validate():
    for name, config in shipped_configs().items():
        if not name.startswith("loss_table"):
            config_lib.validate(config, num_devices=4)


@pytest.mark.parametrize(
    "name,old,new",
    [
        ("cifar10_basic", "trades-se-clip-l2", "trades-se,clip,l2"),
        ("cifar10_basic", "pgd_at-se-clip", "pgd_at-se,clip"),
        ("cifar10_ddpm", "beta3-l2", "beta3,l2"),
    ],
)
def test_old_variant_spelling_names_the_comma_spelling(name, old, new):
    with pytest.raises(ConfigError, match=rf"^config variant '{old}': .*'{new}'$"):
        _load(name, old)
    _load(name, new)  # the spelling the message gives loads


def test_paper_rules_are_one_function_used_by_the_basic_config_and_the_loss_table():
    sys.path.insert(0, REPO)
    from experiments import loss_table

    for method, divergence, clip in itertools.product(
        ("trades", "pgd_at"), losses.DIVERGENCES, (False, True)
    ):
        # The paper: lr 0.1 for KL, 0.05 otherwise; c = 0.4 (PGD-AT) / 0.3 (TRADES); PGD-AT
        # attacks from U(-eps, eps), TRADES from 0.001 N(0, 1) (without_DDPM/train_cifar.py).
        want = {
            "loss.method": method,
            "loss.divergence": divergence,
            "loss.clip_c": {"pgd_at": 0.4, "trades": 0.3}[method] if clip else None,
            "optim.learning_rate": 0.1 if divergence == "kl" else 0.05,
            "attack.init": {"pgd_at": "uniform", "trades": "normal"}[method],
        }
        variant = f"{method}-{divergence}" + (",clip" if clip else "")
        basic = config_checks.leaves(_load("cifar10_basic", variant))
        assert {k: basic[k] for k in want} == want
        row = loss_table._row(method, divergence, clip)
        table = config_checks.leaves(loss_table.make_config(row, 0, loss_table.QUICK))
        assert {k: table[k] for k in want} == want


@pytest.mark.parametrize(
    "field,value,new",
    [
        ("loss.type", "pgd_at", "config.loss.method"),
        ("loss.kind", "kl", "config.loss.divergence"),
        ("autoattack.num_examples", 100, "config.test.autoattack.num_examples"),
        ("autoattack.batch_size", 64, "config.eval_batch_size"),
    ],
)
def test_old_field_names_are_refused_with_the_new_one(field, value, new):
    config = _load("digits", None)
    section, key = field.split(".")
    if section not in config:
        config[section] = ml_collections.ConfigDict()
    config[section][key] = value
    with pytest.raises(ConfigError, match=rf"^config\.{field} was renamed: use {new}") as e:
        config_lib.validate(config)
    assert "\n" not in str(e.value)
    # On the command line, the override of a field the config lacks gets the same hint.
    argv = [
        "main.py",
        "--config",
        os.path.join(REPO, "configs/digits.py"),
        f"--config.{field}={value}",
    ]
    line = config_checks.explain_flag_error(argv, KeyError(field))
    assert line == f"--config.{field}={value}: config.{field} was renamed: use {new}"


def test_a_checkpoint_written_before_the_loss_rename_still_resumes():
    """Its fingerprint names loss.type / loss.kind: they compare as loss.method / divergence."""
    current = checkpoint.fingerprint(_load("digits", None))
    saved = json.loads(json.dumps(current))
    saved["loss"]["type"] = saved["loss"].pop("method")
    saved["loss"]["kind"] = saved["loss"].pop("divergence")
    assert checkpoint.fingerprint_mismatch(saved, current) == []
    saved["loss"]["kind"] = "kl"  # another run's: still refused
    assert checkpoint.fingerprint_mismatch(saved, current) == ["loss.divergence"]


_SHOW_EVALUATOR_EPS = """
import json, sys
from absl import app
from score_jax import evaluators, main

def show(argv):
    c = main.FLAGS.config
    specs = {s: evaluators.specs(c[s]) for s in ("eval", "test")}
    print(json.dumps({f"{s}.{k}": [v.eps, v.norm] for s in specs for k, v in specs[s].items()}))

sys.argv = ["score_jax", "--config", sys.argv[1], "--workdir", "/unused", *sys.argv[2:]]
app.run(show, flags_parser=main.parse_flags)
"""


def _evaluator_eps_norm(spec: str, *overrides: str) -> dict[str, list]:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    argv = [sys.executable, "-c", _SHOW_EVALUATOR_EPS, spec, *overrides]
    out = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_attack_eps_and_norm_flags_move_every_evaluator():
    """--config.attack.eps / norm on the command line (absl's config_flags, as main parses them)
    move the eps and norm of every validation and test evaluator that does not set its own."""
    spec = "configs/cifar10_basic.py:trades-se,l2"
    config = _load("cifar10_basic", "trades-se,l2")
    for section in (config.eval, config.test):
        for e in evaluators.specs(section).values():
            assert (e.eps, e.norm) == (128 / 255, "l2")
    flags = ["--config.attack.eps=0.2", "--config.attack.norm=linf", "--config.test.pgd.eps=0.05"]
    got = _evaluator_eps_norm(spec, *flags)
    assert got == {
        "eval.pgd": [0.2, "linf"],
        "eval.pgd_se": [0.2, "linf"],
        "test.pgd": [0.05, "linf"],  # its own eps, set on the command line, wins
        "test.autoattack": [0.2, "linf"],
    }


def _write_snapshots() -> None:
    snapshots = {k: _as_json(c) for k, c in sorted(shipped_configs().items())}
    with open(SNAPSHOTS, "w") as f:
        lines = [f" {json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in snapshots.items()]
        f.write("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"{len(snapshots)} configs written to {SNAPSHOTS}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(f"usage: PYTHONPATH=. python {sys.argv[0]} --write")
    _write_snapshots()
