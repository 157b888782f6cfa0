"""The PyTorch bridge: Flax -> PyTorch parity of every architecture, RobustBench WRN names,
--mode export / autoattack end to end, bad exports, and torch staying optional."""

import hashlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli_helpers import AUTOATTACK_QUICK, run_main

torch = pytest.importorskip("torch")
pytest.importorskip("pyautoattack")

from score_jax import models  # noqa: E402
from score_jax.errors import CheckpointError  # noqa: E402
from score_jax.models.random_weights import random_variables  # noqa: E402
from score_jax.torch_bridge import INSTALL_HINT  # noqa: E402
from score_jax.torch_bridge.convert import export_state_dict, import_state_dict  # noqa: E402
from score_jax.torch_bridge.export import load_exported  # noqa: E402
from score_jax.torch_bridge.models import build_torch_model  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "name,kw,shape",
    [
        ("wrn-16-2", {}, (16, 16, 3)),  # SiLU; shortcuts at every group start
        ("wrn-16-2", dict(depth=10, width=1, activation="relu"), (32, 32, 3)),  # no shortcut in g0
        # 11M parameters whatever the size: 8x8 keeps XLA's CPU convolutions quick.
        ("preact-resnet-18", {}, (8, 8, 3)),
        ("resnet-18", dict(activation="silu"), (8, 8, 3)),
        ("small-cnn", dict(width=8, hidden=16, mean=(0.3,), std=(0.4,)), (8, 8, 1)),
    ],
)
def test_logits_match_flax(name, kw, shape):
    flax_model = models.get_model(name, 10, conv_impl="xla", **kw)
    x = np.random.default_rng(0).uniform(0.0, 1.0, (32, *shape)).astype(np.float32)
    shapes = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), x[:1], train=False))
    variables = random_variables(shapes, seed=1, gain=1.0)
    expected = np.asarray(
        jax.jit(flax_model.apply, static_argnames="train")(variables, x, train=False)
    )

    state = export_state_dict(name, variables)
    model = build_torch_model(name, 10, **kw)
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        got = model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.1  # not a degenerate comparison
    assert "mean" not in state and "std" not in model.state_dict()  # non-persistent buffers
    # momentum = 1 - Flax momentum
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {m.momentum for m in bn} == ({0.01} if name.startswith("wrn") else {0.1})
    assert {m.eps for m in bn} == {1e-5}
    # and back: the exact Flax variables
    back = import_state_dict(name, model.state_dict(), shapes)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


# Tiny values of the architecture fields, for a quick parity check of every registered model.
_TINY = {"depth": 10, "width": 1, "num_blocks": (1, 1, 1, 1), "base_width": 4, "hidden": 8}


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_registered_architecture_converts_through_its_record(name):
    """The registry is the one place an architecture is described: from its record alone, the
    full-size Flax model and PyTorch twin have the same state-dict keys and shapes, and a tiny
    one gives the Flax logits in PyTorch and its exact variables back."""
    with torch.device("meta"):
        twin = build_torch_model(name, 10)
    full = models.get_model(name, 10)
    full_shapes = jax.eval_shape(
        lambda: full.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False)
    )
    exported = {k: tuple(v.shape) for k, v in export_state_dict(name, full_shapes).items()}
    assert exported == {k: tuple(v.shape) for k, v in twin.state_dict().items()}

    arch = models.architecture(name)
    flax_model = models.get_model(name, 10, conv_impl="xla", **{f: _TINY[f] for f in arch.fields})
    x = np.random.default_rng(0).uniform(0.0, 1.0, (4, 8, 8, 3)).astype(np.float32)
    shapes = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), x[:1], train=False))
    variables = random_variables(shapes, seed=2, gain=1.0)
    expected = np.asarray(flax_model.apply(variables, x, train=False))
    model = build_torch_model(name, 10, **models.architecture_kwargs(name, flax_model))
    model.load_state_dict(export_state_dict(name, variables), strict=True)
    with torch.no_grad():
        got = model.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    assert np.abs(got - expected).max() <= 1e-4
    assert np.abs(expected).max() > 0.1  # not a degenerate comparison
    back = import_state_dict(name, model.state_dict(), shapes)
    jax.tree.map(np.testing.assert_array_equal, back, variables)


def _dm_wide_resnet_keys(depth: int, width: int, num_classes: int) -> dict[str, tuple]:
    """RobustBench DMWideResNet's state-dict keys and shapes, written out by hand."""
    keys: dict[str, tuple] = {"init_conv.weight": (16, 3, 3, 3)}

    def bn(prefix: str, c: int) -> None:
        for k in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.{k}"] = (c,)
        keys[f"{prefix}.num_batches_tracked"] = ()

    n = (depth - 4) // 6
    channels = [16, 16 * width, 32 * width, 64 * width]
    for g in range(3):
        for i in range(n):
            cin, cout = (channels[g] if i == 0 else channels[g + 1]), channels[g + 1]
            p = f"layer.{g}.block.{i}"
            bn(f"{p}.batchnorm_0", cin)
            keys[f"{p}.conv_0.weight"] = (cout, cin, 3, 3)
            bn(f"{p}.batchnorm_1", cout)
            keys[f"{p}.conv_1.weight"] = (cout, cout, 3, 3)
            if cin != cout:
                keys[f"{p}.shortcut.weight"] = (cout, cin, 1, 1)
    bn("batchnorm", channels[3])
    keys["logits.weight"] = (num_classes, channels[3])
    keys["logits.bias"] = (num_classes,)
    return keys


