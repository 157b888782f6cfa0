"""score_jax.autoattack against pyautoattack, the independent reference, on the same weights.

Settings are reduced identically on both sides (iterations, queries, target counts) to fit the
CPU budget; eps puts the robust accuracies in a middle range so that parity is not trivial.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("pyautoattack")

from pyautoattack.autoattack import AutoAttack  # noqa: E402
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # noqa: E402
from pyautoattack.fab_projections import projection_l2 as ref_projection_l2  # noqa: E402
from pyautoattack.fab_projections import projection_linf as ref_projection_linf  # noqa: E402
from pyautoattack.fab_pt import FABAttack_PT  # noqa: E402
from pyautoattack.square import SquareAttack  # noqa: E402
from tiny_training import train_adam  # noqa: E402

from score_jax import attacks, autoattack, data, losses, models, train  # noqa: E402
from score_jax.data import digits  # noqa: E402
from score_jax.models.random_weights import random_variables  # noqa: E402
from score_jax.torch_bridge.convert import export_state_dict  # noqa: E402
from score_jax.torch_bridge.models import build_torch_model  # noqa: E402

DIGITS_KW = dict(width=16, hidden=64)
EPS = 0.1  # configs/digits.py's Linf eps
N_PARITY = 360  # the whole digits test split: 1% is 3.6 examples


@pytest.fixture(scope="module")
def digits_model():
    """The digits small CNN trained 250 plain Adam steps, and its PyTorch export."""
    ds = digits.load()
    model = models.get_model(
        "small-cnn", 10, conv_impl="xla", mean=ds.mean, std=ds.std, **DIGITS_KW
    )
    x = ds.train.images.astype(np.float32) / 255.0
    y = ds.train.labels.astype(np.int32)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def loss(params, stats, xb, yb, key):
        del key
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats}, xb, train=True, mutable=["batch_stats"]
        )
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
        return ce, upd["batch_stats"]

    variables = train_adam(variables, x, y, loss, 250)
    tm = build_torch_model("small-cnn", 10, mean=ds.mean, std=ds.std, **DIGITS_KW)
    tm.load_state_dict(export_state_dict("small-cnn", variables), strict=True)
    tm.eval()
    return ds, model, variables, tm


def _torch(x: np.ndarray) -> "torch.Tensor":
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


# ---------------------------------------------------------------- parts against their definitions


def test_dlr_losses_match_formula_and_reference():
    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 3.0, (64, 10)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    t = (y + rng.integers(1, 10, 64)) % 10
    zs = np.sort(z, axis=1)[:, ::-1]  # descending: z_pi1 >= z_pi2 >= ...
    z_y = z[np.arange(64), y]
    others = np.where(np.eye(10, dtype=bool)[y], -np.inf, z).max(axis=1)
    want_untargeted = -(z_y - others) / (zs[:, 0] - zs[:, 2] + 1e-12)
    want_targeted = -(z_y - z[np.arange(64), t]) / (zs[:, 0] - 0.5 * (zs[:, 2] + zs[:, 3]) + 1e-12)
    got_u = np.asarray(autoattack.dlr_loss(z, y))
    got_t = np.asarray(autoattack.dlr_loss_targeted(z, y, t))
    np.testing.assert_allclose(got_u, want_untargeted, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_t, want_targeted, rtol=1e-5, atol=1e-6)

    ref = APGDAttack_targeted(None, eps=0.1, device="cpu")
    ref.y_target = torch.from_numpy(t)
    zt, yt = torch.from_numpy(z), torch.from_numpy(y)
    np.testing.assert_allclose(got_t, ref.dlr_loss_targeted(zt, yt).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_u, ref.dlr_loss(zt, yt).numpy(), rtol=1e-5, atol=1e-6)


def test_checkpoint_schedule_matches_formula_and_reference():
    # The paper: checks after ceil(p_j N) iterations, p_0 = 0, p_1 = 0.22,
    # p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    counts = [i + 1 for i, _ in autoattack.checkpoint_schedule(100)]
    assert counts == [round(100 * q) for q in p[1:]] == [22, 41, 57, 70, 80, 87, 93, 99]

    # pyautoattack: record (iteration, window) at each of its checks on a tiny model.
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 10))
    x, y = torch.rand(4, 3, 2, 2), torch.zeros(4, dtype=torch.long)
    for n_iter in (10, 37, 100):
        ref = APGDAttack(net, n_iter=n_iter, eps=0.1, device="cpu")
        ref.init_hyperparam(x)
        seen = []
        original = ref.check_oscillation

        def record(losses, j, k, *a, original=original, seen=seen, **kw):
            seen.append((j, k))
            return original(losses, j, k, *a, **kw)

        ref.check_oscillation = record
        ref.attack_single_run(x, y)
        assert autoattack.checkpoint_schedule(n_iter) == seen, n_iter


@pytest.mark.parametrize("dim,levels", [(7, 0), (192, 0), (64, 17)])
def test_fab_projections_match_reference(dim, levels):
    rng = np.random.default_rng(dim)
    t = rng.uniform(0.0, 1.0, (128, dim)).astype(np.float32)
    if levels:  # pixel values on a grid (the digits' 17 grey levels): ties in the sorts
        t = np.round(t * (levels - 1)).astype(np.float32) / (levels - 1)
    w = rng.normal(0.0, 1.0, (128, dim)).astype(np.float32)
    w[:, :2] = 0.0  # zero weights take the reference's masked branches
    b = (rng.normal(0.0, 1.0, (128,)) * np.sqrt(dim)).astype(np.float32)
    args = [torch.from_numpy(a) for a in (t, w, b)]
    for ref, ours in (
        (ref_projection_linf, autoattack.projection_linf),
        (ref_projection_l2, autoattack.projection_l2),
    ):
        want = ref(*[a.clone() for a in args]).numpy()
        got = np.asarray(jax.jit(ours)(t, w, b))
        assert np.abs(want).max() > 0.1
        np.testing.assert_allclose(got, want, atol=5e-5)


def test_fab_argsort_is_numpys_stable_argsort():
    from score_jax.autoattack.fab import _argsort

    rng = np.random.default_rng(0)
    rows = np.concatenate(
        [
            rng.normal(size=(4, 50)) * 1e3,  # both signs, wide range
            rng.integers(-3, 4, (4, 50)) / 2.0,  # ties, -0.0 and 0.0 among them
            np.full((1, 50), 1e12),
        ]
    ).astype(np.float32)
    rows[4, :5] = -0.0
    got = np.asarray(jax.jit(jax.vmap(_argsort))(rows))
    np.testing.assert_array_equal(got, np.argsort(rows, axis=1, kind="stable"))


def test_fab_argsort_fallback_for_long_rows():
    """From n = 46341 (n * n >= 2**31, e.g. an ImageNet-sized input) the integer keys would
    overflow and `_argsort` takes jnp.argsort: still numpy's stable order."""
    from score_jax.autoattack.fab import _argsort

    n = 46341
    row = (np.random.default_rng(1).integers(-50, 51, n) / 4.0).astype(np.float32)  # ties
    row[:7] = -0.0
    got = np.asarray(jax.jit(_argsort)(row))
    np.testing.assert_array_equal(got, np.argsort(row, kind="stable"))


