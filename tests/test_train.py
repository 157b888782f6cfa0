"""The train step, the loop, resume, configs and bad-input errors (tiny models, offline data)."""

import os
import signal
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shipped
from cli_helpers import AUTOATTACK_QUICK, run_main
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from score_jax import checkpoint, config_lib, data, evaluators, parallel, train, trainer
from score_jax.errors import DivergedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name: str, variant: str | None = None):
    return config_lib.load_config_file(os.path.join(REPO, "configs", name + ".py"), variant)


def tiny_config(loss_type: str = "trades", **overrides):
    c = load_config("digits")
    c.model.conv_impl = "xla"  # compiles ~5x faster than im2col; tests time compilation mostly
    c.model.width = 4
    c.model.hidden = 8
    c.batch_size = 16
    c.eval_batch_size = 60
    c.num_train_steps = 4
    # One train-step program for every run length (cosine's step count is a constant of the
    # compiled step); the schedules have their own tests (test_optim.py).
    c.optim.schedule = "constant"
    c.attack.num_steps = 2
    c.eval.pgd.num_steps = 2
    c.test.pgd.num_steps = 2
    c.eval_every_epochs = 0
    c.log_every_steps = 2
    c.progress_bar = False
    c.loss.method = loss_type
    c.attack.init = "normal" if loss_type == "trades" else "uniform"
    c.update_from_flattened_dict(AUTOATTACK_QUICK)
    c.update_from_flattened_dict(overrides)
    return c


def run_steps(config, mesh, num_steps):
    setup = trainer.Setup(config, "/unused", mesh=mesh)
    state = setup.initial_state()
    step_fn = train.compile_train_step(
        setup.model, config, setup.schedule, setup.ema_warmup_steps, mesh
    )
    history = []
    for i in range(num_steps):
        state, metrics = step_fn(state, train.shard_batch(setup.batcher.batch(i), mesh), setup.key)
        history.append(jax.device_get(metrics))
    return state, history, step_fn


@pytest.mark.parametrize("loss_type", ["trades", "pgd_at"])
def test_step_updates_and_compiles_once(loss_type):
    config = tiny_config(loss_type)
    mesh = train.make_mesh(jax.devices()[:1])
    setup = trainer.Setup(config, "/unused")
    init = jax.device_get(setup.initial_state())
    state, history, step_fn = run_steps(config, mesh, 3)
    assert step_fn._cache_size() == 1  # one compilation for every step
    assert int(state.step) == 3
    for metrics in history:
        assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"])
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, init.params)
    assert min(jax.tree.leaves(moved)) > 0  # every parameter was updated
    stats = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()), state.batch_stats, init.batch_stats
    )
    assert min(jax.tree.leaves(stats)) > 0  # the loss's passes update the running averages
    if loss_type == "trades":
        assert {"natural", "robust", "clean_accuracy"} <= set(history[0])


def test_setup_from_dataset_info_reads_no_data(monkeypatch):
    """--mode export's Setup (a DatasetInfo, no data) builds the run's model, schedule and state."""
    config = tiny_config(num_train_steps=-1, num_epochs=2, **{"optim.schedule": "cosine"})
    trained = trainer.Setup(config, "/unused")

    def no_data(*args):
        raise AssertionError("read the dataset")

    monkeypatch.setattr(data, "get_dataset", no_data)
    alone = trainer.Setup(config, "/unused", dataset=data.dataset_info(config.dataset))
    assert alone.dataset is None and alone.batcher is None
    assert (alone.steps_per_epoch, alone.total_steps) == (trained.batcher.steps_per_epoch, 158)
    assert alone.ema_warmup_steps == trained.ema_warmup_steps
    for step in (0, 57, 150):
        assert float(alone.schedule(step)) == float(trained.schedule(step))
    fields = ("step", "params", "batch_stats", "opt_state", "ema_params")
    states = [jax.device_get(s.initial_state()) for s in (alone, trained)]
    chex.assert_trees_all_equal(*({k: getattr(s, k) for k in fields} for s in states))


