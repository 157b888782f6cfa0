"""Evaluators (config.eval / config.test), the best-checkpoint selection rule and their plumbing
through the trainer, checked against hand-written references (tiny models, offline data)."""

import json
import os
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from score_jax import attacks, checkpoint, config_lib, data, evaluate, train, trainer
from score_jax.evaluators import pgd

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_CLASSES = 10
SHAPE = (3, 3, 2)


class Linear(nn.Module):
    """logits = flatten(x) W + b."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        init = nn.initializers.normal(0.5)
        return nn.Dense(NUM_CLASSES, kernel_init=init)(x.reshape(x.shape[0], -1))


def _variables():
    return Linear().init(jax.random.key(1), jnp.zeros((1, *SHAPE)))


def _split(n: int = 200, seed: int = 0) -> data.Split:
    """Random images labelled with the model's clean prediction, every 8th label shifted by one
    (clean accuracy 7/8)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *SHAPE), dtype=np.uint8)
    logits = Linear().apply(_variables(), images.astype(np.float32) / 255.0)
    labels = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    labels[::8] = (labels[::8] + 1) % NUM_CLASSES
    return data.Split(images, labels)


def _hand_pgd(logits_fn, x, labels, delta0, *, loss, eps, step_size, num_steps):
    """Linf PGD, written out: start delta0 clipped to the ball and the box, sign steps on the
    summed loss, clip to the ball, clip to the box; 1[argmax f(x_adv) = y]. loss "se": sum_k
    (onehot(y)_k - softmax(f(x'))_k)^2; "ce": -log softmax(f(x'))_y."""
    onehot = jax.nn.one_hot(labels, NUM_CLASSES)

    def objective(x_adv):
        if loss == "se":
            return jnp.sum(jnp.square(onehot - jax.nn.softmax(logits_fn(x_adv))))
        return -jnp.sum(onehot * jax.nn.log_softmax(logits_fn(x_adv)))

    delta = jnp.clip(x + jnp.clip(delta0, -eps, eps), 0.0, 1.0) - x
    for _ in range(num_steps):
        g = jax.grad(lambda d: objective(x + d))(delta)
        delta = jnp.clip(delta + step_size * jnp.sign(g), -eps, eps)
        delta = jnp.clip(x + delta, 0.0, 1.0) - x
    return np.asarray(jnp.argmax(logits_fn(x + delta), -1) == labels)


def _spec(**kw):
    fields = dict(
        kind="pgd", objective="se", num_steps=5, step_size=0.025, restarts=1, init="uniform"
    )
    fields.update(eps=0.1, norm="linf", **kw)
    return ml_collections.ConfigDict(fields)


@pytest.mark.parametrize("init", ["zero", "uniform"])
def test_se_pgd_evaluator_equals_hand_written_loop(init):
    split, variables, spec = _split(), _variables(), _spec(init=init)
    model = Linear()
    mesh = train.make_mesh(jax.devices()[:1])
    key = np.asarray(jax.random.key_data(jax.random.key(7)))
    batch_size = 48  # 200 = 4 full batches + a padded one: the mask must drop the padding
    result = evaluate.run_evaluators(
        evaluate.compile_steps(model, {"pgd_se": spec}, mesh), variables, split, batch_size, mesh,
        key,
    )  # fmt: skip

    def logits_fn(x):
        return model.apply(variables, x, train=False)

    hand = {"se": [], "ce": []}
    clean = []
    name_key = jax.random.fold_in(jax.random.wrap_key_data(key), zlib.crc32(b"pgd_se"))
    for i, start in enumerate(range(0, len(split), batch_size)):
        x = split.images[start : start + batch_size].astype(np.float32) / 255.0
        y = split.labels[start : start + batch_size]
        # The documented keys: batch i: fold_in(name key, i); example j: fold_in(.., j);
        # restart 0: fold_in(.., 0); the start U(-eps, eps).
        batch_key = jax.random.fold_in(name_key, i)
        delta0 = np.zeros_like(x)
        if init == "uniform":
            keys = jax.vmap(lambda j, k=batch_key: jax.random.fold_in(jax.random.fold_in(k, j), 0))(
                jnp.arange(len(y))
            )
            delta0 = jax.vmap(
                lambda k: jax.random.uniform(k, SHAPE, jnp.float32, -spec.eps, spec.eps)
            )(keys)
        for loss in hand:
            hand[loss].append(
                _hand_pgd(logits_fn, x, y, delta0, loss=loss, eps=0.1, step_size=0.025, num_steps=5)
            )
        clean.append(np.asarray(jnp.argmax(logits_fn(x), -1) == y))
    robust = {loss: np.concatenate(v).mean() for loss, v in hand.items()}
    clean = np.concatenate(clean).mean()
    assert result["num_examples"] == len(split)
    assert clean == pytest.approx(7 / 8, abs=0.01)
    assert result["clean_accuracy"] == pytest.approx(clean)
    assert result["pgd_se_accuracy"] == pytest.approx(robust["se"])
    # The check can fail: the attack flips predictions, and PGD-CE would give another number.
    assert 0 < robust["se"] < clean and abs(robust["se"] - robust["ce"]) >= 0.01