@pytest.mark.parametrize("rescale", [False, True])
def test_square_window_schedule_matches_reference(rescale):
    for n_queries in (100, 5000):
        ref = SquareAttack(None, n_queries=n_queries, p_init=0.8, resc_schedule=rescale)
        want = [ref.p_selection(i) for i in range(n_queries)]
        got = [autoattack.window_fraction(i, n_queries, 0.8, rescale) for i in range(n_queries)]
        assert got == want
    assert autoattack.window_size(0.8, 32, 32, "linf") == 29
    assert autoattack.window_size(0.8 / 512, 32, 32, "linf") == 1
    assert autoattack.window_size(0.8 / 8, 32, 32, "l2") == 11  # round(10.1) = 10 -> odd


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_apgd_from_the_same_start_follows_the_reference(digits_model, norm, eps):
    """Deterministic given the start: the reference's run from the same x_init breaks the same
    examples (one may differ: a sign of a near-zero gradient can flip between frameworks)."""
    ds, model, variables, tm = digits_model
    x = ds.test.images[:96].astype(np.float32) / 255.0
    y = ds.test.labels[:96].astype(np.int32)
    direction = np.random.default_rng(0).normal(0.0, 1.0, x.shape)
    if norm == "linf":
        direction = np.sign(direction)
    else:
        direction /= np.sqrt(np.sum(direction**2, axis=(1, 2, 3), keepdims=True))
    start = np.clip(x + eps * direction, 0, 1).astype(np.float32)
    x_adv, robust = jax.jit(
        lambda: autoattack.apgd_run(
            lambda z: model.apply(variables, z, train=False),
            autoattack.apgd.ce_loss,
            x,
            y,
            jax.random.key(0),
            eps=eps,
            norm=norm,
            n_iter=20,
            x_init=start,
        )
    )()
    ref_norm = {"linf": "Linf", "l2": "L2"}[norm]
    ref = APGDAttack(tm, n_iter=20, eps=eps, norm=ref_norm, device="cpu", loss="ce")
    ref.init_hyperparam(_torch(x))
    with torch.no_grad():
        _, acc, _, _ = ref.attack_single_run(_torch(x), torch.from_numpy(y).long(), _torch(start))
    robust, acc = np.asarray(robust), acc.numpy()
    assert 0.2 < acc.mean() < 0.8
    assert (robust != acc).sum() <= 1
    delta = (np.asarray(x_adv) - x).reshape(len(x), -1)
    size = np.abs(delta).max(1) if norm == "linf" else np.sqrt(np.sum(delta**2, axis=1))
    assert size.max() <= eps + 1e-5