def test_state_template_is_the_initial_state_as_shapes_and_restores_a_checkpoint(tmp_path):
    """Setup.state_template(): initial_state()'s tree, shapes, dtypes and replicated placement as
    ShapeDtypeStructs (no arrays); a checkpoint restored into it equals the saved state and is
    replicated on the mesh."""
    setup = trainer.Setup(tiny_config(), str(tmp_path), mesh=train.make_mesh(jax.devices()[:4]))
    state, template = setup.initial_state(), setup.state_template()
    assert jax.tree.structure(template) == jax.tree.structure(state)
    replicated = NamedSharding(setup.mesh, P())
    for t, a in zip(jax.tree.leaves(template), jax.tree.leaves(state), strict=True):
        assert isinstance(t, jax.ShapeDtypeStruct) and not isinstance(t, jax.Array)
        assert (t.shape, t.dtype, t.sharding) == (a.shape, a.dtype, replicated)
    saved = parallel.replicate(jax.tree.map(lambda x: x + 1, jax.device_get(state)), setup.mesh)
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    ckpt.save(1, saved, {"step": 1})
    ckpt.wait()
    restored, meta = ckpt.restore(template, 1)
    ckpt.close()
    assert meta["step"] == 1 and int(restored.step) == 1
    chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(saved))
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated and leaf.is_fully_replicated


@pytest.mark.parametrize("loss_type", ["trades", "pgd_at"])
def test_four_devices_match_one(loss_type):
    config = tiny_config(loss_type)
    one, hist_one, _ = run_steps(config, train.make_mesh(jax.devices()[:1]), 2)
    four, hist_four, _ = run_steps(config, train.make_mesh(jax.devices()[:4]), 2)
    chex.assert_trees_all_close(
        jax.device_get(four.params), jax.device_get(one.params), atol=2e-5, rtol=1e-4
    )
    chex.assert_trees_all_close(
        jax.device_get(four.batch_stats), jax.device_get(one.batch_stats), atol=2e-5, rtol=1e-4
    )
    np.testing.assert_allclose(hist_four[-1]["loss"], hist_one[-1]["loss"], rtol=1e-4)
    if loss_type == "trades":  # per-device statistics (the reference's DataParallel) differ
        local, _, _ = run_steps(
            tiny_config(loss_type, sync_batch_stats=False), train.make_mesh(jax.devices()[:4]), 2
        )
        diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), four.params, local.params)
        assert max(jax.tree.leaves(diff)) > 1e-5


def _open_files_under(path) -> list[str]:
    """The files under `path` this process holds open (Linux: /proc/self/fd)."""
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # the listing's own fd, closed meanwhile
            pass
    return sorted(link for link in links if link.startswith(str(path)))


def _threads_since(before: set, wait_s: float = 5.0) -> list[str]:
    """Threads started since `before` that still run after `wait_s` (a closed queue's feeder
    thread ends on its own, shortly after)."""
    new = [t for t in threading.enumerate() if t not in before]
    for t in new:
        t.join(timeout=wait_s / len(new))
    return sorted(t.name for t in new if t.is_alive())


def test_overflowing_update_stops_before_it_is_checkpointed(tmp_path, monkeypatch):
    """lr = 1e30: the first update's weights are huge (or inf); the guard checks the updated
    state, so no step of it is kept, not even with a checkpoint after every step; the caller's
    SIGTERM handler is back (a library user's later preemption notice is not swallowed), and
    nothing of the run is left open (the metric writer's files and thread, the checkpointer,
    the progress bar: a notebook's next bar would be drawn over it)."""
    import tqdm

    bars = []

    class RecordedBar(tqdm.tqdm):
        monitor_interval = 0  # no tqdm monitor thread: it outlives the last bar by up to 10 s

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.closed = False
            bars.append(self)

        def close(self):
            self.closed = True
            super().close()

    monkeypatch.setattr(tqdm, "tqdm", RecordedBar)
    config = tiny_config(num_train_steps=8, checkpoint_every_steps=1, progress_bar=True)
    config.optim.learning_rate = 1e30
    config.optim.schedule = "constant"
    before, threads = signal.getsignal(signal.SIGTERM), set(threading.enumerate())
    with pytest.raises(DivergedError, match=r"diverged at step 1: non-finite .*params") as info:
        trainer.train_and_evaluate(config, str(tmp_path))
    assert "no checkpoint was written" in str(info.value)
    assert signal.getsignal(signal.SIGTERM) is before
    assert _open_files_under(tmp_path) == [] and _threads_since(threads) == []
    assert len(bars) == 1 and bars[0].closed
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.all_steps() == [] and ckpt.latest_step(best=True) is None
    ckpt.close()


