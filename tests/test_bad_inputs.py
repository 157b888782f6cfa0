"""Bad input and faults: each gets one clear line (a ScoreError naming the field or file), a
non-zero exit, and nothing lost or wrong accepted. docs/bad_inputs.md tables what each case shows.

One tiny digits run (4 steps, checkpoints at 2 and 4, best at 4) is trained once per module and
copied for each case that damages or resumes it.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import shipped
from cli_helpers import AUTOATTACK_QUICK, run_main
from test_train import REPO, load_config, tiny_config

from score_jax import checkpoint, config_checks, config_lib, optim, train, trainer
from score_jax.errors import (
    CheckpointError,
    ConfigError,
    DivergedError,
    WorkdirError,
)
from score_jax.lock import WorkdirLock

# Width 32 (the digits config's own): arrays large enough that orbax stores them raw (smaller
# ones sit in checksummed OCDBT nodes, where a bit flip is already a read error). The digits
# config's cosine schedule (tiny_config's is constant): the run-length tests change its length.
FIXTURE = {"num_train_steps": 4, "checkpoint_every_steps": 2, "model.width": 32}
FIXTURE["optim.schedule"] = "cosine"


def fixture_config(**overrides):
    return tiny_config(**{**FIXTURE, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
    workdir = str(tmp_path_factory.mktemp("trained") / "wd")
    trainer.train_and_evaluate(fixture_config(), workdir)
    return workdir


@pytest.fixture
def workdir(trained, tmp_path) -> str:
    """A private copy of the trained workdir."""
    path = str(tmp_path / "wd")
    shutil.copytree(trained, path)
    return path


def _cli(*args, timeout=300):
    return run_main(*args, timeout=timeout)


def _fixture_args(workdir: str) -> list[str]:
    overrides = {
        "model.conv_impl": "xla",
        "model.width": 32,
        "model.hidden": 8,
        "batch_size": 16,
        "eval_batch_size": 60,
        "num_train_steps": 4,
        "checkpoint_every_steps": 2,
        "attack.num_steps": 2,
        "eval.pgd.num_steps": 2,
        "test.pgd.num_steps": 2,
        **AUTOATTACK_QUICK,
        "eval_every_epochs": 0,
        "log_every_steps": 2,
        "progress_bar": False,
    }
    return ["--config", "configs/digits.py", "--workdir", workdir] + [
        f"--config.{k}={v}" for k, v in overrides.items()
    ]


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    """The run failed with exactly one `score_jax: error:` line and no traceback through the
    project's code (orbax's threads may print "Event loop is closed" after a failed restore)."""
    assert out.returncode != 0, out.stdout[-2000:]
    assert not re.search(r'File ".*score_jax/', out.stderr), out.stderr[-3000:]
    lines = re.findall(r"score_jax: error: [^\n]*", out.stderr)  # orbax's noise may interleave
    assert len(lines) == 1, out.stderr[-3000:]
    return lines[0]


# ----------------------------------------------------------------------------- config fields

BAD_FIELDS = [
    ("log_every_steps", 0),
    ("optim.warmup_div", 0.0),
    ("loss.beta", float("inf")),
    ("augment.crop_padding", -1),
    ("keep_checkpoints", 0),
    ("optim.momentum", -1.0),
    ("optim.momentum", 1.0),
    ("optim.weight_decay", -1.0),
    ("optim.grad_clip_norm", -1.0),
    ("optim.learning_rate", float("inf")),
    ("optim.learning_rate", float("nan")),
    ("optim.lr_decay_factor", 0.0),
    ("optim.lr_boundaries_epochs", (105, 100)),
    ("optim.warmup_fraction", 1.5),
    ("ema.warmup_fraction", -0.1),
    ("attack.eps", float("nan")),
    ("attack.step_size", float("inf")),
    ("seed", -1),
    ("num_train_steps", 0),
    ("eval_every_epochs", -1),
    ("checkpoint_every_steps", 0),
    ("dataset.num_validation", -1),
    ("model.activation", "gelu"),
    ("model.conv_impl", "cudnn"),
    ("model.width", 0),
    ("eval.pgd.restarts", 0),
    ("test.pgd.init", "zeros"),
    ("test.pgd.eps", -0.1),
    ("test.autoattack.targets", 0),
    ("test.autoattack.attacks", ("apgd-ce", "pgd")),
    ("eval.select_ties", "first"),
    ("attack.batchnorm", "train"),
    ("optim.schedule_unit", "day"),
    ("optim.max_momentum", 1.0),
    ("augment.rotation_degrees", -1.0),
    ("dataset.validation_order", "random"),
    ("dataset.epoch_size", -1),
    ("model.init_scheme", "xavier"),
    ("test.autoattack.version", "fast"),
    ("test.autoattack.attacks", ("apgd-ce", "pgd")),
    ("test.autoattack.num_examples", 0),
    ("eval_batch_size", 0),
    # Weak inputs (issue 28): each was accepted, or failed deep inside.
    ("seed", 2**64),  # an OverflowError traceback in JAX
    ("seed", 2**32),  # the same JAX key as seed 0 without jax_enable_x64
    ("attack.eps", 2.0),  # inputs are in [0, 1]: a Linf radius > 1 is every image
    ("eval.pgd.eps", 1.5),
    ("test.pgd.eps", 2.0),  # reported 0% robust accuracy
    ("test.autoattack.eps", 2.0),
    ("dataset.num_validation", 100000),  # digits' split is fixed: silently ignored
    ("batch_size", 100000),  # more than the 1257 digits training images: one 166 s step
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_each_bad_field_is_a_config_error_naming_it(field, value):
    config = tiny_config()
    config.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError, match=rf"^config\.{field}=") as info:
        config_lib.validate(config)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"attack.step_size": 0.0}, r"config\.attack\.step_size=0.0 must be > 0"),
        ({"test.autoattack.attacks": ()}, r"config\.test\.autoattack\.attacks must list"),
        ({"model.depth": 10}, r"config\.model\.depth is not a field of model 'small-cnn'"),
        ({"batch_size": 18}, r"config\.batch_size=18 .* device count 4"),
        ({"test.pgd.eps": 2.0}, r"config\.test\.pgd\.eps=2.0 must be <= 1 for norm 'linf'"),
        (
            {"attack.norm": "l2", "attack.eps": 8.5},
            r"config\.attack\.eps=8.5 must be <= sqrt\(64\) for norm 'l2'",
        ),
        ({"dataset.num_validation": 100000}, r"digits has a fixed split .*; set 180"),
        ({"batch_size": 100000}, r"batch_size=100000 takes .* the 1257 of the digits training"),
    ],
)
def test_relations_between_fields(overrides, match):
    config = tiny_config()
    if "model.depth" in overrides:
        config.model.depth = overrides.pop("model.depth")  # a field no small-cnn has
    config.update_from_flattened_dict(overrides)
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(config, num_devices=4)


def test_radii_and_batch_sizes_within_the_bounds_are_accepted():
    """The bounds are those of the image box and the split: at them, a config validates."""
    for overrides in (
        {"test.pgd.eps": 1.0, "attack.eps": 1.0, "batch_size": 1257},
        {"attack.norm": "l2", "attack.eps": 8.0, "test.pgd.norm": "l2", "test.pgd.eps": 2.0},
        {"seed": 2**32 - 2},
    ):
        config = tiny_config()
        config.update_from_flattened_dict(overrides)
        config_lib.validate(config)


def test_variant_of_a_config_without_variants_is_a_config_error():
    with pytest.raises(ConfigError, match=r"config variant 'foo': unknown options"):
        load_config("cifar10_ddpm", "foo")


def _shipped_configs():
    yield "base", config_lib.base_config()
    for key, spec in shipped.shipped().items():
        yield key, shipped.load(*spec)


def test_every_field_of_every_shipped_config_has_a_check():
    """A field that validate() never checks is a defect: add a check to
    config_checks.field_checks() (or list the field in config_checks.FREE_FORM). Every variant
    of every file in configs/ (tests/shipped.py finds them)."""
    for name, config in _shipped_configs():
        unchecked = [
            f for f in config_checks.leaves(config) if not config_checks.is_checked(f, config)
        ]
        assert not unchecked, f"{name}: fields without a check: {unchecked}"
        config_lib.validate(config, num_devices=4)  # and each shipped config passes them


def test_bad_config_fails_before_anything_is_written(tmp_path):
    workdir = tmp_path / "wd"
    with pytest.raises(ConfigError, match=r"config\.augment\.crop_padding=-1"):
        trainer.train_and_evaluate(tiny_config(**{"augment.crop_padding": -1}), str(workdir))
    assert not workdir.exists()


# ----------------------------------------------------------------------------- command line


def test_cli_unknown_section_and_variant_are_one_line_naming_them(tmp_path):
    args = ["--workdir", str(tmp_path / "wd")]
    line = _one_error_line(_cli("--config", "configs/digits.py", *args, "--config.foo.bar=1"))
    assert "config.foo.bar is not a field of configs/digits.py (unknown section 'foo')" in line
    line = _one_error_line(_cli("--config", "configs/digits.py:foo", *args))
    assert "configs/digits.py has no variants (got 'foo')" in line
    line = _one_error_line(_cli("--config", "configs/digits.py", *args, "--config.loss.beta=inf"))
    assert "config.loss.beta=inf must be a finite number" in line
    line = _one_error_line(_cli("--config", "configs/nope.py", *args))  # was a traceback
    assert "--config configs/nope.py: no such file 'configs/nope.py'" in line
    assert not (tmp_path / "wd").exists()


_MAIN_RAISING = textwrap.dedent(
    """
    import sys
    from absl import app
    from score_jax import errors, main, trainer

    def raise_it(config, workdir):
        raise {error}

    trainer.train_and_evaluate = raise_it
    sys.argv = ["score_jax", "--config", "configs/digits.py", "--workdir", sys.argv[1]]
    app.run(main.main, flags_parser=main.parse_flags)
    """
)


@pytest.mark.parametrize(
    "error,one_line",
    [
        ("errors.DataError('DDPM data x.npz: field image: bad')", True),
        ("ValueError('a bug deep inside: not bad input')", False),
        ("OSError(5, 'Input/output error')", False),
    ],
)
def test_main_prints_score_errors_as_one_line_and_keeps_other_tracebacks(tmp_path, error, one_line):
    code = _MAIN_RAISING.format(error=error)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if one_line:
        assert _one_error_line(out) == "score_jax: error: DDPM data x.npz: field image: bad"
    else:
        assert out.returncode != 0 and "Traceback" in out.stderr
        assert "score_jax: error:" not in out.stderr


# ----------------------------------------------------------------------------- divergence


def test_train_step_discards_an_update_to_infinite_parameters():
    """lr = inf passes no validation, so the guard is tested on the step itself: loss and
    gradient at the old parameters are finite, the updated state is not."""
    config = tiny_config()
    setup = trainer.Setup(config, "/unused")
    mesh = train.make_mesh(jax.devices()[:1])
    lr = optax.constant_schedule(np.inf)
    tx = optim.make_optimizer(config.optim, lr)
    state = train.create_train_state(setup.model, tx, setup.dataset.image_shape, config.seed)
    state = train.replicate(state, mesh)
    before = jax.device_get(state)
    step_fn = train.compile_train_step(setup.model, config, lr, setup.ema_warmup_steps, mesh)
    new, metrics = step_fn(state, train.shard_batch(setup.batcher.batch(0), mesh), setup.key)
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
    assert metrics["finite"] == 0 and metrics["finite_params"] == 0
    assert metrics["finite_loss"] == 1 and metrics["finite_grad_norm"] == 1
    for a, b in zip(jax.tree.leaves(jax.device_get(new)), jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)  # the state is unchanged, step included


def test_resume_with_a_huge_learning_rate_stops_and_keeps_the_finite_checkpoint(workdir, capsys):
    config = fixture_config(
        num_train_steps=6, resume_ignore_mismatch=True, resume_extend=True, checkpoint_every_steps=1
    )
    config.optim.learning_rate = 1e30
    config.optim.schedule = "constant"
    with pytest.raises(DivergedError, match=r"diverged at step 5: non-finite .*params") as info:
        trainer.train_and_evaluate(config, workdir)
    assert "newest checkpoint is step 4" in str(info.value) and "\n" not in str(info.value)
    assert "Changing the run from 4 to 6 steps at step 4" in capsys.readouterr().out
    ckpt = checkpoint.Checkpointer(workdir)
    assert ckpt.all_steps() == [2, 4]  # nothing diverged was written
    state, _ = ckpt.restore(trainer.Setup(fixture_config(), workdir).initial_state())
    ckpt.close()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) < 1e6


# ----------------------------------------------------------------------------- checkpoints


def _template():
    return trainer.Setup(fixture_config(), "/unused").initial_state()


def _restore_unverified(workdir: str, step: int, best: bool):
    """The state as orbax restores it, without the checksum check (today's restore)."""
    ckpt = checkpoint.Checkpointer(workdir)
    manager = ckpt.best if best else ckpt.last
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _template())
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return jax.device_get(restored["state"])
    except Exception:  # noqa: BLE001 - orbax noticed this damage itself
        return None
    finally:
        ckpt.close()


