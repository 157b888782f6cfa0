"""The reported robustness: evaluation in float32 at the highest precision whatever the training
dtype, "standard" AutoAttack only at the standard counts (JAX and --mode autoattack alike), fresh
PGD starts at every validation, and the paper's test evaluators by setting."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from tiny_training import train_adam

from score_jax import config_lib, data, evaluate, models, precision, setup, train
from score_jax.data import digits
from score_jax.evaluators import autoattack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = dict(conv_impl="xla", width=8, hidden=16)
EPS = 0.1


def _pgd_spec(num_steps: int = 3) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(kind="pgd", objective="ce", num_steps=num_steps, step_size=0.025, restarts=1,
             init="uniform", eps=EPS, norm="linf")
    )  # fmt: skip


def _aa_spec(**counts) -> ml_collections.ConfigDict:
    attack = ml_collections.ConfigDict(dict(eps=EPS, norm="linf"))
    spec = autoattack.spec(attack)
    spec.update(counts)
    return spec


REDUCED = dict(apgd_iters=5, fab_iters=3, targets=2, square_queries=20)


@pytest.fixture(scope="module")
def bf16_trained():
    """The digits small CNN trained 100 Adam steps in bfloat16 (float32 parameters), and its
    float32 twin (same architecture, dtype float32) that shares the weights."""
    ds = digits.load()
    model = models.get_model("small-cnn", 10, mean=ds.mean, std=ds.std, dtype=jnp.bfloat16, **KW)
    x = ds.train.images.astype(np.float32) / 255.0
    y = ds.train.labels.astype(np.int32)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def loss(params, stats, xb, yb, key):
        del key
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb)
        return ce.mean(), upd["batch_stats"]

    variables = train_adam(variables, x, y, loss, 100)
    f32 = models.get_model("small-cnn", 10, mean=ds.mean, std=ds.std, dtype=jnp.float32, **KW)
    return ds, model, f32, variables


def test_bf16_model_evaluates_as_its_float32_copy(bf16_trained):
    ds, bf16, f32, variables = bf16_trained
    assert jax.tree.leaves(jax.tree.map(lambda a: a.dtype == jnp.float32, variables))
    split = data.Split(ds.test.images[:120], ds.test.labels[:120])
    mesh = train.make_mesh(jax.devices()[:1])
    key = np.asarray(jax.random.key_data(jax.random.key(4)))
    aa = _aa_spec(version="custom", attacks=("apgd-ce",), apgd_iters=5)
    specs = {"pgd": _pgd_spec(), "autoattack": aa}
    results = {
        name: evaluate.run_evaluators(
            evaluate.compile_steps(model, specs, mesh, batch_size=60, precision=precision),
            variables,
            split,
            60,
            mesh,
            key,
        )  # fmt: skip
        for name, model, precision in (("bf16", bf16, "float32"), ("f32", f32, "model"))
    }
    assert results["bf16"] == results["f32"]
    f32_results = results["f32"]
    assert f32_results["clean_accuracy"] > 0.7 and f32_results["pgd_accuracy"] < 0.9
    assert f32_results["autoattack_accuracy"] < f32_results["clean_accuracy"]
    # Not a vacuous comparison: the model as trained (bf16) computes other logits.
    x = split.images.astype(np.float32) / 255.0
    as_trained = bf16.apply(variables, x, train=False).astype(jnp.float32)
    copy = f32.apply(variables, x, train=False)
    assert float(jnp.max(jnp.abs(as_trained - copy))) > 1e-3


def _ops(lowered_text: str) -> list[str]:
    return [
        line
        for line in lowered_text.splitlines()
        if "stablehlo.dot_general" in line or "stablehlo.convolution" in line
    ]


@pytest.mark.parametrize("precision", ["float32", "model"])
def test_compiled_evaluation_has_no_reduced_precision_op(bf16_trained, precision):
    """The PGD step and an AutoAttack stage of the bf16 model: under "float32" their programs
    hold no bf16 / f16 value and every dot and convolution asks for HIGHEST precision; the
    model as trained ("model") does not (the check can tell)."""
    ds, bf16, _, variables = bf16_trained
    mesh = train.make_mesh(jax.devices()[:1])
    specs = {"pgd": _pgd_spec(), "autoattack": _aa_spec(**REDUCED)}
    steps = evaluate.compile_steps(bf16, specs, mesh, batch_size=32, precision=precision)
    batch = next(iter(data.eval_batches(ds.test, 32)))
    key = np.asarray(jax.random.key_data(jax.random.key(0)))
    pgd = steps["pgd"].lower(variables, train.shard_batch(batch, mesh), key)
    aa_batch = {**batch, "key": np.zeros((32, *key.shape), key.dtype)}
    apgd_t = (
        steps["autoattack"]
        .run.stage_fns["apgd-t"]
        .lower(variables, train.shard_batch(aa_batch, mesh), jnp.int32(0))
    )
    for lowered in (pgd, apgd_t):
        text, compiled = lowered.as_text(), lowered.compile().as_text()
        ops = _ops(text)
        assert len(ops) >= 8  # forward and backward convolutions and dots
        reduced = any(t in s for s in (text, compiled) for t in ("bf16", "f16["))
        highest = all("HIGHEST" in op for op in ops)
        if precision == "float32":
            assert not reduced and highest
        else:
            assert reduced and not highest


def test_eval_precision_is_validated_and_recorded():
    config = config_lib.load_config_file(f"{REPO}/configs/digits.py")
    assert config.eval_precision == "float32"
    config.eval_precision = "bfloat16"
    with pytest.raises(ValueError, match=r"eval_precision"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match=r"eval_precision='tf32'; valid: float32, model"):
        precision.eval_model(models.get_model("small-cnn", 10, **KW), "tf32")


# ---------------------------------------------------------------- honest labels


def test_standard_only_at_the_standard_counts():
    kind = autoattack.KIND
    assert autoattack.reported_version(_aa_spec()) == "standard"
    for field, value in REDUCED.items():
        spec = _aa_spec(**{field: value})
        assert autoattack.reported_version(spec) == "reduced"
        assert kind.result_name("autoattack", spec) == "autoattack_reduced"
        assert kind.record(spec)["version"] == "reduced"
        described = kind.describe(spec)
        assert "reduced" in described and "standard" not in described
    assert kind.result_name("autoattack", _aa_spec()) == "autoattack"
    custom = _aa_spec(version="custom", attacks=("apgd-ce",), **REDUCED)
    assert autoattack.reported_version(custom) == "custom"


def test_reduced_run_reports_reduced_keys(bf16_trained):
    ds, _, f32, variables = bf16_trained
    split = data.Split(ds.test.images[:40], ds.test.labels[:40])
    mesh = train.make_mesh(jax.devices()[:1])
    key = np.asarray(jax.random.key_data(jax.random.key(4)))
    steps = evaluate.compile_steps(f32, {"aa": _aa_spec(**REDUCED)}, mesh, batch_size=40)
    out = evaluate.run_evaluators(steps, variables, split, 40, mesh, key)
    assert "aa_accuracy" not in out and not any(k.startswith("aa_apgd") for k in out)
    assert {"aa_reduced_accuracy", "aa_reduced_apgd_ce_accuracy", "aa_reduced_square_accuracy"}
    assert {"aa_reduced_accuracy", "aa_reduced_square_accuracy"} <= set(out)
    assert evaluate.selection_value(out, ["aa"]) == out["aa_reduced_accuracy"]


def test_mode_autoattack_runs_the_specs_settings():
    """pyautoattack as --mode autoattack configures it: the spec's counts and one restart per
    attack; at the default (standard) spec, exactly what pyautoattack's own "standard" sets."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("pyautoattack")
    from pyautoattack import AutoAttack

    from score_jax.torch_bridge.autoattack_eval import reference_adversary

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))

    def settings(adv) -> dict:
        return {
            "apgd": (adv.apgd.n_iter, adv.apgd.n_restarts),
            "apgd-t": (adv.apgd_targeted.n_iter, adv.apgd_targeted.n_restarts,
                       adv.apgd_targeted.n_target_classes),
            "fab-t": (adv.fab.n_iter, adv.fab.n_restarts, adv.fab.n_target_classes),
            "square": (adv.square.n_queries, adv.square.n_restarts),
        }  # fmt: skip

    own = AutoAttack(net, norm="Linf", eps=EPS, version="standard", device="cpu")
    ours = reference_adversary(net, _aa_spec(), [], seed=0, device="cpu")
    assert settings(ours) == settings(own)
    assert settings(own)["apgd-t"] == (100, 1, 9) and settings(own)["square"] == (5000, 1)
    reduced = reference_adversary(net, _aa_spec(**REDUCED), [], seed=0, device="cpu")
    assert settings(reduced) == {
        "apgd": (5, 1), "apgd-t": (5, 1, 2), "fab-t": (3, 1, 2), "square": (20, 1)
    }  # fmt: skip
    custom = _aa_spec(version="custom", attacks=("apgd-ce", "fab-t"))
    adv = reference_adversary(net, custom, ["apgd-ce", "fab-t"], seed=0, device="cpu")
    assert settings(adv)["apgd"] == (100, 1) and settings(adv)["fab-t"] == (100, 1, 9)