def test_a_failed_run_closes_what_it_opened_unless_the_remote_storage_failed(caplog):
    """Newest first; a close that fails too is logged and the rest still closed. A remote
    workdir whose storage failed is not talked to while the error unwinds."""
    closed = []

    class Resource:
        def __init__(self, name: str, fails: bool = False):
            self.name, self.fails = name, fails

        def close(self):
            closed.append(self.name)
            if self.fails:
                raise OSError("disk gone")

    outage = ConnectionRefusedError("Connect call failed ('127.0.0.1', 9)")
    opened = [Resource("ckpt"), Resource("writer")]
    trainer._close_after_error("gs://bucket/run", outage, opened)
    assert closed == [] and len(opened) == 2
    trainer._close_after_error("/local/run", outage, opened)  # a local disk cannot hang
    assert closed == ["writer", "ckpt"] and opened == []
    closed.clear()
    opened = [Resource("ckpt"), Resource("writer", fails=True)]
    trainer._close_after_error("gs://bucket/run", DivergedError("diverged"), opened)
    assert closed == ["writer", "ckpt"]
    assert "Closing the Resource after the run failed: disk gone" in caplog.text


def test_refuses_to_resume_another_config(tmp_path):
    trainer.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
    with pytest.raises(ValueError, match=r"another config .*loss\.beta.*resume_ignore_mismatch"):
        trainer.train_and_evaluate(
            tiny_config(num_train_steps=4, **{"loss.beta": 1.0}), str(tmp_path)
        )
    trainer.train_and_evaluate(
        tiny_config(
            num_train_steps=3, resume_ignore_mismatch=True, resume_extend=True, **{"loss.beta": 1.0}
        ),
        str(tmp_path),
    )


def test_corrupt_checkpoint_is_named_and_fallback_is_opt_in(tmp_path):
    config = tiny_config(num_train_steps=6, checkpoint_every_steps=3)
    trainer.train_and_evaluate(config, str(tmp_path))
    data_dir = tmp_path / "checkpoints" / "6" / "state"
    for path in data_dir.rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(path.read_bytes()[:5])  # truncate every data file
    config = tiny_config(num_train_steps=8, checkpoint_every_steps=3, resume_extend=True)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoints/6 is corrupt.*resume_fallback"):
        trainer.train_and_evaluate(config, str(tmp_path))
    config.resume_fallback = True
    results = trainer.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    assert ckpt.latest_step() == 8 and 6 in ckpt.all_steps()  # step 6 written again
    ckpt.close()
    assert results["step"] >= 3