def _flip_a_bit_orbax_does_not_notice(workdir: str, step: int, best: bool = False) -> None:
    """Flips one bit of a data file of the checkpoint such that orbax restores it without an
    error but with changed values (bit rot the format itself does not catch)."""
    original = _restore_unverified(workdir, step, best)
    step_dir = os.path.join(workdir, "best" if best else "checkpoints", str(step), "state")
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(step_dir)
        if os.path.basename(root) == "d"
        for name in names
    ]
    for path in sorted(files, key=os.path.getsize, reverse=True)[:2]:
        with open(path, "rb") as f:
            data = f.read()
        for fraction in (0.5, 0.6, 0.7, 0.4, 0.8, 0.3):
            damaged = bytearray(data)
            damaged[int(len(data) * fraction)] ^= 0x10
            with open(path, "wb") as f:
                f.write(bytes(damaged))
            restored = _restore_unverified(workdir, step, best)
            if restored is not None and any(
                not np.array_equal(a, b)
                for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(original), strict=True)
            ):
                return
            with open(path, "wb") as f:
                f.write(data)
    raise AssertionError(f"no silent bit flip found in {step_dir}")


def test_bit_flip_in_a_checkpoint_is_detected_and_fallback_resumes(workdir, trained):
    _flip_a_bit_orbax_does_not_notice(workdir, 4)
    config = fixture_config()
    with pytest.raises(CheckpointError, match=r"checkpoints/4 is corrupt: the checksum") as info:
        trainer.train_and_evaluate(config, workdir)
    assert "resume_fallback" in str(info.value) and "\n" not in str(info.value)
    config.resume_fallback = True
    results = trainer.train_and_evaluate(config, workdir)  # from step 2, step 4 written again
    assert results["step"] == 4
    again = _restore_unverified(workdir, 4, best=False)
    first = _restore_unverified(trained, 4, best=False)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(first), strict=True):
        np.testing.assert_array_equal(a, b)  # the same step 4 as the undamaged run


