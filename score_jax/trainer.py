"""The training loop and the evaluation of a trained workdir (`--mode train` / `--mode eval`).

Data flows one way: config -> data + model + optimizer -> train_step (pure, compiled once) ->
checkpoints / metrics. The loop never waits for the device except to read the previous step's
scalar metrics (the divergence guard) and to evaluate.
"""

import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from score_jax import checkpoint, config_lib, data, evaluate, models, optim, train, workdir_io
from score_jax.errors import CheckpointError, ConfigError, DivergedError, WorkdirError
from score_jax.lock import workdir_lock

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
PARAMS = ("ema", "raw")  # the parameter sets evaluated: the EMA and the raw ones


def build_model(config: ml_collections.ConfigDict, dataset: data.Dataset):
    """The configured model with the dataset's classes and normalisation."""
    return models.from_config(config.model, dataset.num_classes, dataset.mean, dataset.std)


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs * steps_per_epoch)


class MetricWriter:
    """metrics.jsonl + TensorBoard scalars, written by process 0 only (local or gs:// workdirs:
    workdir_io.MetricsLog rewrites a remote metrics.jsonl, which cannot be appended to)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.log = self.tb = None
        if self.enabled:
            self.log = workdir_io.MetricsLog(workdir_io.join(workdir, METRICS_FILE))
            self.tb = workdir_io.summary_writer(workdir_io.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.log.append({"step": step, **scalars})
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def truncate_after(self, step: int) -> None:
        """Drops lines logged after `step` (written before a crash, to be written again)."""
        if self.enabled:
            self.log.truncate_after(step)

    def drop_test_lines(self) -> None:
        """Drops earlier test-only lines (a new test evaluation replaces them)."""
        if self.enabled:
            self.log.retain(lambda r: not all(k == "step" or k.startswith("test/") for k in r))

    def close(self) -> None:
        if self.enabled:
            self.log.close()
            self.tb.close()


class PreemptionWatch:
    """Notices SIGTERM (the usual preemption notice); every process agrees on the step."""

    def __init__(self):
        self.requested = False
        self.multi = jax.process_count() > 1
        self.previous = None
        if not self.multi:  # multi-process: jax's coordination service watches SIGTERM itself
            self.previous = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        if self.multi:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _check_writable(workdir: str) -> None:
    """Creates the workdir (local or remote) and writes and removes a probe file in it."""
    try:
        workdir_io.makedirs(workdir)
        probe = workdir_io.join(workdir, ".write_test")
        workdir_io.write_text_atomic(probe, "ok")
        workdir_io.remove(probe)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir!r} is not writable: {e.strerror or e}") from None


def _summary_table(rows: dict[str, dict[str, float]], names: list[str]) -> str:
    """One row per parameter set: the accuracy (%) of each of `names` ("clean", evaluators)."""
    width = max(10, *(len(n) + 2 for n in names))
    lines = [f"{'':<16}" + "".join(f"{n:>{width}}" for n in names) + f"{'n':>8}"]
    for params, r in rows.items():
        cells = "".join(
            f"{100 * r[f'{n}_accuracy']:>{width - 1}.2f}%"
            if f"{n}_accuracy" in r
            else f"{'-':>{width}}"
            for n in names
        )
        lines.append(f"{params + ' params':<16}{cells}{r['num_examples']:>8d}")
    return "\n".join(lines)


def _section_scalars(prefix: str, rows: dict[str, dict[str, float]]) -> dict[str, float]:
    """{"<prefix>/<params>_<name>_accuracy": ..} of evaluate_state's rows."""
    return {
        f"{prefix}/{params}_{k}": v
        for params, r in rows.items()
        for k, v in r.items()
        if k != "num_examples"
    }