@pytest.mark.parametrize("norm,eps", [("linf", EPS), ("l2", 0.5)])
def test_apgd_targeted_from_the_same_start_follows_the_reference(digits_model, norm, eps):
    """APGD-T's run on the targeted DLR loss, target the second-largest clean logit, from the
    same start as pyautoattack's APGDAttack_targeted.attack_single_run: the same breaks (one may
    differ, as for APGD-CE)."""
    ds, model, variables, tm = digits_model
    x = ds.test.images[96:192].astype(np.float32) / 255.0
    y = ds.test.labels[96:192].astype(np.int32)
    logits_fn = lambda z: model.apply(variables, z, train=False)  # noqa: E731
    target = np.argsort(np.asarray(logits_fn(x)), axis=1)[:, -2]
    direction = np.random.default_rng(1).normal(0.0, 1.0, x.shape)
    if norm == "linf":
        direction = np.sign(direction)
    else:
        direction /= np.sqrt(np.sum(direction**2, axis=(1, 2, 3), keepdims=True))
    start = np.clip(x + eps * direction, 0, 1).astype(np.float32)
    _, robust = jax.jit(
        lambda: autoattack.apgd_run(
            logits_fn,
            lambda z, labels: autoattack.dlr_loss_targeted(z, labels, jnp.asarray(target)),
            x,
            y,
            jax.random.key(0),
            eps=eps,
            norm=norm,
            n_iter=20,
            x_init=start,
        )
    )()
    ref = APGDAttack_targeted(tm, n_iter=20, eps=eps, norm={"linf": "Linf", "l2": "L2"}[norm],
                              device="cpu")  # fmt: skip
    ref.init_hyperparam(_torch(x))
    ref.y_target = torch.from_numpy(target).long()
    with torch.no_grad():
        _, acc, _, _ = ref.attack_single_run(_torch(x), torch.from_numpy(y).long(), _torch(start))
    robust, acc = np.asarray(robust), acc.numpy()
    print(norm, "robust", acc.mean(), "differ", (robust != acc).sum())
    assert 0.2 < acc.mean() < 0.9
    assert (robust != acc).sum() <= 1