def test_four_devices_match_one():
    split, variables = _split(n=40), _variables()
    specs = {"pgd": _spec(objective="ce"), "pgd_se": _spec()}
    key = np.asarray(jax.random.key_data(jax.random.key(3)))
    out = []
    for n in (1, 4):
        mesh = train.make_mesh(jax.devices()[:n])
        steps = evaluate.compile_steps(Linear(), specs, mesh)
        out.append(evaluate.run_evaluators(steps, variables, split, 16, mesh, key))
    assert out[0] == pytest.approx(out[1])
    assert set(out[0]) == {"clean_accuracy", "pgd_accuracy", "pgd_se_accuracy", "num_examples"}


def test_cw_clamped_objective_is_the_reference_cw_loss():
    logits = np.array([[2.0, 1.0, -1.0], [0.5, 3.0, 0.0], [1.0, 1.0, 0.0]], np.float32)
    labels = np.array([0, 0, 1])
    # The reference (core/attacks/utils.py CWLoss, per example): -clamp(z_y - max_{j!=y} z_j, 0).
    real = logits[np.arange(3), labels]
    other = np.where(np.eye(3, dtype=bool)[labels], -1e4, logits).max(1)
    expected = -np.clip(real - other, 0.0, None)
    objective = attacks.eval_objective("cw_clamped", lambda x: x, labels)
    np.testing.assert_allclose(objective(jnp.asarray(logits)), expected)


# --- The selection rule ------------------------------------------------------------------------


def _reference_best_epoch(history: list[tuple[float, float]], ties: str) -> int:
    """The reference's selection, written from without_DDPM/train_cifar.py (min of the two
    accuracies, a new best when > the best so far, which starts at 0) and train-wa.py (>=)."""
    best, best_epoch = 0.0, -1
    for epoch, (ce, div) in enumerate(history, start=1):
        value = min(ce, div)
        if (value > best) if ties == "strict" else (value >= best):
            best, best_epoch = value, epoch
    return best_epoch


# Validation accuracies (CE, training divergence) per epoch of the raw parameters: the min is
# 0.25, 0.28, 0.28, 0.20, 0.27 (a tie at epochs 2 and 3); CE alone would pick epoch 4, the
# divergence alone epoch 5.
RAW_HISTORY = [(0.30, 0.25), (0.28, 0.31), (0.40, 0.28), (0.45, 0.20), (0.27, 0.35)]


