"""An evaluator kind is one definition plus its registration: a toy "noise" kind (accuracy at
x + uniform noise) goes through config validation, a tiny training run's results.json and
title, and agrees with the same computation written out; the import plan of the evaluators."""

import json
import os
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from score_jax import checks, config_lib, evaluate, evaluators, losses, train, trainer
from score_jax.errors import ConfigError
from score_jax.setup import Setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NoiseKind(evaluators.Kind):
    """Toy kind "noise": 1[argmax f(clip(x + u, 0, 1)) = y], u ~ U(-eps, eps) per pixel from
    the example's key; per batch."""

    name = "noise"

    def fields(self) -> dict[str, checks.Check]:
        return {"eps": checks.real(0.0)}

    def check(self, where: str, spec: ml_collections.ConfigDict) -> None:
        checks.require(spec.eps <= 1.0, f"{where}.eps={spec.eps} must be <= 1 (the image box)")

    def describe(self, spec: ml_collections.ConfigDict) -> str:
        return f"uniform noise eps={spec.eps:.4g}"

    def correct(self, spec: ml_collections.ConfigDict) -> evaluators.CorrectFn:
        def correct(logits_fn, x, labels, keys):
            u = jax.vmap(lambda k: jax.random.uniform(k, x.shape[1:], x.dtype, -spec.eps, spec.eps))
            return losses.accuracy(logits_fn(jnp.clip(x + u(keys), 0.0, 1.0)), labels)

        return correct


@pytest.fixture
def noise(monkeypatch) -> evaluators.Kind:
    """NoiseKind registered for one test (the registry is restored after it)."""
    monkeypatch.setattr(evaluators, "KINDS", dict(evaluators.KINDS))
    return evaluators.register(NoiseKind())


def _noise_spec(eps: float) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(kind="noise", eps=eps))


def _tiny_config(eps: float = 0.3) -> ml_collections.ConfigDict:
    """digits with a tiny CNN, 2 steps, PGD-1 and the toy evaluator on the test split."""
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "digits.py"))
    c.model.update(conv_impl="xla", width=4, hidden=8)
    c.batch_size, c.eval_batch_size, c.num_train_steps = 640, 60, 2
    c.optim.schedule = "constant"  # the train step of test_evaluate.py's tiny runs
    c.attack.num_steps = c.eval.pgd.num_steps = c.test.pgd.num_steps = 1
    del c.test["autoattack"]
    c.test.noise = _noise_spec(eps)
    c.eval_every_epochs, c.progress_bar = 0, False
    return c


def test_validation_reads_the_kind(noise):
    config = _tiny_config()
    config_lib.validate(config)
    for field, value, message in (
        ("eps", -0.1, r"config\.test\.noise\.eps=-0\.1 must be a finite number in \[0, inf\)$"),
        ("eps", 1.5, r"config\.test\.noise\.eps=1\.5 must be <= 1 \(the image box\)$"),
        ("radius", 0.1, r"config\.test\.noise\.radius is not a field of a 'noise' evaluator$"),
    ):
        bad = _tiny_config()
        bad.test.noise[field] = value
        with pytest.raises(ConfigError, match=message) as info:
            config_lib.validate(bad)
        assert "\n" not in str(info.value)


def test_an_unregistered_kind_is_refused():
    with pytest.raises(ConfigError, match=r"config\.test\.noise\.kind='noise'; valid: \("):
        config_lib.validate(_tiny_config())


def test_training_reports_the_kind(noise, tmp_path, capsys):
    results = trainer.train_and_evaluate(_tiny_config(), str(tmp_path))
    with open(tmp_path / trainer.RESULTS_FILE) as f:
        saved = json.load(f)
    assert saved == results
    assert saved["evaluators"]["noise"] == {"kind": "noise", "eps": 0.3}
    for params in evaluate.PARAMS:
        assert 0.0 <= saved[f"test_{params}"]["noise_accuracy"] <= 1.0
    assert "noise: uniform noise eps=0.3" in capsys.readouterr().out


def test_the_kind_is_the_computation_written_out(noise):
    """Evaluation.run's noise accuracy = numpy's argmax of the model's logits at clip(x + eps u),
    u from the documented keys; at eps 0, exactly the clean accuracy."""
    config = _tiny_config()
    setup = Setup(config, "/unused", mesh=train.make_mesh(jax.devices()[:1]))
    state = setup.initial_state()
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    split = setup.dataset.validation
    evaluation = evaluate.Evaluation(config, setup.model, setup.mesh)
    eps, batch = 0.5, config.eval_batch_size
    got = evaluation.run({"noise": _noise_spec(eps)}, variables, split)

    # Evaluation's key, then the evaluator's (its name), batch i's, example j's.
    key = jax.random.fold_in(jax.random.key(config.seed + 1), 0)
    name_key = jax.random.fold_in(key, zlib.crc32(b"noise") & 0x7FFFFFFF)
    correct, clean = [], []
    for i, start in enumerate(range(0, len(split), batch)):
        x = split.images[start : start + batch].astype(np.float32) / 255.0
        y = split.labels[start : start + batch]
        batch_key = jax.random.fold_in(name_key, i)
        u = [
            jax.random.uniform(
                jax.random.fold_in(batch_key, j), x.shape[1:], minval=-eps, maxval=eps
            )
            for j in range(len(y))
        ]
        x_noisy = np.clip(x + np.stack(u), 0.0, 1.0)
        for inputs, out in ((x_noisy, correct), (x, clean)):
            logits = np.asarray(setup.model.apply(variables, inputs, train=False))
            out.append(np.argmax(logits, -1) == y)
    assert got["noise_accuracy"] == pytest.approx(np.concatenate(correct).mean())
    assert got["clean_accuracy"] == pytest.approx(np.concatenate(clean).mean())
    assert got["noise_accuracy"] != got["clean_accuracy"]  # the noise changes predictions
    zero = evaluation.run({"noise": _noise_spec(0.0)}, variables, split)
    assert zero["noise_accuracy"] == zero["clean_accuracy"]