class Setup:
    """Everything a run builds from its config: data, model, optimizer, mesh, checkpoints."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str):
        self.config = config
        self.workdir = workdir
        self.mesh = train.make_mesh()
        config_lib.validate(config, num_devices=self.mesh.size)  # the run's one validation
        self.dataset = data.get_dataset(config.dataset)
        self.batcher = data.TrainBatcher(
            self.dataset,
            config.batch_size,
            config.seed,
            config.dataset.real_fraction,
            epoch_size=config.dataset.epoch_size,
        )
        self.steps_per_epoch = self.batcher.steps_per_epoch
        self.total_steps = total_steps(config, self.steps_per_epoch)
        self.model = build_model(config, self.dataset)
        self.schedule = optim.make_schedule(config.optim, self.steps_per_epoch, self.total_steps)
        self.momentum_schedule = optim.make_momentum_schedule(
            config.optim, self.steps_per_epoch, self.total_steps
        )
        self.tx = optim.make_optimizer(config.optim, self.schedule, self.momentum_schedule)
        self.ema_warmup_steps = int(round(config.ema.warmup_fraction * self.total_steps))
        self.key = train.base_key(config.seed)
        self._eval_steps: dict[str, dict[str, evaluate.StepFn]] = {}

    def initial_state(self) -> train.TrainState:
        state = train.create_train_state(
            self.model, self.tx, self.dataset.image_shape, self.config.seed
        )
        return train.replicate(state, self.mesh)

    def start_state(self) -> train.TrainState:
        """The state a new run starts from: `initial_state`, with config.init_from's weights (a
        released PyTorch checkpoint, torch_bridge.released) as params, EMA and BatchNorm
        statistics when it is set."""
        state = self.initial_state()
        if not self.config.init_from:
            return state
        from score_jax import torch_bridge

        torch_bridge.require_torch()
        from score_jax.torch_bridge import released

        template = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        variables = released.load_variables(
            self.config.init_from, self.config.model.name, template, self.model.mean, self.model.std
        )
        state = state.replace(
            params=variables["params"],
            ema_params=variables["params"],
            batch_stats=variables["batch_stats"],
        )
        return train.replicate(state, self.mesh)

    def eval_steps(
        self, section: str | dict[str, ml_collections.ConfigDict]
    ) -> dict[str, evaluate.StepFn]:
        """The compiled steps ("clean" and each evaluator) of config.<section> (built once), or
        of the given {name: evaluator spec}."""
        if not isinstance(section, str):
            return evaluate.compile_steps(
                self.model, section, self.mesh, batch_size=self.config.eval_batch_size
            )
        if section not in self._eval_steps:
            specs = evaluate.evaluator_specs(self.config[section])
            self._eval_steps[section] = evaluate.compile_steps(
                self.model, specs, self.mesh, batch_size=self.config.eval_batch_size
            )
        return self._eval_steps[section]

    def evaluate(
        self,
        section: str | dict[str, ml_collections.ConfigDict],
        variables: dict,
        split: data.Split,
        params: str | None = None,
    ) -> dict[str, float]:
        """config.<section>'s evaluators (or the given ones) on `variables` ({"params",
        "batch_stats"}) and `split`: {"clean_accuracy", "<evaluator>_accuracy", ..,
        "num_examples"}. `params` ("ema" / "raw"): which parameters these are; evaluators with
        `params="best_by"` (AutoAttack) then run only on config.best_by's."""
        key = np.asarray(jax.random.key_data(jax.random.key(self.config.seed + 1)))
        steps = self.eval_steps(section)
        if params is not None and params != self.config.best_by:
            specs = self.config[section] if isinstance(section, str) else section
            steps = {
                k: v
                for k, v in steps.items()
                if k == evaluate.CLEAN or specs[k].get("params") != "best_by"
            }
        return evaluate.run_evaluators(
            steps,
            variables,
            split,
            self.config.eval_batch_size,
            self.mesh,
            key,
        )

    def evaluate_state(
        self, section: str, state: train.TrainState, split: data.Split
    ) -> dict[str, dict[str, float]]:
        """`evaluate` of the EMA and of the raw parameters of `state`: {"ema": .., "raw": ..}.
        The one evaluation path of training (validation) and --mode eval (test)."""
        chosen = {"ema": state.ema_params, "raw": state.params}
        return {
            name: self.evaluate(
                section, {"params": chosen[name], "batch_stats": state.batch_stats}, split, name
            )
            for name in PARAMS
        }