# ---------------------------------------------------------------- validation keys, configs


def test_each_validation_draws_fresh_starts(monkeypatch):
    """evaluate.Evaluation.state's key is fold_in(key(seed + 1), state.step): other PGD starts at
    each validation, as the reference draws new ones every epoch."""
    config = config_lib.load_config_file(f"{REPO}/configs/digits.py")
    config.model.update(conv_impl="xla", width=4, hidden=8)
    s = setup.Setup(config, "/unused", mesh=train.make_mesh(jax.devices()[:1]))
    evaluation = evaluate.Evaluation(s.config, s.model, s.mesh)
    state = s.initial_state()
    keys = []

    def capture(steps, variables, split, batch_size, mesh, key):
        keys.append(np.asarray(key))
        return {"clean_accuracy": 1.0, "pgd_accuracy": 1.0, "num_examples": 1}

    monkeypatch.setattr(evaluate, "run_evaluators", capture)
    for step in (5, 6):
        evaluation.state("eval", state.replace(step=jnp.asarray(step)), s.dataset.validation)
    base = jax.random.key(config.seed + 1)
    want = [np.asarray(jax.random.key_data(jax.random.fold_in(base, t))) for t in (5, 6)]
    np.testing.assert_array_equal(keys[0], want[0])  # ema
    np.testing.assert_array_equal(keys[2], want[1])
    assert not np.array_equal(keys[0], keys[2])


def test_test_evaluators_by_setting():
    """Basic setting: PGD-10 (CE) as Table 1 (without_DDPM/eval_cifar.py) and the standard
    AutoAttack as Table 2; DDPM setting: the standard AutoAttack (Tables 3, 4)."""
    for variant in ("trades-se", "pgd_at-kl", "trades-se,l2"):
        c = config_lib.load_config_file(f"{REPO}/configs/cifar10_basic.py", variant)
        assert (c.test.pgd.num_steps, c.test.pgd.objective) == (10, "ce")
        assert autoattack.reported_version(c.test.autoattack) == "standard"
    for name in ("cifar10_ddpm", "cifar100_ddpm", "cifar10_ddpm_wrn70"):
        c = config_lib.load_config_file(f"{REPO}/configs/{name}.py")
        assert autoattack.reported_version(c.test.autoattack) == "standard"
        assert c.eval_precision == "float32"
