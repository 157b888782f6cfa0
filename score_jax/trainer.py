"""The training loop and the evaluation of a trained workdir (`--mode train` / `--mode eval`).

Data flows one way: config -> `setup.Setup` (data, model, optimizer, mesh) -> train_step (pure,
compiled once) -> checkpoints / metrics. The loop is one block per concern: the step, its
metrics (`metrics.TrainMetrics`: read one step late, so the loop never waits for the device
except to evaluate), validation and the best checkpoint (`evaluate_and_save_best`), periodic
checkpoints and preemption, each at its cadence (`metrics.itstime`).
"""

import signal
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from score_jax import checkpoint, evaluate, evaluators, init_from, optim, train, workdir_io
from score_jax.errors import CheckpointError, ConfigError, WorkdirError, one_line
from score_jax.lock import workdir_lock
from score_jax.metrics import METRICS_FILE as METRICS_FILE  # where tests and tools read it
from score_jax.metrics import MetricWriter, TrainMetrics, itstime
from score_jax.setup import Setup

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


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
        workdir_io.sigterm_received()  # a remote workdir: bounded by --storage_timeout_s

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
        if (
            isinstance(e, FileNotFoundError)
            and workdir_io.is_remote(workdir)
            and not workdir_io.bucket_exists(workdir)
        ):
            name = workdir_io.bucket(workdir)
            raise WorkdirError(
                f"workdir {workdir!r}: the bucket {name} does not exist (create it with "
                f"`gcloud storage buckets create {name}`, or correct --workdir)"
            ) from None
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
    """{"<prefix>/<params>_<name>_accuracy": ..} of evaluate.Evaluation.state's rows."""
    return {
        f"{prefix}/{params}_{k}": v
        for params, r in rows.items()
        for k, v in r.items()
        if k != "num_examples"
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
        return init_from.start_state(setup), {}
    template = setup.state_template()
    corrupt: list[int] = []  # deleted only once an older checkpoint restored
    for step in reversed(steps):
        try:
            meta = ckpt.restore_meta(step)
            mismatch = checkpoint.fingerprint_mismatch(
                meta.get("fingerprint", {}), checkpoint.fingerprint(setup.config)
            )
            if not mismatch or setup.config.resume_ignore_mismatch:
                restored, meta = ckpt.restore(template, step)
        except Exception as e:  # orbax / tensorstore errors, or a checksum mismatch
            error = checkpoint.corrupt_error(ckpt.step_dir(step), e)
            if not setup.config.resume_fallback:
                raise error from None
            if step == steps[0]:  # nothing older to fall back to: refuse, delete nothing
                raise CheckpointError(
                    f"{str(error).removesuffix(checkpoint.FALLBACK_HINT)}; "
                    f"config.resume_fallback=True found no older checkpoint that restores "
                    f"(tried steps {[*corrupt, step]}); nothing was deleted: move the workdir "
                    "away to start again, or restore it from a backup"
                ) from None
            logging.warning("Skipping a corrupt checkpoint: %s", error)
            corrupt.append(step)
            continue
        if mismatch and not setup.config.resume_ignore_mismatch:
            raise CheckpointError(
                f"workdir {setup.workdir!r} holds a checkpoint (step {step}) of another "
                f"config (differs in {', '.join(mismatch[:5])}); use another --workdir or set "
                "--config.resume_ignore_mismatch=True"
            )
        for bad in corrupt:  # newer than the one restored: training writes them again
            logging.warning("Deleting the corrupt checkpoint %s", ckpt.step_dir(bad))
            ckpt.delete(bad)
        if corrupt:
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
    opened = []  # the run's checkpointer, metric writer and progress bar; closed also on error
    try:
        return _run(setup, workdir, opened)
    except BaseException as error:
        _close_after_error(workdir, error, opened)
        raise


def _close(opened: list) -> None:
    """Closes `opened`, newest first (one that raises is not closed again)."""
    while opened:
        opened.pop().close()


def _close_after_error(workdir: str, error: BaseException, opened: list) -> None:
    """Closes what a failed run opened (the writer's thread and files, the checkpointer's pending
    saves and threads), so a library caller (a notebook, a sweep) is left with nothing running;
    a close that fails too is logged: `error` is the one raised. Not after a remote workdir's
    storage failed: talking to it while the error unwinds could hang until the storage watchdog
    ends the process, and its line would replace the error's."""
    if workdir_io.is_remote(workdir) and workdir_io.is_storage_error(error):
        return
    while opened:
        resource = opened.pop()
        try:
            resource.close()
        except Exception as e:  # noqa: BLE001 - the run's own error is the one to report
            logging.warning(
                "Closing the %s after the run failed: %s", type(resource).__name__, one_line(e)
            )


def _run(setup: Setup, workdir: str, opened: list) -> dict[str, Any]:
    config = setup.config
    num_steps = setup.total_steps
    is_main = jax.process_index() == 0

    # Resume: the newest checkpoint of this config, or a new state.
    ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
    opened.append(ckpt)
    state, meta = _restore_or_init(setup, ckpt)
    start_step = int(jax.device_get(state.step))
    _check_run_length(setup, meta, start_step)
    best_value = float(meta.get("best_value", -1.0))
    fingerprint = checkpoint.fingerprint(config)

    def save(step: int, state: train.TrainState, best_value: float, best: bool = False) -> None:
        payload = {
            "fingerprint": fingerprint,
            "step": step,
            "best_value": best_value,
            "total_steps": num_steps,
        }
        ckpt.save(step, state, payload, best=best)

    # Metrics: config.json, metrics.jsonl without the lines of steps to be run again.
    writer = MetricWriter(workdir)
    opened.append(writer)
    if is_main:
        workdir_io.write_text_atomic(
            workdir_io.join(workdir, CONFIG_FILE),
            config.to_json_best_effort(indent=2, sort_keys=True),
        )
        writer.truncate_after(start_step)
        if start_step:
            print(f"Resuming from {ckpt.step_dir(start_step)} (step {start_step})", flush=True)

    step_fn = setup.compile_train_step()
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
    progress = None
    if is_main and config.progress_bar and start_step < num_steps:
        import tqdm

        progress = tqdm.tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True)
        opened.append(progress)  # step_metrics.close() closes it first (tqdm's close is idempotent)
    step_metrics = TrainMetrics(
        writer,
        batch_size=config.batch_size,
        steps_per_epoch=setup.steps_per_epoch,
        total_steps=num_steps,
        log_every_steps=config.log_every_steps,
        latest_checkpoint=lambda: _latest_saved(ckpt),
        progress=progress,
    )
    eval_every = config.eval_every_epochs * setup.steps_per_epoch  # 0: after the last step only
    evaluation = evaluate.Evaluation(config, setup.model, setup.mesh)  # validation's steps

    preempted = False
    watch = PreemptionWatch()
    try:
        for step in range(start_step, num_steps):
            batch = train.shard_batch(setup.batcher.batch(step), setup.mesh)
            state, device_metrics = step_fn(state, batch, setup.key)
            step_metrics.push(step, device_metrics)  # reads the previous step's
            done = step + 1

            if itstime(done, eval_every, num_steps):
                step_metrics.flush()
                best_value = evaluate_and_save_best(
                    setup, evaluation, state, done, best_value, writer, save
                )

            preempted = watch.reached(done)
            if itstime(done, config.checkpoint_every_steps, num_steps) or preempted:
                step_metrics.flush()
                save(done, state, best_value)
            if preempted:
                break
    finally:
        watch.close()  # the caller's SIGTERM handler again, also when a step raised
    step_metrics.close()
    ckpt.wait()

    if preempted:
        _close(opened)
        if is_main:
            print(
                f"Preempted (SIGTERM) at step {done}: checkpoint saved in {workdir}; "
                "resume by running the same command again."
            )
        return {"preempted_at_step": done}
    results, rows, last_step = _evaluate_final_checkpoint(setup, ckpt)
    _report_test(setup, workdir, results, rows, last_step, writer)
    _close(opened)
    return results