def test_chunk_sizes_pad_little_and_stay_put():
    """Chunks: equal, a multiple of the device count, at most the batch, padding under an eighth
    of the batch per chunk; a stage keeps its size while the padding stays under a quarter."""
    from score_jax.autoattack.suite import chunk_size

    for batch, devices in ((360, 1), (180, 1), (32, 4), (512, 8)):
        for n in range(1, 3 * batch):
            size = chunk_size(n, batch, devices)
            chunks = -(-n // size)
            assert size % devices == 0 and size <= batch
            assert chunks == -(-n // batch)  # no more calls than full batches would take
            assert chunks * size - n < chunks * (batch / 8 + devices)
    assert chunk_size(98, 360, 1) == 135  # 98 -> the next multiple of 45
    assert chunk_size(90, 360, 1, current=135) == 90  # 135 would pad a third: re-chosen
    assert chunk_size(135, 360, 1) == 135
    assert chunk_size(135, 360, 1, current=180) == 180  # pads a quarter at most: kept


@pytest.mark.parametrize("attack", ["apgd-t", "fab-t"])  # apgd-ce: the same apgd_run
def test_early_stop_keeps_the_flags_and_stops(digits_model, attack):
    """`early_stop` ends a run once no example is left: on a batch with survivors the flags are
    those of the full runs; on a batch that breaks at once the model is called far less often."""
    ds, model, variables, _ = digits_model
    calls = []

    def logits_fn(z):
        jax.debug.callback(lambda: calls.append(1))
        return model.apply(variables, z, train=False)

    x = ds.test.images[:64].astype(np.float32) / 255.0
    y = ds.test.labels[:64].astype(np.int32)
    options = dict(n_iter=20, n_target_classes=3)

    def flags(x, y, eps, early_stop):
        calls.clear()
        run = jax.jit(
            lambda: autoattack.run_attack(
                attack,
                logits_fn,
                x,
                y,
                jax.random.key(1),
                eps=eps,
                norm="linf",
                early_stop=early_stop,
                **options,
            )[1]
        )
        out = np.asarray(run())
        jax.effects_barrier()
        return out, len(calls)

    full, _ = flags(x, y, EPS, False)
    early, _ = flags(x, y, EPS, True)
    assert 0 < full.sum() < len(full)
    if not np.array_equal(early, full):
        # Not a rounding effect (float32's is ~1e-7): adding 1e-5 N(0, 1) noise to the model's
        # input or its logits flips none of these flags, 1e-4 at most one (2-core Xeon,
        # 2026-12-07, the suite's and XLA's default code generation). Say whether the full run
        # even repeats itself.
        again, _ = flags(x, y, EPS, False)
        rerun = (
            "a second full run gives its flags again"
            if np.array_equal(again, full)
            else f"a second full run differs at {np.flatnonzero(again != full).tolist()} "
            "(nondeterministic execution)"
        )
        pytest.fail(
            f"{attack}: early-stop flags differ from the full run's at examples "
            f"{np.flatnonzero(early != full).tolist()}; {rerun}"
        )
    broken_full, n_full = flags(x[:8], y[:8], 0.5, False)
    broken_early, n_early = flags(x[:8], y[:8], 0.5, True)
    assert not broken_full.any() and not broken_early.any()
    assert n_early < n_full / 4, f"{n_early} model calls with early_stop, {n_full} without"


# ---------------------------------------------------------------- parity of each stage


REDUCED = {
    "apgd-ce": dict(n_iter=20),
    "apgd-t": dict(n_iter=10, n_target_classes=3),
    "fab-t": dict(n_iter=10, n_target_classes=3),
    "square": dict(n_queries=100),
}


def _ours_apgd_ce(seeds, model, variables, split) -> list[float]:
    mesh, options = train.make_mesh(), {"apgd-ce": REDUCED["apgd-ce"]}
    kw = dict(eps=EPS, norm="linf", version="custom", attacks=["apgd-ce"], options=options)
    fns = autoattack.make_stage_fns(model, mesh=mesh, **kw)  # compiled once for every seed
    return [
        autoattack.evaluate(model, variables, split, batch_size=N_PARITY, mesh=mesh,
                            key=train.base_key(s), stage_fns=fns, **kw)["robust_accuracy"]
        for s in seeds
    ]  # fmt: skip


def _ref_apgd_ce(seed: int, tm, x: np.ndarray, y: np.ndarray) -> float:
    attack = APGDAttack(tm, n_restarts=1, eps=EPS, norm="Linf", device="cpu", seed=seed,
                        **REDUCED["apgd-ce"])  # fmt: skip
    x_adv = attack.perturb(_torch(x), torch.from_numpy(y).long())
    with torch.no_grad():
        return float((tm(x_adv).argmax(1).numpy() == y).mean())


def test_standard_suite_matches_pyautoattack_per_stage(digits_model):
    ds, model, variables, tm = digits_model
    split = data.Split(ds.test.images[:N_PARITY], ds.test.labels[:N_PARITY])
    x = split.images.astype(np.float32) / 255.0
    y = split.labels.astype(np.int32)
    ours = autoattack.evaluate(
        model,
        variables,
        split,
        eps=EPS,
        norm="linf",
        batch_size=N_PARITY,
        mesh=train.make_mesh(),
        key=train.base_key(0),
        options=REDUCED,
    )

    ref_clean, ref_stages = _reference_suite(tm, x, y, eps=EPS, norm="linf", settings=REDUCED)

    assert ours["clean_accuracy"] == pytest.approx(ref_clean, abs=1e-4)
    assert [s["attack"] for s in ours["stages"]] == list(ref_stages) == list(autoattack.ATTACKS)
    got = {s["attack"]: s["robust_accuracy"] for s in ours["stages"]}
    print("jax", got, "pyautoattack", ref_stages)
    # APGD-CE starts at a random point, drawn by different generators on the two sides: its
    # stage is compared as the mean over three seeds per side (one run ended 4 of 360 examples
    # apart on an AMD EPYC host, 6 seeds per side earlier gave means 0.1% apart).
    got["apgd-ce"] = np.mean([got["apgd-ce"], *_ours_apgd_ce((1, 2), model, variables, split)])
    ref_stages["apgd-ce"] = np.mean(
        [ref_stages["apgd-ce"], *(_ref_apgd_ce(s, tm, x, y) for s in (1, 2))]
    )
    for name in autoattack.ATTACKS:
        assert abs(got[name] - ref_stages[name]) <= 0.01 + 1e-9, (name, got, ref_stages)
    assert 0.2 < got["apgd-ce"] < 0.8  # a middle range: parity is not trivial

    # The JAX suite is at least as strong as the project's PGD-20.
    logits_fn = jax.jit(lambda z: model.apply(variables, z, train=False))
    x_pgd = jax.jit(
        lambda: attacks.pgd(
            attacks.label_objective(logits_fn, y),
            x,
            jax.random.key(0),
            eps=EPS,
            step_size=EPS / 4,
            num_steps=20,
        )
    )()
    pgd20 = float(np.mean(np.asarray(jnp.argmax(logits_fn(x_pgd), -1)) == y))
    assert ours["robust_accuracy"] <= pgd20


def test_square_alone_matches_reference(digits_model):
    """Square's randomness is its own (per-example keys vs one torch stream): on the 540 held-out
    digits the robust accuracies, each the mean of 8 runs with different seeds, agree within 1%
    (one run's accuracy varies by ~1% from seed to seed on either side). FAB-T and Square break
    little after APGD in the suite test, so this is where Square's parity is measured."""
    ds, model, variables, tm = digits_model
    x = np.concatenate([ds.validation.images, ds.test.images]).astype(np.float32) / 255.0
    y = np.concatenate([ds.validation.labels, ds.test.labels]).astype(np.int32)
    logits_fn = lambda z: model.apply(variables, z, train=False)  # noqa: E731
    square = jax.jit(
        lambda key: autoattack.square_attack(logits_fn, x, y, key, eps=EPS, n_queries=100)[1]
    )
    got = np.mean([np.mean(np.asarray(square(jax.random.key(s)))) for s in range(8)])
    yt = torch.from_numpy(y).long()
    runs = []
    for seed in range(8):
        ref = SquareAttack(
            tm, n_queries=100, eps=EPS, p_init=0.8, resc_schedule=False, device="cpu", seed=seed
        )
        with torch.no_grad():
            runs.append((tm(ref.perturb(_torch(x), yt)).argmax(1) == yt).float().mean().item())
    want = float(np.mean(runs))
    print("square jax", got, "pyautoattack", want)
    assert 0.2 < want < 0.9
    assert abs(got - want) <= 0.01


def test_tiny_wrn_random_weights_matches_reference():
    """A WRN (depth 10, width 1, 8x8x3) with random weights, labels = its clean predictions:
    APGD-CE from the same start and the deterministic FAB-T give the reference's flags."""
    kw = dict(depth=10, width=1)
    model = models.get_model("wrn-16-2", 10, conv_impl="xla", **kw)
    x = np.random.default_rng(0).uniform(0.0, 1.0, (48, 8, 8, 3)).astype(np.float32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x[:1], train=False))
    variables = random_variables(shapes, seed=1)
    logits_fn = jax.jit(lambda z: model.apply(variables, z, train=False))
    y = np.asarray(jnp.argmax(logits_fn(x), -1)).astype(np.int32)
    tm = build_torch_model("wrn-16-2", 10, **kw)
    tm.load_state_dict(export_state_dict("wrn-16-2", variables), strict=True)
    tm.eval()
    eps = 0.01
    yt = torch.from_numpy(y).long()

    start = np.clip(x + eps * np.random.default_rng(2).choice([-1.0, 1.0], x.shape), 0, 1)
    start = start.astype(np.float32)
    _, robust = jax.jit(
        lambda: autoattack.apgd_run(
            logits_fn,
            autoattack.apgd.ce_loss,
            x,
            y,
            jax.random.key(0),
            eps=eps,
            n_iter=10,
            x_init=start,
        )
    )()
    ref = APGDAttack(tm, n_iter=10, eps=eps, device="cpu", loss="ce")
    ref.init_hyperparam(_torch(x))
    with torch.no_grad():
        _, acc, _, _ = ref.attack_single_run(_torch(x), yt, _torch(start))
    assert 0.2 < acc.float().mean() < 0.8
    assert (np.asarray(robust) != acc.numpy()).sum() <= 1

    _, robust = jax.jit(
        lambda: autoattack.fab_targeted(logits_fn, x, y, eps=eps, n_iter=10, n_target_classes=2)
    )()
    fab = FABAttack_PT(tm, n_iter=10, eps=eps, targeted=True, n_target_classes=2, device="cpu")
    with torch.no_grad():
        adv = fab.perturb(_torch(x), yt)
        flags = tm(adv).argmax(1) == yt
    assert 0.2 < flags.float().mean() < 0.9
    assert (np.asarray(robust) != flags.numpy()).sum() <= 1


TINY = {  # APGD-CE kept weak so that the later stages have examples to break
    "apgd-ce": dict(n_iter=1),
    "apgd-t": dict(n_iter=3, n_target_classes=2),
    "fab-t": dict(n_iter=3, n_target_classes=2),
    "square": dict(n_queries=40),
}


def test_four_devices_match_one_and_stages_compile_once(digits_model):
    """Same keys, same flags on 4 devices as on 1 for every stage (example i's randomness
    follows its index), targets and the re-gathering between them included; the first stage
    runs on two batches of one bucket size and compiles once."""
    ds, model, variables, _ = digits_model
    split = data.Split(ds.test.images[:64], ds.test.labels[:64])
    settings = dict(eps=EPS, version="custom", attacks=list(TINY), options=TINY)
    results = []
    for devices in (jax.devices()[:4], jax.devices()[:1]):
        mesh = train.make_mesh(devices)
        stage_fns = autoattack.make_stage_fns(model, mesh=mesh, **settings)
        kw = dict(batch_size=32, mesh=mesh, key=train.base_key(3), **settings)
        first = autoattack.evaluate(model, variables, split, stage_fns=stage_fns, **kw)
        compiled = {k: f._cache_size() for k, f in stage_fns.items()}
        assert compiled["clean"] == compiled["apgd-ce"] == 1  # 64 and > 32 examples: 2 batches
        assert max(compiled["apgd-t"], compiled["fab-t"], compiled["square"]) <= 2
        again = autoattack.evaluate(model, variables, split, stage_fns=stage_fns, **kw)
        assert {k: f._cache_size() for k, f in stage_fns.items()} == compiled
        rates = [s["robust_accuracy"] for s in first["stages"]]
        assert [s["robust_accuracy"] for s in again["stages"]] == rates  # same keys, same result
        results.append(first)
    four, one = results
    assert four["clean_accuracy"] == one["clean_accuracy"] > 0.9
    assert [s["robust_accuracy"] for s in four["stages"]] == [
        s["robust_accuracy"] for s in one["stages"]
    ]
    assert four["num_examples"] == one["num_examples"] == 64
    assert [s["attack"] for s in four["stages"]] == list(autoattack.ATTACKS)
    rates = [one["clean_accuracy"], *(s["robust_accuracy"] for s in one["stages"])]
    print("clean and per stage", rates)
    assert four["robust_accuracy"] < four["stages"][0]["robust_accuracy"] < four["clean_accuracy"]


def test_bad_settings_name_the_field(digits_model):
    _, model, _, _ = digits_model
    mesh = train.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="version"):
        autoattack.make_stage_fns(model, eps=EPS, mesh=mesh, version="plus")
    with pytest.raises(ValueError, match="norm"):
        autoattack.make_stage_fns(model, eps=EPS, mesh=mesh, norm="l1")
    with pytest.raises(ValueError, match="unknown"):
        autoattack.make_stage_fns(model, eps=EPS, mesh=mesh, version="custom", attacks=["pgd"])
    with pytest.raises(ValueError, match="batch_size"):
        autoattack.evaluate(model, {}, _EMPTY, eps=EPS, batch_size=0, mesh=mesh, key=None)
    with pytest.raises(ValueError, match="no examples"):
        autoattack.evaluate(model, {}, _EMPTY, eps=EPS, batch_size=8, mesh=mesh, key=None)


