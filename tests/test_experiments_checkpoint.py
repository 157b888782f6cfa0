"""The trained-checkpoint experiments (experiments/obfuscation_check.py, semantic_gradients.py,
loss_table.py) end to end on tiny digits models."""

import json
import os
import sys

import pytest

from score_jax import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from experiments import loss_table, obfuscation_check, semantic_gradients  # noqa: E402


@pytest.fixture(scope="module")
def quick_table(tmp_path_factory):
    """`loss_table.py --quick` (two tiny models, 40 steps each): (its output dir, results)."""
    pytest.importorskip("pyautoattack")
    out = str(tmp_path_factory.mktemp("loss_table"))
    return out, loss_table.main(["--out", out, "--quick", "--jax_cache", "none"])


@pytest.fixture(scope="module")
def robust_workdir(quick_table):
    """The quick table's TRADES-SE run: a tiny robustly trained model (its workdir)."""
    return os.path.join(quick_table[0], "runs", "trades-se-s0")


@pytest.fixture(scope="module")
def undefended_workdir(tmp_path_factory):
    """A tiny digits model trained without attack: the SE loss on clean images, as TRADES-SE with
    beta 0 and 0 attack steps, here written as PGD-AT-SE with a 0-step attack from delta = 0
    (x_adv = x; a simpler program that compiles faster)."""
    c = loss_table.make_config(loss_table.ROWS["pgd_at-se"], 0, loss_table.QUICK)
    c.attack.num_steps = 0
    c.attack.init = "zero"
    workdir = str(tmp_path_factory.mktemp("undefended"))
    trainer.train_and_evaluate(c, workdir)
    return workdir


def test_loss_table_quick(quick_table):
    out, r = quick_table
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == r
    rows = r["rows"]
    assert list(rows) == list(loss_table.QUICK_ROWS)
    for row in rows.values():
        assert row["clip_c"] is None and row["divergence"] == "se"
        for metric in loss_table.METRICS:
            assert len(row[metric]["values"]) == 1 and row[metric]["std"] == 0.0
            assert all(0.0 <= v <= 1.0 for v in row[metric]["values"])
        for aa, pgd in zip(row["autoattack"]["values"], row["pgd20"]["values"], strict=True):
            assert aa <= pgd + 1e-9
        assert row["autoattack"]["mean"] <= row["pgd20"]["mean"] + 1e-9
        assert row["num_examples"] == loss_table.QUICK.aa_examples
    with open(os.path.join(out, "loss_table.md")) as f:
        table = f.read()
    assert table.count("| 2 | ") == 2 and "PGD-AT" in table and "TRADES" in table
    assert os.path.getsize(os.path.join(out, "loss_table.png")) > 0
    # A second call reuses the finished runs (same settings) instead of training again.
    again = loss_table.run(out, quick=True)
    assert again["rows"] == rows and again["seconds"] < 10


def test_obfuscation_check_reaches_zero(robust_workdir, tmp_path):
    out = str(tmp_path / "obf")
    args = ["--workdir", robust_workdir, "--out", out, "--num_examples", "60", "--quick"]
    r = obfuscation_check.main([*args, "--eps_255", "0,255"])  # quick: PGD-10 x 2 restarts
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == r
    assert os.path.getsize(os.path.join(out, "obfuscation.png")) > 0
    eps, acc = r["eps"], r["accuracy"]
    assert eps == [0.0, 0.1, 1.0]  # the training eps is always added
    assert len(acc) == len(eps) and 1.0 >= acc[0] >= 0.0
    assert r["reaches_zero"] is True and acc[-1] == 0.0
    for a, b in zip(acc, acc[1:], strict=False):  # non-increasing up to one example of noise
        assert b <= a + 1 / r["num_examples"] + 1e-9
    assert (r["num_steps"], r["restarts"], r["num_examples"]) == (10, 2, 60)


def test_obfuscation_eps_grid():
    config = loss_table.digits_config()
    full = obfuscation_check.eps_grid(config, (8, 8, 1), quick=False)
    assert full[0] == 0.0 and full[-1] == 1.0 and full == sorted(full) and 0.1 in full
    assert len(full) == len(obfuscation_check.EPS_255) + 1
    config.attack.norm = "l2"
    assert obfuscation_check.eps_grid(config, (8, 8, 1), quick=True)[-1] == 8.0  # sqrt(64)


def test_semantic_gradients(robust_workdir, undefended_workdir, tmp_path):
    out = str(tmp_path / "sem")
    args = ["--workdir", robust_workdir, "--undefended_workdir", undefended_workdir, "--out", out]
    r = semantic_gradients.main([*args, "--num_images", "3", "--num_examples", "100"])
    assert os.path.getsize(os.path.join(out, "semantic_gradients.png")) > 0
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f) == r
    assert 0.0 < r["chance_on_stroke"] < 1.0 and r["num_examples"] == 100
    assert r["top_pixels_per_image"] == 7  # ceil(10% of 8 x 8)
    assert len(r["shown_test_indices"]) == 3
    assert set(r["models"]) == {"robust", "undefended"}
    assert r["models"]["undefended"]["checkpoint"] == "last"
    for m in r["models"].values():
        assert 0.0 <= m["clean_accuracy"] <= 1.0
        for name in semantic_gradients.MAPS:
            assert 0.0 <= m[name]["top10_on_stroke"] <= 1.0
            assert -1.0 <= m[name]["corr_with_image"] <= 1.0


def test_top_mask_picks_largest_absolute_values():
    import numpy as np

    score = np.zeros((1, 4, 5))
    score[0, 1, 2], score[0, 3, 4] = -5.0, 4.0
    mask = semantic_gradients.top_mask(score, fraction=0.1)  # ceil(2.0) = 2 pixels
    assert mask.sum() == 2 and mask[0, 1, 2] and mask[0, 3, 4]


def test_loss_table_rows_and_clip_thresholds():
    from score_jax import losses

    assert len(loss_table.DEFAULT_ROWS) == 12
    kinds = {loss_table.ROWS[n].divergence for n in loss_table.DEFAULT_ROWS}
    assert kinds == set(losses.DIVERGENCES)
    pgd_clip, trades_clip = loss_table.ROWS["pgd_at-se-clip"], loss_table.ROWS["trades-se-clip"]
    assert losses.clip_bound(pgd_clip.clip_c, 10, "se") == pytest.approx(0.1778, abs=1e-4)
    assert losses.clip_bound(trades_clip.clip_c, 10, "se") == pytest.approx(0.1, abs=1e-6)
    config = loss_table.make_config(loss_table.ROWS["trades-kl"], 2, loss_table.FULL)
    assert (
        config.seed,
        config.loss.method,
        config.loss.divergence,
        config.optim.learning_rate,
    ) == (
        2,
        "trades",
        "kl",
        0.1,
    )
    assert config.loss.clip_c is None and config.attack.init == "normal"