def _latest_saved(ckpt: checkpoint.Checkpointer) -> int | None:
    """The newest checkpoint's step once the pending saves are written (None: none)."""
    ckpt.wait()
    return ckpt.latest_step()


def evaluate_and_save_best(
    setup: Setup,
    evaluation: evaluate.Evaluation,
    state: train.TrainState,
    step: int,
    best_value: float,
    writer: MetricWriter,
    save: Callable[..., None],
) -> float:
    """Validation: config.eval's evaluators of the EMA and raw parameters on the validation split,
    written as val/<params>_<evaluator>_accuracy and val/selection (the min over
    config.eval.select_by of config.best_by's); a new best (evaluate.improves) is saved as the
    best checkpoint. Returns the best value so far."""
    config = setup.config
    rows = evaluation.state("eval", state, setup.dataset.validation)
    value = evaluate.selection_value(rows[config.best_by], config.eval.select_by)
    writer.write(step, {**_section_scalars("val", rows), "val/selection": value})
    if not evaluate.improves(value, best_value, config.eval.select_ties):
        return best_value
    save(step, state, value, best=True)
    return value


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """--mode eval: config.test's evaluators on the test split, of the best checkpoint (else the
    last), for the EMA and the raw parameters; printed as a table, written to
    <workdir>/results.json and, as test/<params>_<evaluator>_accuracy at the newest checkpoint's
    step, to metrics.jsonl and TensorBoard (replacing an earlier test evaluation's lines in
    metrics.jsonl). A workdir without checkpoints evaluates config.init_from's released weights."""
    imported = not checkpoint.exists(workdir)
    if imported and not config.init_from:
        raise CheckpointError(f"workdir {workdir!r} holds no checkpoint to evaluate")
    setup = Setup(config, workdir)
    if imported:  # a released PyTorch checkpoint, evaluated as it is
        results, rows = _test_results(setup, init_from.start_state(setup), config.init_from)
        last_step = 0
    else:
        ckpt = checkpoint.Checkpointer(workdir, config.keep_checkpoints)
        try:
            results, rows, last_step = _evaluate_final_checkpoint(setup, ckpt)
        finally:
            ckpt.close()
    writer = MetricWriter(workdir)
    try:
        _report_test(setup, workdir, results, rows, last_step, writer)
    finally:
        writer.close()
    return results