_EMPTY = data.Split(np.zeros((0, 8, 8, 1), np.uint8), np.zeros((0,), np.int32))


def test_benchmark_harness_writes_complete_json(tmp_path):
    from benchmarks import autoattack as bench

    out = tmp_path / "aa.json"
    args = ["--model", "small-cnn", "--width", "8", "--hidden", "16", "--train-steps", "20"]
    args += ["--num-examples", "16", "--batch", "16", "--devices", "1", "--n-iter", "2"]
    args += ["--n-targets", "2", "--n-queries", "5", "--json", str(out)]
    result = bench.main(args)
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "autoattack" and saved["eps"] == EPS
    assert saved["machine"]["cpu"] and saved["date"] and len(saved["jax"]["loadavg_before"]) == 3
    assert [s["attack"] for s in saved["jax"]["stages"]] == list(autoattack.ATTACKS)
    # pyautoattack stops listing stages once no example is left
    names = [s["attack"] for s in saved["torch"]["stages"]]
    assert names and names == list(autoattack.ATTACKS)[: len(names)]
    for side in ("jax", "torch"):
        assert saved[side]["seconds"] > 0 and 0 <= saved[side]["robust_accuracy"] <= 1
        assert saved[side]["clean_accuracy"] >= saved[side]["robust_accuracy"]
    assert saved["jax"]["num_examples"] == 16
    assert saved["speedup_jax_over_torch"] == result["speedup_jax_over_torch"] > 0