def _tiny_config(**overrides):
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "digits.py"))
    c.model.conv_impl = "xla"
    c.model.width = 4
    c.model.hidden = 8
    c.batch_size = 640  # 1257 training images: 2 steps per epoch
    c.optim.schedule = "constant"  # one train-step program for every num_train_steps
    c.eval_batch_size = 60
    c.attack.num_steps = 1
    c.eval.pgd.num_steps = 1
    c.eval.pgd_se = pgd.spec(c.attack, objective="se", num_steps=1, step_size=0.05)
    c.eval.select_by = ("pgd", "pgd_se")
    c.test.pgd.num_steps = 1
    del c.test["autoattack"]  # its own tests: tests/test_autoattack.py, test_train.py
    c.test.pgd_se = pgd.spec(c.attack, objective="se", num_steps=1, step_size=0.05)
    c.eval_every_epochs = 1
    c.checkpoint_every_steps = 100
    c.progress_bar = False
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.parametrize("ties", ["strict", "later"])
def test_selection_follows_the_reference_rule(tmp_path, monkeypatch, ties):
    config = _tiny_config(num_train_steps=2 * len(RAW_HISTORY), best_by="raw")
    config.eval.select_ties = ties
    scripted = iter(RAW_HISTORY)
    real = evaluate.Evaluation.state

    def scripted_validation(self, section, state, split):
        if section != "eval":
            return real(self, section, state, split)
        ce, div = next(scripted)
        raw = {"clean_accuracy": 0.9, "pgd_accuracy": ce, "pgd_se_accuracy": div}
        ema = {"clean_accuracy": 0.9, "pgd_accuracy": 1 - ce, "pgd_se_accuracy": 1 - div}
        return {"ema": {**ema, "num_examples": 180}, "raw": {**raw, "num_examples": 180}}

    monkeypatch.setattr(evaluate.Evaluation, "state", scripted_validation)
    results = trainer.train_and_evaluate(config, str(tmp_path))

    best_epoch = _reference_best_epoch(RAW_HISTORY, ties)
    assert best_epoch == (2 if ties == "strict" else 3)  # the tie decides
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.latest_step(best=True) == 2 * best_epoch
    ckpt.close()
    assert (results["checkpoint"], results["step"]) == ("best", 2 * best_epoch)
    with open(tmp_path / trainer.METRICS_FILE) as f:
        lines = [json.loads(line) for line in f]
    selection = [m["val/selection"] for m in lines if "val/selection" in m]
    assert selection == pytest.approx([min(ce, div) for ce, div in RAW_HISTORY])


# --- Config plumbing ---------------------------------------------------------------------------


def _parse(argv: list[str]) -> ml_collections.ConfigDict:
    """The config `python -m score_jax.main --config ... <argv>` would run (main's flag)."""
    values = flags.FlagValues()
    argv = ["prog", *argv]
    config_flags.DEFINE_config_file(
        "config", None, "", flag_values=values, lock_config=True, sys_argv=argv
    )
    values(argv)
    return values.config


def test_eval_and_test_eps_follow_attack_eps_until_set():
    basic = os.path.join(REPO, "configs", "cifar10_basic.py") + ":trades-se"
    config = _parse([f"--config={basic}", "--config.attack.eps=0.05"])
    assert config.attack.eps == 0.05
    assert config.eval.pgd.eps == config.eval.pgd_se.eps == config.test.pgd.eps == 0.05
    config = _parse([f"--config={basic}", "--config.test.pgd.eps=0.03", "--config.attack.norm=l2"])
    assert config.test.pgd.eps == 0.03  # set: no longer follows
    assert config.attack.eps == config.eval.pgd.eps == pytest.approx(8 / 255)
    assert config.eval.pgd.norm == config.test.pgd.norm == "l2"
    ddpm = _parse([f"--config={os.path.join(REPO, 'configs', 'cifar10_ddpm.py')}:l2"])
    assert ddpm.eval.pgd_cw.eps == ddpm.test.pgd.eps == pytest.approx(128 / 255)