def test_unwritable_workdir(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not writable"):
        trainer.train_and_evaluate(tiny_config(), str(blocker / "workdir"))


@pytest.mark.parametrize(
    "field,value",
    [
        ("attack.eps", -0.1),
        ("attack.step_size", 0.0),
        ("loss.beta", -1.0),
        ("loss.clip_c", 1.0),
        ("loss.divergence", "hellinger"),
        ("loss.method", "mart"),
        ("dataset.name", "mnist"),
        ("model.name", "vit"),
        ("dataset.real_fraction", 0.0),
        ("optim.schedule", "linear"),
        ("eval.pgd.objective", "dlr"),
        ("test.pgd.restarts", 0),
        ("eval.select_ties", "first"),
        ("eval.select_by", ("pgd", "pgd_kl")),
    ],
)
def test_bad_config_values_name_the_field(field, value):
    config = tiny_config(**{field: value})
    with pytest.raises(ValueError, match=f"config.{field}"):
        config_lib.validate(config)


def test_batch_must_divide_device_count():
    with pytest.raises(ValueError, match="config.batch_size=18 .* device count 4"):
        config_lib.validate(tiny_config(batch_size=18), num_devices=4)


@pytest.mark.parametrize("name,variant", list(shipped.shipped(sample=True).values()))
def test_configs_are_valid_and_build(name, variant):
    config = load_config(name, variant)
    config_lib.validate(config, num_devices=4)
    if name.startswith("cifar10_basic"):
        assert config.optim.learning_rate == (0.1 if config.loss.divergence == "kl" else 0.05)
        assert (config.batch_size, config.num_epochs) == (128, 110)
    if "ddpm" in name:
        assert (config.batch_size, config.num_epochs, config.optim.learning_rate) == (512, 400, 0.2)
        assert config.optim.nesterov and not config.optim.weight_decay_batchnorm
        assert config.dataset.real_fraction == (0.4 if "cifar100" in name else 0.3)


def test_paper_clip_thresholds_in_basic_config():
    from score_jax import losses

    pgd = load_config("cifar10_basic", "pgd_at-se,clip")
    trades = load_config("cifar10_basic", "trades-se,clip")
    assert losses.clip_bound(pgd.loss.clip_c, 10, "se") == pytest.approx(0.1778, abs=1e-4)
    assert losses.clip_bound(trades.loss.clip_c, 10, "se") == pytest.approx(0.1, abs=1e-6)


def _shrink_to_smoke(c):
    c.model.name = "small-cnn"
    c.model.activation = ""
    c.model.conv_impl = "xla"
    c.model.width = 4
    c.model.hidden = 8
    c.batch_size = 8
    c.eval_batch_size = 8
    c.num_train_steps = 2
    c.attack.num_steps = 1
    for section in (c.eval, c.test):
        for spec in evaluators.specs(section).values():
            if spec.kind == evaluators.pgd.NAME:
                spec.num_steps = 1
    c.update_from_flattened_dict(AUTOATTACK_QUICK)
    c.eval_every_epochs = 0
    c.progress_bar = False
    c.dataset.num_validation = 8
    return c


def test_cifar_basic_config_runs_two_steps_on_mock_data(tmp_path, mock_tfds):
    config = _shrink_to_smoke(load_config("cifar10_basic", "pgd_at-se,clip"))
    with mock_tfds(num_examples=24):
        results = trainer.train_and_evaluate(config, str(tmp_path))
    assert results["step"] == 2 and results["test_raw"]["num_examples"] == 24


def test_cifar_ddpm_config_runs_two_steps_on_mock_data(tmp_path, mock_tfds):
    rng = np.random.default_rng(0)
    path = tmp_path / "gen.npz"
    np.savez(
        path,
        image=rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8),
        label=rng.integers(0, 10, 32),
    )
    config = _shrink_to_smoke(load_config("cifar10_ddpm"))
    config.dataset.ddpm_path = str(path)
    with mock_tfds(num_examples=24):
        results = trainer.train_and_evaluate(config, str(tmp_path / "wd"))
    assert results["step"] == 2


def _cli(*args, cwd=REPO):
    return run_main(*args, cwd=cwd)


def test_cli_bad_override_is_one_clear_line(tmp_path):
    out = _cli(
        "--config", "configs/digits.py", "--workdir", str(tmp_path), "--config.batch_size=abc"
    )
    assert out.returncode != 0
    assert "batch_size" in out.stderr
    out = _cli(
        "--config", "configs/digits.py", "--workdir", str(tmp_path), "--config.attack.eps=-1"
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("score_jax: error: config.attack.eps")
    assert not os.path.exists(tmp_path / "checkpoints")  # nothing half-written


def test_loss_methods_are_one_table():
    """train.METHODS names exactly the methods the config accepts (the import plan, that nothing
    below the train step imports it: tests/test_import_plan.py)."""
    from score_jax import losses

    assert tuple(train.METHODS) == losses.LOSS_METHODS