# ---------------------------------------------------------------- every break verified


def test_verify_breaks_checks_prediction_ball_and_box():
    """A break counts only if f(x_adv) is wrong, ||x_adv - x|| <= eps (float32 slack of order
    1e-6 relative) and x_adv in [0, 1]; flagged breaks failing that are marked bad."""
    x = np.full((6, 2, 2, 1), 0.5, np.float32)
    eps = 0.1
    step = np.zeros_like(x)
    step[:, 0, 0, 0] = [eps, eps, 1.001 * eps, eps, 0.0, eps]  # example 2 leaves the ball
    x_adv = x + step
    x_adv[3, 1, 1, 0] = 1.5  # example 3 leaves the box
    labels = np.zeros((6,), np.int32)
    # Misclassified (class 1) iff pixel (0, 0) moved; example 4 did not move.
    logits_fn = lambda z: jnp.stack([0.55 - z[:, 0, 0, 0], z[:, 0, 0, 0] - 0.55], -1)  # noqa: E731
    robust = np.array([False, True, False, False, False, False])  # the attack's flags
    mask = np.array([1, 1, 1, 1, 1, 0], np.float32)  # example 5 is padding
    for norm in ("linf", "l2"):
        flags, bad = autoattack.verify_breaks(
            logits_fn, x, x_adv, labels, robust, mask, eps=eps, norm=norm
        )
        np.testing.assert_array_equal(flags, [False, False, True, True, True, False])
        np.testing.assert_array_equal(bad, [False, False, True, True, True, False])
    # On the ball's edge as float32 rounds it: accepted, 1e-5 relative beyond: rejected.
    edge = x + np.float32(eps)
    for scale, want_bad in ((1.0, False), (1 + 1e-5, True)):
        x_edge = x + np.float32(eps * scale)
        _, bad = autoattack.verify_breaks(
            logits_fn, x, x_edge, labels, np.zeros(6, bool), np.ones(6), eps=eps, norm="linf"
        )
        assert bad.all() == want_bad and bad.any() == want_bad, scale
    assert np.abs(edge - x).max() != eps  # float32 x + eps - x is not eps exactly