def _restore_or_init(
    setup: Setup, ckpt: checkpoint.Checkpointer
) -> tuple[train.TrainState, dict[str, Any]]:
    """The newest checkpoint's state (after checking it belongs to this config), else a new one.

    A corrupt or truncated checkpoint is an error naming it; with config.resume_fallback the
    previous checkpoints are tried in turn.
    """
    steps = ckpt.all_steps()
    if not steps:
        return setup.start_state(), {}
    state = setup.initial_state()
    for i, step in enumerate(reversed(steps)):
        try:
            meta = ckpt.restore_meta(step)
            mismatch = checkpoint.fingerprint_mismatch(
                meta.get("fingerprint", {}), checkpoint.fingerprint(setup.config)
            )
            if not mismatch or setup.config.resume_ignore_mismatch:
                restored, meta = ckpt.restore(state, step)
        except Exception as e:  # orbax / tensorstore errors, or a checksum mismatch
            error = checkpoint.corrupt_error(ckpt.step_dir(step), e)
            if not setup.config.resume_fallback:
                raise error from None
            logging.warning("Deleting a corrupt checkpoint: %s", error)
            ckpt.delete(step)
            continue
        if mismatch and not setup.config.resume_ignore_mismatch:
            raise CheckpointError(
                f"workdir {setup.workdir!r} holds a checkpoint (step {step}) of another "
                f"config (differs in {', '.join(mismatch[:5])}); use another --workdir or set "
                "--config.resume_ignore_mismatch=True"
            )
        if i:
            logging.warning("Resumed from step %d, an older checkpoint", step)
        return restored, meta
    raise CheckpointError(f"no checkpoint in {setup.workdir!r} could be restored")


