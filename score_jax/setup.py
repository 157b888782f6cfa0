"""A run's setup, built from parts: the data, the model and optimizer, the mesh.

    dataset = load_data(config)                                    # host arrays
    parts = build_model_and_optimizer(config, dataset.info)        # needs no data
    setup = Setup(config, workdir, dataset=dataset, mesh=mesh)     # both injectable

`Setup` validates the config once (for its mesh), and evaluates (`evaluate`, `evaluate_state`:
the one evaluation path of training, --mode eval and the benchmarks). Given a `DatasetInfo`
instead of a dataset it builds the model without reading any data (--mode export).
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from score_jax import config_lib, data, evaluate, models, optim, parallel, train

PARAMS = ("ema", "raw")  # the parameter sets evaluated: the EMA and the raw ones


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
    """config.dataset's Dataset (host numpy arrays)."""
    return data.get_dataset(config.dataset)


def build_model(config: ml_collections.ConfigDict, info: data.DatasetInfo) -> nn.Module:
    """The configured model with the dataset's classes and normalisation."""
    return models.from_config(config.model, info.num_classes, info.mean, info.std)


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """config.num_train_steps if > 0, else num_epochs epochs."""
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    return int(config.num_epochs * steps_per_epoch)


@dataclasses.dataclass(frozen=True)
class ModelAndOptimizer:
    """The model, the run's length, the lr / momentum schedules, the optimizer, EMA warm-up."""

    model: nn.Module
    steps_per_epoch: int
    total_steps: int
    schedule: optax.Schedule
    momentum_schedule: optax.Schedule
    tx: optax.GradientTransformation
    ema_warmup_steps: int


def build_model_and_optimizer(
    config: ml_collections.ConfigDict, info: data.DatasetInfo
) -> ModelAndOptimizer:
    """What training builds from the config and the dataset's info (no data needed): an epoch is
    ceil(epoch_size / batch_size) steps (epoch_size 0: the train split), the EMA warm-up
    round(config.ema.warmup_fraction * total_steps) steps."""
    per_epoch = data.steps_per_epoch(info.num_train, config.batch_size, config.dataset.epoch_size)
    steps = total_steps(config, per_epoch)
    schedule = optim.make_schedule(config.optim, per_epoch, steps)
    momentum = optim.make_momentum_schedule(config.optim, per_epoch, steps)
    return ModelAndOptimizer(
        model=build_model(config, info),
        steps_per_epoch=per_epoch,
        total_steps=steps,
        schedule=schedule,
        momentum_schedule=momentum,
        tx=optim.make_optimizer(config.optim, schedule, momentum),
        ema_warmup_steps=int(round(config.ema.warmup_fraction * steps)),
    )


class Setup:
    """A run's parts: mesh, data and batcher, model, optimizer, key; initial state; evaluation.

    `dataset`: the run's Dataset (default: `load_data(config)`), or a DatasetInfo for the model
    alone (no `dataset` splits, no `batcher`). `mesh`: default all devices (`parallel.make_mesh`).
    `workdir` is only named in messages.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        workdir: str = "",
        *,
        dataset: data.Dataset | data.DatasetInfo | None = None,
        mesh: Mesh | None = None,
    ):
        self.config = config
        self.workdir = workdir
        self.mesh = parallel.make_mesh() if mesh is None else mesh
        config_lib.validate(config, num_devices=self.mesh.size)  # the run's one validation
        if dataset is None:
            dataset = load_data(config)
        self.dataset: data.Dataset | None = None
        self.batcher: data.TrainBatcher | None = None
        if isinstance(dataset, data.DatasetInfo):
            self.info = dataset
        else:
            self.dataset, self.info = dataset, dataset.info
            self.batcher = data.TrainBatcher(
                dataset,
                config.batch_size,
                config.seed,
                config.dataset.real_fraction,
                epoch_size=config.dataset.epoch_size,
                real_sampling=config.dataset.real_sampling,
            )
        parts = build_model_and_optimizer(config, self.info)
        self.model = parts.model
        self.steps_per_epoch = parts.steps_per_epoch
        self.total_steps = parts.total_steps
        self.schedule = parts.schedule
        self.momentum_schedule = parts.momentum_schedule
        self.tx = parts.tx
        self.ema_warmup_steps = parts.ema_warmup_steps
        self.key = parallel.base_key(config.seed)
        self._eval_steps: dict[str, dict[str, evaluate.StepFn]] = {}

    def initial_state(self) -> train.TrainState:
        state = train.create_train_state(
            self.model, self.tx, self.info.image_shape, self.config.seed
        )
        return parallel.replicate(state, self.mesh)

    def compile_train_step(self, divergence_guard: bool = True) -> Callable:
        """The jitted train step (`train.compile_train_step`) of this model, schedules and mesh:
        (state, sharded batch, key) -> (state, metrics)."""
        return train.compile_train_step(
            self.model,
            self.config,
            self.schedule,
            self.ema_warmup_steps,
            self.mesh,
            momentum_fn=self.momentum_schedule,
            divergence_guard=divergence_guard,
        )

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
        return parallel.replicate(state, self.mesh)

    def eval_steps(
        self, section: str | dict[str, ml_collections.ConfigDict]
    ) -> dict[str, evaluate.StepFn]:
        """The compiled steps ("clean" and each evaluator) of config.<section> (built once), or
        of the given {name: evaluator spec}."""
        if not isinstance(section, str):
            return evaluate.compile_steps(
                self.model,
                section,
                self.mesh,
                batch_size=self.config.eval_batch_size,
                precision=self.config.eval_precision,
            )
        if section not in self._eval_steps:
            specs = evaluate.evaluator_specs(self.config[section])
            self._eval_steps[section] = evaluate.compile_steps(
                self.model,
                specs,
                self.mesh,
                batch_size=self.config.eval_batch_size,
                precision=self.config.eval_precision,
            )
        return self._eval_steps[section]

    def evaluate(
        self,
        section: str | dict[str, ml_collections.ConfigDict],
        variables: dict,
        split: data.Split,
        params: str | None = None,
        step: int = 0,
    ) -> dict[str, float]:
        """config.<section>'s evaluators (or the given ones) on `variables` ({"params",
        "batch_stats"}) and `split`: {"clean_accuracy", "<evaluator>_accuracy", ..,
        "num_examples"}. `params` ("ema" / "raw"): which parameters these are; evaluators with
        `params="best_by"` (AutoAttack) then run only on config.best_by's. The random starts
        come from fold_in(key(seed + 1), step): fresh ones at each validation, as the
        reference draws."""
        base = jax.random.key(self.config.seed + 1)
        key = np.asarray(jax.random.key_data(jax.random.fold_in(base, step)))
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
        """`evaluate` of the EMA and of the raw parameters of `state` at its step: {"ema": ..,
        "raw": ..}. The one evaluation path of training (validation) and --mode eval (test)."""
        chosen = {"ema": state.ema_params, "raw": state.params}
        step = int(jax.device_get(state.step))
        return {
            name: self.evaluate(
                section,
                {"params": chosen[name], "batch_stats": state.batch_stats},
                split,
                name,
                step=step,
            )
            for name in PARAMS
        }