@pytest.mark.parametrize("wrong", ["apgd-t", "square"])
def test_an_attack_stepping_outside_eps_raises(digits_model, monkeypatch, wrong):
    """A deliberately wrong stage (its points pushed 3 eps away, still flagged) stops the
    evaluation with an error naming it; the stages before it ran."""
    from score_jax.autoattack import suite

    ds, model, variables, _ = digits_model
    split = data.Split(ds.test.images[:32], ds.test.labels[:32])
    real = suite.run_attack

    def run_attack(name, logits_fn, x, labels, key, **kw):
        x_adv, robust = real(name, logits_fn, x, labels, key, **kw)
        if name == wrong:  # every point flagged broken, moved outside the ball
            return jnp.clip(x + 3 * kw["eps"] * jnp.sign(x_adv - x + 1e-3), 0, 1), robust & False
        return x_adv, robust

    monkeypatch.setattr(suite, "run_attack", run_attack)
    options = {"apgd-ce": dict(n_iter=5), "apgd-t": dict(n_iter=3, n_target_classes=1),
               "square": dict(n_queries=10)}  # fmt: skip
    with pytest.raises(RuntimeError, match=rf"AutoAttack {wrong}: \d+ examples .* flagged broken"):
        autoattack.evaluate(
            model, variables, split, eps=EPS, version="custom", attacks=list(options),
            options=options, batch_size=32, mesh=train.make_mesh(jax.devices()[:1]),
            key=train.base_key(0),
        )  # fmt: skip


# ---------------------------------------------------------------- parity on an adversarially
# trained model, where the later stages matter


AT_EPS = {"linf": EPS, "l2": 0.5}
# APGD kept weak (both sides alike) so that FAB-T has examples to break: on this model the full
# counts leave FAB-T and Square nothing (83.6% after APGD-CE and after every later stage, on
# both sides, 360 examples, 10 iterations).
AT_SETTINGS = {
    "apgd-ce": dict(n_iter=1),
    "apgd-t": dict(n_iter=1, n_target_classes=2),
    "fab-t": dict(n_iter=10, n_target_classes=2),
    "square": dict(n_queries=100),
}
N_AT = 240


@pytest.fixture(scope="module")
def trades_digits_model(digits_model):
    """The digits CNN trained 200 TRADES-SE steps (beta 6, PGD-5 at Linf 0.1 on the SE between
    clean and adversarial softmax, BatchNorm in eval mode in the attack), and its export."""
    ds, model, _, _ = digits_model
    x = ds.train.images.astype(np.float32) / 255.0
    y = ds.train.labels.astype(np.int32)
    variables = model.init(jax.random.key(0), x[:1], train=False)

    def loss(params, stats, xb, yb, key):
        frozen = {"params": jax.lax.stop_gradient(params), "batch_stats": stats}
        logits_fn = lambda z: model.apply(frozen, z, train=False)  # noqa: E731
        objective = attacks.trades_objective(logits_fn, jax.nn.softmax(logits_fn(xb)), kind="se")
        x_adv = attacks.pgd(objective, xb, key, eps=EPS, step_size=EPS / 4, num_steps=5)
        logits, upd = model.apply(
            {"params": params, "batch_stats": stats},
            jnp.concatenate([xb, x_adv]),
            train=True,
            mutable=["batch_stats"],
        )
        logits_nat, logits_adv = jnp.split(logits, 2)
        return losses.trades_loss(logits_nat, logits_adv, yb, beta=6.0, kind="se"), upd[
            "batch_stats"
        ]

    variables = train_adam(variables, x, y, loss, 200)
    tm = build_torch_model("small-cnn", 10, mean=ds.mean, std=ds.std, **DIGITS_KW)
    tm.load_state_dict(export_state_dict("small-cnn", variables), strict=True)
    tm.eval()
    return ds, model, variables, tm