def test_eval_and_export_on_a_corrupt_best_checkpoint_name_it_and_fall_back(workdir):
    _flip_a_bit_orbax_does_not_notice(workdir, 4, best=True)
    with pytest.raises(CheckpointError, match=r"best/4 is corrupt.*resume_fallback"):
        trainer.evaluate_workdir(fixture_config(), workdir)
    results = trainer.evaluate_workdir(fixture_config(resume_fallback=True), workdir)
    assert (results["checkpoint"], results["step"]) == ("last", 4)


def test_cli_eval_and_export_on_a_truncated_checkpoint_are_one_line(workdir):
    for sub in ("checkpoints/4", "best/4"):
        for root, _, files in os.walk(os.path.join(workdir, sub, "state")):
            for name in files:
                if os.path.basename(root) == "d":
                    path = os.path.join(root, name)
                    with open(path, "r+b") as f:
                        f.truncate(5)
    for mode in ("eval", "export"):
        line = _one_error_line(_cli(*_fixture_args(workdir), "--mode", mode))
        assert "best/4 is corrupt or truncated" in line and "resume_fallback" in line


# ----------------------------------------------------------------------------- one run per workdir


def test_a_second_run_on_a_locked_workdir_stops_naming_the_first(workdir):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from score_jax.lock import WorkdirLock\n"
            "with WorkdirLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
            workdir,
        ],
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirError, match=r"in use by another run") as info:
            trainer.train_and_evaluate(fixture_config(), workdir)
        assert f"pid {holder.pid} on host {socket.gethostname()}" in str(info.value)
        holder.send_signal(signal.SIGKILL)  # a crashed holder: the kernel drops its lock
        holder.wait(timeout=30)
        with WorkdirLock(workdir):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)