def test_wrn28_10_state_dict_is_robustbench_dm_wide_resnet():
    flax_model = models.get_model("wrn-28-10", 10)
    shapes = jax.eval_shape(
        lambda: flax_model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)), train=False)
    )
    exported = {k: tuple(v.shape) for k, v in export_state_dict("wrn-28-10", shapes).items()}
    with torch.device("meta"):
        model = build_torch_model("wrn-28-10", 10, activation="silu")
    torch_keys = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = _dm_wide_resnet_keys(28, 10, 10)
    assert exported == expected
    assert torch_keys == expected
    assert list(model.state_dict())[:2] == [
        "init_conv.weight",
        "layer.0.block.0.batchnorm_0.weight",
    ]
    num_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes["params"]))
    assert round(num_params / 1e6, 2) == 36.48
    assert isinstance(model.layer, torch.nn.Sequential) and len(model.layer) == 3
    assert [len(group.block) for group in model.layer] == [4, 4, 4]


def test_build_torch_model_rejects_unknown_names():
    with pytest.raises(ValueError, match="Unknown model 'vit'"):
        build_torch_model("vit", 10)
    with pytest.raises(ValueError, match="unknown model fields"):
        build_torch_model("small-cnn", 10, depth=3)
    with pytest.raises(ValueError, match="Unknown activation"):
        build_torch_model("resnet-18", 10, activation="gelu")


def _cli(*args, env_extra=None):
    return run_main(*args, env_extra={"OMP_NUM_THREADS": "1", **(env_extra or {})})


# A short TRADES run on digits, small enough to train in seconds but better than chance.
E2E_OVERRIDES = {
    "num_train_steps": 100,
    "model.width": 8,
    "model.hidden": 16,
    "model.conv_impl": "xla",
    "batch_size": 32,
    "eval_batch_size": 60,
    "attack.num_steps": 2,
    "attack.eps": 0.05,
    "loss.beta": 1.0,
    "optim.learning_rate": 0.1,
    "ema.decay": 0.9,
    "eval.pgd.num_steps": 0,
    "test.pgd.num_steps": 0,
    **AUTOATTACK_QUICK,
    "eval_every_epochs": 0,
    "progress_bar": False,
}