def _reference_suite(tm, x, y, *, eps, norm, settings) -> tuple[float, dict[str, float]]:
    """pyautoattack's run_standard_evaluation with one restart per attack at `settings`
    (per-attack options, as AT_SETTINGS): (clean accuracy, {attack: robust accuracy after it}),
    read from its log lines."""
    ref_norm = {"linf": "Linf", "l2": "L2"}[norm]
    kw = dict(eps=eps, norm=ref_norm, device="cpu", seed=0)
    adversary = AutoAttack(tm, norm=ref_norm, eps=eps, version="standard", seed=0, device="cpu")
    adversary.apgd = APGDAttack(tm, n_restarts=1, **settings["apgd-ce"], **kw)
    adversary.apgd_targeted = APGDAttack_targeted(tm, n_restarts=1, **settings["apgd-t"], **kw)
    adversary.fab = FABAttack_PT(tm, n_restarts=1, **settings["fab-t"], **kw)
    adversary.square = SquareAttack(tm, p_init=0.8, resc_schedule=False, **settings["square"], **kw)
    log = []

    class Capture:
        def debug(self, msg, *a):
            log.append(msg % a if a else msg)

        info = warning = debug

    adversary.logger = Capture()
    adversary.run_standard_evaluation(_torch(x), torch.from_numpy(y).long(), batch_size=len(y))
    clean, stages = None, {}
    for line in log:
        if line.startswith("robust accuracy after "):
            stages[line.split()[3].rstrip(":").lower()] = float(line.split()[4].rstrip("%")) / 100
        if line.startswith("initial accuracy: "):
            clean = float(line.split()[2].rstrip("%")) / 100.0
    assert clean is not None and list(stages) == list(autoattack.ATTACKS), log
    return clean, stages


def _ref_counts(tm, x, y, *, eps, norm) -> list[int]:
    """pyautoattack's robust counts at AT_SETTINGS, clean then after each stage."""
    clean, stages = _reference_suite(tm, x, y, eps=eps, norm=norm, settings=AT_SETTINGS)
    return [round(r * len(y)) for r in (clean, *stages.values())]


def _jax_counts(model, variables, split, stage_fns, *, eps, norm, attacks) -> list[int]:
    """The JAX suite at AT_SETTINGS (`stage_fns`: make_stage_fns' of every attack at them) with
    `attacks` (a stage left out repeats the count before)."""
    out = autoattack.evaluate(
        model, variables, split, eps=eps, norm=norm, version="custom", attacks=list(attacks),
        batch_size=len(split), mesh=train.make_mesh(jax.devices()[:1]), key=train.base_key(0),
        stage_fns=stage_fns,
    )  # fmt: skip
    got = {s["attack"]: round(s["robust_accuracy"] * len(split)) for s in out["stages"]}
    counts = [round(out["clean_accuracy"] * len(split))]
    for name in autoattack.ATTACKS:
        counts.append(got.get(name, counts[-1]))
    return counts


def _stage_parity(ours: list[int], ref: list[int], n: int) -> list[str]:
    """What differs beyond sampling noise: the robust count after each stage (within 2% of the
    examples) and each stage's own count of newly broken examples (within 2 sqrt(count) + 2)."""
    bad = []
    for i, name in enumerate(autoattack.ATTACKS, start=1):
        if abs(ours[i] - ref[i]) > 0.02 * n:
            bad.append(f"{name}: robust {ours[i]} vs {ref[i]}")
        mine, theirs = ours[i - 1] - ours[i], ref[i - 1] - ref[i]
        if abs(mine - theirs) > 2 * np.sqrt(max(mine, theirs)) + 2:
            bad.append(f"{name}: broke {mine} vs {theirs}")
    return bad


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_stages_match_pyautoattack_on_an_adversarially_trained_model(trades_digits_model, norm):
    """Per stage, robust counts and each stage's newly broken examples as pyautoattack's on the
    same TRADES-SE weights; the same comparison without FAB-T on the JAX side fails (the test
    tells a stage that does nothing)."""
    ds, model, variables, tm = trades_digits_model
    split = data.Split(ds.test.images[:N_AT], ds.test.labels[:N_AT])
    x, y = split.images.astype(np.float32) / 255.0, split.labels.astype(np.int32)
    eps = AT_EPS[norm]
    ref = _ref_counts(tm, x, y, eps=eps, norm=norm)
    # Both JAX runs share the stages' programs (compiled once, the stages before FAB-T alike).
    fns = autoattack.make_stage_fns(
        model, eps=eps, norm=norm, mesh=train.make_mesh(jax.devices()[:1]), version="custom",
        attacks=autoattack.ATTACKS, options=AT_SETTINGS,
    )  # fmt: skip
    ours = _jax_counts(model, variables, split, fns, eps=eps, norm=norm, attacks=autoattack.ATTACKS)
    print(norm, "robust counts, clean then per stage: jax", ours, "pyautoattack", ref)
    assert ours[0] == ref[0]
    assert not _stage_parity(ours, ref, N_AT), (ours, ref)
    assert ref[2] - ref[3] >= 5  # FAB-T breaks examples after APGD-T: a stage that matters
    no_fab = _jax_counts(
        model, variables, split, fns, eps=eps, norm=norm, attacks=("apgd-ce", "apgd-t", "square")
    )
    assert _stage_parity(no_fab, ref, N_AT), (no_fab, ref)