# ----------------------------------------------------------------------------- run length


def test_resume_with_another_run_length_is_refused(workdir):
    """A finished 4-step run rerun with 6 steps: refused before anything is written (the
    cosine schedule and the EMA warm-up of 6 steps differ from those of 4)."""
    before = sorted(os.listdir(workdir))
    with pytest.raises(ConfigError, match=r"holds a run of 4 steps .*trains 6 .*resume_extend"):
        trainer.train_and_evaluate(fixture_config(num_train_steps=6), workdir)
    assert sorted(os.listdir(workdir)) == before
    ckpt = checkpoint.Checkpointer(workdir)
    assert ckpt.all_steps() == [2, 4]
    ckpt.close()


def test_fallback_without_an_older_checkpoint_refuses_and_deletes_nothing(workdir):
    """resume_fallback with a corrupt newest checkpoint and nothing older: it deleted the only
    checkpoint, and the next plain run started from step 0 silently."""
    ckpt = checkpoint.Checkpointer(workdir)
    ckpt.delete(2)
    ckpt.close()
    _flip_a_bit_orbax_does_not_notice(workdir, 4)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    with pytest.raises(CheckpointError, match=r"checkpoints/4 is corrupt: the checksum") as info:
        trainer.train_and_evaluate(fixture_config(resume_fallback=True), workdir)
    assert "found no older checkpoint that restores (tried steps [4]); nothing was deleted" in str(
        info.value
    )
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
    with pytest.raises(CheckpointError, match=r"checkpoints/4 is corrupt.*resume_fallback"):
        trainer.train_and_evaluate(fixture_config(), workdir)  # not a new run from step 0