def _check_run_length(setup: Setup, meta: dict[str, Any], start_step: int) -> None:
    """Refuses to resume a run of another length (the schedule and EMA warm-up depend on the
    total), unless config.resume_extend; then says what the schedule does."""
    saved = meta.get("total_steps")
    if saved is None or int(saved) == setup.total_steps:
        return  # a new run, or a checkpoint written before the length was recorded
    saved = int(saved)
    if not setup.config.resume_extend:
        raise ConfigError(
            f"workdir {setup.workdir!r} holds a run of {saved} steps (at step {start_step}), but "
            f"this config trains {setup.total_steps} (config.num_train_steps / num_epochs); "
            "the learning-rate schedule and EMA warm-up depend on the total, so the result would "
            "be neither run: use another --workdir, or set --config.resume_extend=True"
        )
    old = optim.make_schedule(setup.config.optim, setup.steps_per_epoch, saved)
    old_warmup = int(round(setup.config.ema.warmup_fraction * saved))
    if jax.process_index() == 0:
        print(
            f"Changing the run from {saved} to {setup.total_steps} steps at step {start_step} "
            f"(config.resume_extend): the {setup.config.optim.schedule} schedule is now that of "
            f"{setup.total_steps} steps (lr at step {start_step}: {float(old(start_step)):.4g} "
            f"-> {float(setup.schedule(start_step)):.4g}), EMA warm-up {old_warmup} -> "
            f"{setup.ema_warmup_steps} steps",
            flush=True,
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (resuming from the newest checkpoint in workdir), then evaluates on the test split.

    Returns the results written to <workdir>/results.json.
    """
    setup = Setup(config, workdir)  # validates, loads the data: nothing is written before
    _check_writable(workdir)
    # One run per workdir (process 0 holds the lock); released however this process exits.
    with workdir_lock(workdir, enabled=jax.process_index() == 0):
        return _train(setup, workdir)


def _train(setup: Setup, workdir: str) -> dict[str, Any]:
    config = setup.config
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    state, meta = _restore_or_init(setup, ckpt)
    start_step = int(jax.device_get(state.step))
    _check_run_length(setup, meta, start_step)
    best_value = float(meta.get("best_value", -1.0))
    fingerprint = checkpoint.fingerprint(config)
    is_main = jax.process_index() == 0
    writer = MetricWriter(workdir)
    if is_main:
        workdir_io.write_text_atomic(
            workdir_io.join(workdir, CONFIG_FILE),
            config.to_json_best_effort(indent=2, sort_keys=True),
        )
        writer.truncate_after(start_step)
        if start_step:
            print(f"Resuming from {ckpt.step_dir(start_step)} (step {start_step})", flush=True)

    step_fn = train.compile_train_step(
        setup.model,
        config,
        setup.schedule,
        setup.ema_warmup_steps,
        setup.mesh,
        momentum_fn=setup.momentum_schedule,
    )
    num_steps = setup.total_steps
    logging.info(
        "Training %s (%s-%s) for %d steps (%d per epoch) on %d devices from step %d",
        config.model.name,
        config.loss.method,
        config.loss.divergence,
        num_steps,
        setup.steps_per_epoch,
        setup.mesh.size,
        start_step,
    )

    def save(step: int, state, best: bool = False) -> None:
        payload = {
            "fingerprint": fingerprint,
            "step": step,
            "best_value": best_value,
            "total_steps": num_steps,
        }
        ckpt.save(step, state, payload, best=best)

    progress = None
    if is_main and config.progress_bar and start_step < num_steps:
        import tqdm

        progress = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)

    watch = PreemptionWatch()
    window: list[dict[str, float]] = []
    pending = None  # (step, device metrics) of the previous step, read one step late
    window_start = time.perf_counter()

    def drain(pending_item) -> None:
        nonlocal window_start
        step, metrics = pending_item
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        flags = {k: metrics.pop(k) for k in list(metrics) if k.startswith("finite")}
        if not flags["finite"]:
            ckpt.wait()
            bad = [k.removeprefix("finite_") for k, v in sorted(flags.items()) if not v]
            bad = [k for k in bad if k != "finite"] or ["loss"]
            last = ckpt.latest_step()
            newest = (
                "no checkpoint was written"
                if last is None
                else f"the newest checkpoint is step {last}"
            )
            raise DivergedError(
                f"training diverged at step {step + 1}: non-finite {', '.join(bad)} (loss "
                f"{metrics['loss']:.4g}, grad_norm {metrics['grad_norm']:.4g}, learning_rate "
                f"{metrics['learning_rate']:.4g}); the step was discarded; {newest}; lower "
                "config.optim.learning_rate or set config.optim.grad_clip_norm"
            )
        window.append(metrics)
        if (step + 1) % config.log_every_steps == 0 or step + 1 == num_steps:
            elapsed = time.perf_counter() - window_start
            scalars = {f"train/{k}": float(np.mean([m[k] for m in window])) for k in window[0]}
            scalars["train/epoch"] = (step + 1) / setup.steps_per_epoch
            writer.write(step + 1, scalars)
            images_per_s = len(window) * config.batch_size / elapsed
            # Its own line: a speed, not part of the (bit-reproducible) training record.
            writer.write(step + 1, {"perf/images_per_s": images_per_s})
            if progress is not None:
                progress.set_postfix(
                    loss=f"{scalars['train/loss']:.4f}", img_s=f"{images_per_s:.0f}"
                )
            elif is_main:
                shown = ", ".join(
                    f"{k.removeprefix('train/')} {v:.4g}" for k, v in sorted(scalars.items())
                )
                print(
                    f"step {step + 1}/{num_steps}: {shown}, {images_per_s:.1f} images/s", flush=True
                )
            window.clear()
            window_start = time.perf_counter()

    preempted = False
    for step in range(start_step, num_steps):
        batch = train.shard_batch(setup.batcher.batch(step), setup.mesh)
        state, metrics = step_fn(state, batch, setup.key)
        if pending is not None:
            drain(pending)
        pending = (step, metrics)
        if progress is not None:
            progress.update(1)
        done = step + 1
        epoch_end = done % setup.steps_per_epoch == 0
        epoch = done // setup.steps_per_epoch
        eval_now = done == num_steps or (
            epoch_end and config.eval_every_epochs > 0 and epoch % config.eval_every_epochs == 0
        )
        if eval_now:
            drain(pending)
            pending = None
            rows = setup.evaluate_state("eval", state, setup.dataset.validation)
            value = evaluate.selection_value(rows[config.best_by], config.eval.select_by)
            writer.write(done, {**_section_scalars("val", rows), "val/selection": value})
            if evaluate.improves(value, best_value, config.eval.select_ties):
                best_value = value
                save(done, state, best=True)
        preempted = watch.reached(done)
        if done % config.checkpoint_every_steps == 0 or done == num_steps or preempted:
            if pending is not None:
                drain(pending)
                pending = None
            save(done, state)
        if preempted:
            break
    watch.close()
    if pending is not None:
        drain(pending)
    if progress is not None:
        progress.close()
    ckpt.wait()
    if preempted:
        ckpt.close()
        writer.close()
        if is_main:
            print(
                f"Preempted (SIGTERM) at step {done}: checkpoint saved in {workdir}; "
                "resume by running the same command again."
            )
        return {"preempted_at_step": done}
    results = evaluate_workdir(config, workdir, setup=setup, ckpt=ckpt, writer=writer)
    ckpt.close()
    writer.close()
    return results


def evaluate_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    setup: Setup | None = None,
    ckpt: checkpoint.Checkpointer | None = None,
    writer: MetricWriter | None = None,
) -> dict[str, Any]:
    """config.test's evaluators on the test split, of the best checkpoint (else the last), for
    the EMA and the raw parameters; printed as a table, written to <workdir>/results.json and,
    as test/<params>_<evaluator>_accuracy at the newest checkpoint's step, to metrics.jsonl and
    TensorBoard (replacing an earlier test evaluation's lines in metrics.jsonl)."""
    imported = ckpt is None and not checkpoint.exists(workdir)
    own = False
    if imported and not config.init_from:
        raise CheckpointError(f"workdir {workdir!r} holds no checkpoint to evaluate")
    setup = setup or Setup(config, workdir)
    if imported:  # a released PyTorch checkpoint, evaluated as it is
        state, use_best, last_step = setup.start_state(), False, 0
    else:
        own = ckpt is None
        ckpt = ckpt or checkpoint.Checkpointer(workdir, config.keep_checkpoints)
        state, _, use_best = ckpt.restore_final(
            setup.initial_state(), fallback=config.resume_fallback
        )
        last_step = ckpt.latest_step()
    rows = setup.evaluate_state("test", state, setup.dataset.test)
    specs = evaluate.evaluator_specs(config.test)
    results = {
        "checkpoint": config.init_from if imported else "best" if use_best else "last",
        "step": int(jax.device_get(state.step)),
        "evaluators": {name: spec.to_dict() for name, spec in specs.items()},
        **{f"test_{name}": r for name, r in rows.items()},
    }
    own_writer = writer is None
    if own_writer:
        writer = MetricWriter(workdir)
    if jax.process_index() == 0:
        workdir_io.write_json_atomic(workdir_io.join(workdir, RESULTS_FILE), results)
    writer.drop_test_lines()
    writer.write(
        last_step if last_step is not None else results["step"], _section_scalars("test", rows)
    )
    if own_writer:
        writer.close()
    if jax.process_index() == 0:
        described = "; ".join(f"{name}: {_describe(spec)}" for name, spec in specs.items())
        title = f"Test split, {results['checkpoint']} checkpoint (step {results['step']})" + (
            f", {described}" if described else ""
        )
        print(title + "\n" + _summary_table(rows, [evaluate.CLEAN, *specs]))
    if own:
        ckpt.close()
    return results


def _describe(spec: ml_collections.ConfigDict) -> str:
    """A short description of an evaluator, e.g. "PGD-20 (ce) linf eps=0.03137"."""
    if spec.kind == "pgd":
        return f"PGD-{spec.num_steps} ({spec.objective}) {spec.norm} eps={spec.eps:.4g}"
    if spec.kind == "autoattack":
        shown = spec.version if spec.version != "custom" else ", ".join(spec.attacks)
        n = "" if spec.num_examples == -1 else f", first {spec.num_examples}"
        return f"AutoAttack {shown} (JAX) {spec.norm} eps={spec.eps:.4g}{n}"
    return spec.kind
