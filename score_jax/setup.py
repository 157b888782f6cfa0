"""A run's setup, built from parts: the data, the model and optimizer, the mesh.

    dataset = load_data(config)                                    # host arrays
    parts = build_model_and_optimizer(config, dataset.info)        # needs no data
    setup = Setup(config, workdir, dataset=dataset, mesh=mesh)     # both injectable

`Setup` validates the config once (for its mesh) and makes the run's states: `initial_state()` (a
new run's, replicated on the mesh) and `state_template()` (its shapes and placement, no data: what
checkpoints are restored into). Evaluation is `evaluate.Evaluation(config, setup.model,
setup.mesh)`; config.init_from's released weights are `init_from.start_state(setup)`. Given a
`DatasetInfo` instead of a dataset it builds the model without reading any data (--mode export).
Nothing here imports score_jax.torch_bridge (which builds on this module).
"""

import dataclasses
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import optax
from jax.sharding import Mesh

from score_jax import config_lib, data, models, optim, parallel, train


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
    """A run's parts: mesh, data and batcher, model, optimizer, key; its initial state.

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

    def _create_state(self) -> train.TrainState:
        """train.create_train_state of this model and optimizer (not yet placed on the mesh)."""
        return train.create_train_state(
            self.model, self.tx, self.info.image_shape, self.config.seed
        )

    def initial_state(self) -> train.TrainState:
        """A new run's state (initialised from config.seed), replicated on the mesh."""
        return parallel.replicate(self._create_state(), self.mesh)

    def state_template(self) -> train.TrainState:
        """`initial_state`'s tree as jax.ShapeDtypeStructs with its replicated placement, computed
        without initialising anything: the target a checkpoint is restored into."""
        return parallel.replicated_abstract(jax.eval_shape(self._create_state), self.mesh)

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