# ----------------------------------------------------------------------------- divergence at step 1


def test_divergence_at_the_first_step_does_not_blame_the_learning_rate():
    """A non-finite loss at step 1 is that of the initial weights (no update has happened), so
    "lower config.optim.learning_rate" would send the user the wrong way."""
    from score_jax.metrics import TrainMetrics

    def read(step: int, **flags: float):
        metrics = TrainMetrics(
            writer=None,
            batch_size=16,
            steps_per_epoch=10,
            total_steps=10,
            log_every_steps=1000,
            latest_checkpoint=lambda: None,
        )
        values = {"loss": np.nan, "grad_norm": np.nan, "learning_rate": 0.05, "finite": 0.0}
        all_flags = {"finite_loss": 0.0, "finite_grad_norm": 0.0, "finite_params": 0.0} | flags
        with pytest.raises(DivergedError) as info:
            metrics._read(step, {**values, **all_flags})
        return str(info.value)

    first = read(0)
    assert first.startswith("training diverged at step 1: non-finite grad_norm, loss, params")
    assert "at the initial weights, before any update (so not the learning rate)" in first
    assert "config.init_from" in first and "lower config.optim.learning_rate" not in first
    later = read(5)  # after updates, the learning rate may well be the cause
    assert "step 6" in later and "lower config.optim.learning_rate" in later
    # Finite loss and gradient at step 1, an overflowing update: that is the learning rate's.
    overflow = read(0, finite_loss=1.0, finite_grad_norm=1.0)
    assert "lower config.optim.learning_rate" in overflow


# ----------------------------------------------------------------------------- full disk


def _mount_tiny_tmpfs(path: str) -> bool:
    """A 1300 KiB tmpfs at `path` (needs root and mount rights); False where not allowed."""
    os.makedirs(path)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1300k", "tmpfs", path], capture_output=True
    )
    return done.returncode == 0


_MAIN_DISK_FULL = textwrap.dedent(
    """
    import sys
    from absl import app
    from score_jax import main, trainer

    def full(config, workdir):  # orbax's error for a checkpoint on a full disk, verbatim
        raise ValueError(
            'RESOURCE_EXHAUSTED: Error writing "params.conv_0.kernel/0" in OCDBT database at '
            'local file "' + workdir + '/checkpoints/4.orbax-checkpoint-tmp/state/": Failed '
            'writing: "' + workdir + '/checkpoints/4.orbax-checkpoint-tmp/state/d/1de9": Failed '
            "to write 79075 bytes to file 8: No space left on device [os_error_code='28']"
        )

    trainer.train_and_evaluate = full
    sys.argv = ["score_jax", "--config", "configs/digits.py", "--workdir", sys.argv[1]]
    app.run(main.main, flags_parser=main.parse_flags)
    """
)


def test_a_full_disk_is_one_line_naming_the_workdir(tmp_path):
    """Training into a 1300 KiB tmpfs: the first checkpoints fit, a later one does not. Where
    no tmpfs can be mounted (not root), orbax's full-disk error is raised in its place."""
    disk = str(tmp_path / "disk")
    workdir = os.path.join(disk, "wd")
    mounted = _mount_tiny_tmpfs(disk)
    try:
        if mounted:
            out = _cli(*_fixture_args(workdir), "--config.num_train_steps=8")
        else:
            env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
            out = subprocess.run(
                [sys.executable, "-c", _MAIN_DISK_FULL, workdir],
                cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
        line = _one_error_line(out)
        assert line.startswith(
            f"score_jax: error: no space left on the device of workdir {workdir}"
        )
        assert f"a write failed: {workdir}/checkpoints/" in line
        assert "Traceback" not in out.stderr  # orbax's logged tracebacks are dropped
        if mounted:  # nothing complete was lost: the checkpoints that fitted restore
            ckpt = checkpoint.Checkpointer(workdir)
            steps = ckpt.all_steps()
            assert steps and steps[-1] < 8
            ckpt.restore(_template(), steps[-1])
            ckpt.close()
    finally:
        if mounted:
            subprocess.run(["umount", disk], check=True)