def _evaluate_final_checkpoint(
    setup: Setup, ckpt: checkpoint.Checkpointer
) -> tuple[dict[str, Any], dict[str, dict[str, float]], int]:
    """`_test_results` of the best checkpoint (else the last), and the newest checkpoint's step
    (the step the test metrics are written at)."""
    state, _, use_best = ckpt.restore_final(
        setup.state_template(), fallback=setup.config.resume_fallback
    )
    results, rows = _test_results(setup, state, "best" if use_best else "last")
    last_step = ckpt.latest_step()
    return results, rows, results["step"] if last_step is None else last_step


def _test_results(
    setup: Setup, state: train.TrainState, checkpoint_name: str
) -> tuple[dict[str, Any], dict[str, dict[str, float]]]:
    """(results.json's content, the rows of evaluate.Evaluation.state): config.test's evaluators
    of `state` (from the checkpoint `checkpoint_name`) on the test split."""
    config = setup.config
    evaluation = evaluate.Evaluation(config, setup.model, setup.mesh)
    rows = evaluation.state("test", state, setup.dataset.test)
    specs = evaluators.specs(config.test)
    results = {
        "checkpoint": checkpoint_name,
        "step": int(jax.device_get(state.step)),
        "eval_precision": config.eval_precision,
        "evaluators": {name: evaluators.kind_of(spec).record(spec) for name, spec in specs.items()},
        **{f"test_{name}": r for name, r in rows.items()},
    }
    return results, rows


def _report_test(
    setup: Setup,
    workdir: str,
    results: dict[str, Any],
    rows: dict[str, dict[str, float]],
    step: int,
    writer: MetricWriter,
) -> None:
    """Writes `results` to <workdir>/results.json and the test/ scalars at `step` to `writer`
    (replacing earlier test lines), then prints the title and the table (process 0)."""
    config = setup.config
    if jax.process_index() == 0:
        workdir_io.write_json_atomic(workdir_io.join(workdir, RESULTS_FILE), results)
    writer.drop_test_lines()
    writer.write(step, _section_scalars("test", rows))
    if jax.process_index() != 0:
        return
    specs = evaluators.specs(config.test)
    kinds = {name: evaluators.kind_of(spec) for name, spec in specs.items()}
    described = "; ".join(f"{name}: {kinds[name].describe(spec)}" for name, spec in specs.items())
    title = f"Test split, {results['checkpoint']} checkpoint (step {results['step']})" + (
        f", {described}" if described else ""
    )
    title += f" (evaluated in {config.eval_precision})"
    names = [kinds[name].result_name(name, spec) for name, spec in specs.items()]
    print(title + "\n" + _summary_table(rows, [evaluate.CLEAN, *names]))