def test_autoattack_end_to_end_and_bad_exports(tmp_path):
    from score_jax import config_lib, trainer

    config = config_lib.load_config_file(os.path.join(REPO, "configs/digits.py"))
    workdir = tmp_path / "wd"
    config.update_from_flattened_dict(E2E_OVERRIDES)
    trainer.train_and_evaluate(config, str(workdir))  # in-process: one JAX start-up less
    args = ["--config", "configs/digits.py", "--workdir", str(workdir)]
    num = 32
    overrides = {
        **E2E_OVERRIDES,
        "test.autoattack.num_examples": num,
        "test.autoattack.version": "custom",
        "test.autoattack.attacks": "('apgd-ce', 'apgd-t')",
    }  # each field once: a repeated tuple flag appends
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    out = _cli(*args, "--mode", "autoattack")
    assert out.returncode == 0, out.stderr
    print(out.stdout)
    assert "robust accuracy after APGD-CE" in out.stdout  # AutoAttack's progress lines

    with open(workdir / "autoattack.json") as f:
        r = json.load(f)
    assert {
        "clean_accuracy", "robust_accuracy", "num_examples", "eps", "norm", "version", "seconds",
        "pgd20_accuracy", "attacks", "jax_clean_accuracy",
    } <= set(r)  # fmt: skip
    assert (r["num_examples"], r["eps"], r["norm"], r["version"]) == (num, 0.05, "Linf", "custom")
    assert r["attacks"] == ["apgd-ce", "apgd-t"]
    assert r["clean_accuracy"] == r["jax_clean_accuracy"]  # same model in both frameworks
    assert r["robust_accuracy"] <= r["pgd20_accuracy"]  # AutoAttack is the stronger attack
    assert r["robust_accuracy"] <= r["clean_accuracy"]
    assert r["clean_accuracy"] > 0.2  # a trained model, not chance
    assert r["max_linf_perturbation"] <= 0.05 + 1e-6

    export = workdir / "export"
    with open(export / "model.json") as f:
        meta = json.load(f)
    assert meta["architecture"] == "small-cnn" and meta["params"] == "ema"
    assert meta["kwargs"] == {
        "activation": "relu", "width": 8, "hidden": 16, "mean": meta["mean"], "std": meta["std"]
    }  # fmt: skip
    assert (meta["dataset"], meta["norm"], meta["epsilon"], meta["step"]) == (
        "digits", "linf", 0.05, 100
    )  # fmt: skip
    model_pt = export / "model.pt"
    state = torch.load(model_pt, weights_only=True)
    assert set(state) == set(load_exported(str(export)).state_dict())
    assert sorted(os.listdir(export)) == ["model.json", "model.pt"]  # no temp files left

    # The AutoAttack benchmark on this export: both frameworks load the same trained weights.
    from benchmarks import autoattack as bench

    args = ["--export", str(export), "--num-examples", "16", "--batch", "16", "--devices", "1"]
    args += ["--n-iter", "2", "--n-targets", "1", "--n-queries", "5"]
    result = bench.main([*args, "--json", str(tmp_path / "bench.json")])
    assert result["eps"] == 0.05 and result["args"]["norm"] == "linf"
    assert result["jax"]["num_examples"] == 16
    clean = result["jax"]["clean_accuracy"]
    assert clean == pytest.approx(result["torch"]["clean_accuracy"]) and clean > 0.2
    with pytest.raises(SystemExit, match=r"benchmarks\.autoattack: error: .*model\.json"):
        bench.main(["--export", str(tmp_path / "none"), "--json", str(tmp_path / "x.json")])

    # A stale export (older than the checkpoint it should come from) is noticed.
    from score_jax.torch_bridge.autoattack_eval import _stale

    assert _stale(meta, str(workdir)) == ""
    assert "step 60, the workdir's best checkpoint is at step 100" in _stale(
        {**meta, "step": 60}, str(workdir)
    )

    # Bad exports: one line naming the file. A replaced model.pt, even a valid state dict of the
    # right shapes, fails model.json's sha256.
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, model_pt)
    with pytest.raises(CheckpointError, match=r"model\.pt does not match the sha256") as e:
        load_exported(str(export))
    assert "\n" not in str(e.value)
    model_pt.write_bytes(b"not a checkpoint")
    _rehash(export)  # model.json vouches for these bytes: torch.load's error names the file
    with pytest.raises(CheckpointError, match=r"cannot load exported model .*model\.pt") as e:
        load_exported(str(export))
    assert "\n" not in str(e.value)
    torch.save({k: v for k, v in state.items() if k != "logits.bias"}, model_pt)
    _rehash(export)
    with pytest.raises(CheckpointError, match=r"model\.pt does not match .*logits\.bias") as e:
        load_exported(str(export))
    assert "\n" not in str(e.value)
    os.remove(model_pt)
    with pytest.raises(CheckpointError, match=r"cannot read exported model .*model\.pt"):
        load_exported(str(export))
    os.remove(export / "model.json")
    with pytest.raises(CheckpointError, match=r"cannot read export metadata .*model\.json"):
        load_exported(str(export))


def _rehash(export) -> None:
    """Rewrites model.json's sha256 for the current model.pt (as if the export had written it)."""
    with open(export / "model.json") as f:
        meta = json.load(f)
    meta["sha256"] = hashlib.sha256((export / "model.pt").read_bytes()).hexdigest()
    with open(export / "model.json", "w") as f:
        json.dump(meta, f)


def test_custom_attacks_validation():
    from score_jax import config_lib
    from score_jax.torch_bridge.autoattack_eval import custom_attacks

    config = config_lib.base_config()
    aa = config.test.autoattack
    assert (aa.num_examples, config.eval_batch_size, aa.version) == (-1, 256, "standard")
    assert custom_attacks(aa) == []
    aa.version = "custom"
    with pytest.raises(ValueError, match="config.test.autoattack.attacks must list"):
        custom_attacks(aa)
    aa.attacks = ("apgd-ce,apgd-t",)
    assert custom_attacks(aa) == ["apgd-ce", "apgd-t"]
    aa.attacks = ("pgd",)
    with pytest.raises(ValueError, match="unknown"):
        custom_attacks(aa)


def test_autoattack_refuses_multi_process_runs(tmp_path, monkeypatch):
    from score_jax import config_lib
    from score_jax.torch_bridge import autoattack_eval

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="--mode autoattack runs in a single process"):
        autoattack_eval.run_autoattack(config_lib.base_config(), str(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing written


_NO_TORCH = """
import importlib, pkgutil, runpy, sys
sys.modules["torch"] = None  # import torch -> ImportError
sys.modules["pyautoattack"] = None
import score_jax
for m in pkgutil.walk_packages(score_jax.__path__, "score_jax."):
    if ".torch_bridge" not in m.name and m.name != "score_jax.main":
        importlib.import_module(m.name)
import score_jax.torch_bridge
sys.argv = ["score_jax.main", *sys.argv[1:]]
runpy.run_module("score_jax.main", run_name="__main__")
"""


def test_without_torch_modes_fail_with_install_hint(tmp_path):
    out = subprocess.run(
        [
            sys.executable, "-c", _NO_TORCH, "--config", "configs/digits.py",
            "--workdir", str(tmp_path), "--mode", "export",
        ],
        cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("score_jax: error:") and INSTALL_HINT in last, out.stderr