def test_paper_configs_select_as_the_reference():
    load = config_lib.load_config_file
    se = load(os.path.join(REPO, "configs", "cifar10_basic.py"), "pgd_at-se")
    kl = load(os.path.join(REPO, "configs", "cifar10_basic.py"), "trades-kl")
    ddpm = load(os.path.join(REPO, "configs", "cifar10_ddpm.py"))
    assert (se.best_by, se.eval_every_epochs, se.eval.select_ties) == ("raw", 1, "strict")
    assert se.eval.select_by == ("pgd", "pgd_se")
    assert (se.eval.pgd.objective, se.eval.pgd_se.objective) == ("ce", "se")
    for spec in (se.eval.pgd, se.eval.pgd_se):
        assert (spec.num_steps, spec.init, spec.step_size) == (10, "uniform", 2 / 255)
    assert kl.eval.select_by == ("pgd",) and "pgd_kl" not in kl.eval
    assert (ddpm.best_by, ddpm.eval_every_epochs, ddpm.eval.select_ties) == ("ema", 1, "later")
    assert ddpm.eval.select_by == ("pgd_cw",)
    assert (ddpm.eval.pgd_cw.objective, ddpm.eval.pgd_cw.num_steps) == ("cw_clamped", 40)
    assert (ddpm.test.pgd.objective, ddpm.test.pgd.num_steps) == ("ce", 20)


def test_export_params_auto_is_the_selected_params():
    pytest.importorskip("torch")
    from score_jax.torch_bridge import export

    basic = config_lib.load_config_file(os.path.join(REPO, "configs", "cifar10_basic.py"))
    ddpm = config_lib.load_config_file(os.path.join(REPO, "configs", "cifar10_ddpm.py"))
    assert export.resolve_params(basic, "auto") == "raw"
    assert export.resolve_params(ddpm, "auto") == "ema"
    assert export.resolve_params(basic, "ema") == "ema"
    with pytest.raises(ValueError, match="--export_params='best'"):
        export.resolve_params(basic, "best")


# --- End to end --------------------------------------------------------------------------------


def test_results_and_metrics_carry_every_evaluator(tmp_path):
    config = _tiny_config(num_train_steps=2)
    results = trainer.train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / trainer.RESULTS_FILE) as f:
        saved = json.load(f)
    assert saved == results
    assert set(saved["evaluators"]) == {"pgd", "pgd_se"}
    assert saved["evaluators"]["pgd_se"]["objective"] == "se"
    assert saved["evaluators"]["pgd"]["eps"] == pytest.approx(0.1)  # config.attack's
    for params in ("ema", "raw"):
        row = saved[f"test_{params}"]
        assert set(row) == {"clean_accuracy", "pgd_accuracy", "pgd_se_accuracy", "num_examples"}
        assert row["num_examples"] == 360
        assert row["pgd_accuracy"] <= row["clean_accuracy"]
    with open(tmp_path / trainer.METRICS_FILE) as f:
        lines = [json.loads(line) for line in f]
    val = [m for m in lines if "val/selection" in m]
    test = [m for m in lines if any(k.startswith("test/") for k in m)]
    assert [m["step"] for m in val] == [2] and [m["step"] for m in test] == [2]
    speed = [m for m in lines if "perf/images_per_s" in m]  # one line per log step, apart
    assert speed and all(set(m) == {"step", "perf/images_per_s"} for m in speed)
    assert all(m["perf/images_per_s"] > 0 for m in speed)
    assert val[0]["val/selection"] == min(
        val[0]["val/ema_pgd_accuracy"], val[0]["val/ema_pgd_se_accuracy"]
    )
    assert test[0] == {
        "step": 2,
        **{f"test/{p}_{k}": v for p in ("ema", "raw") for k, v in saved[f"test_{p}"].items()
           if k != "num_examples"},
    }  # fmt: skip

    # --mode eval again: the test lines are replaced, not repeated.
    trainer.evaluate_workdir(config, str(tmp_path))
    with open(tmp_path / trainer.METRICS_FILE) as f:
        again = [json.loads(line) for line in f]
    assert len(again) == len(lines) and again[-1] == test[0]
