"""The record of one evaluator kind (a spec's `kind`): its fields' checks and relations, its
title text, its results.json record and result name, and how it runs (per batch or on the
whole split). Config validation, the runner and the trainer read only this."""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from score_jax import attacks, data
from score_jax.checks import Check

Array = jax.Array
# correct(logits_fn, x, labels, keys) -> per-example 0/1 correctness (B,) under the evaluator.
CorrectFn = Callable[[attacks.LogitsFn, Array, Array, Array], Array]
# run(variables, split, key data) -> {"accuracy", "num_examples", "<extra>": ..}.
SplitFn = Callable[[dict, data.Split, np.ndarray], dict[str, float]]


class Kind:
    """An evaluator kind. A subclass sets `name` and `per_batch` and defines `fields`,
    `describe` and `correct` (per batch) or `split_evaluator` (whole split); `check`, `record`
    and `result_name` have defaults."""

    name: str = ""
    per_batch: bool = True  # False: runs on the whole split at once (split_evaluator)

    def fields(self) -> dict[str, Check]:
        """field -> check of a spec of this kind, besides `kind`."""
        raise NotImplementedError

    def check(self, where: str, spec: ml_collections.ConfigDict) -> None:
        """The relations between fields that each passed its check; ConfigError naming
        `where`.<field> (e.g. where = "config.test.pgd")."""
        del where, spec

    def describe(self, spec: ml_collections.ConfigDict) -> str:
        """The short text of the printed title, e.g. "PGD-20 (ce) linf eps=0.03137"."""
        raise NotImplementedError

    def record(self, spec: ml_collections.ConfigDict) -> dict[str, Any]:
        """results.json's record of the evaluator: its spec."""
        return spec.to_dict()

    def result_name(self, name: str, spec: ml_collections.ConfigDict) -> str:
        """The name a whole-split evaluator's results are reported under (metrics keys,
        tables); per-batch ones report under `name`."""
        del spec
        return name

    def correct(self, spec: ml_collections.ConfigDict) -> CorrectFn:
        """A per-batch kind's per-example correctness."""
        raise NotImplementedError(f"evaluator kind {self.name!r} does not run per batch")

    def split_evaluator(
        self,
        model: nn.Module,
        spec: ml_collections.ConfigDict,
        mesh: Mesh,
        batch_size: int,
        precision: str,
    ) -> SplitFn:
        """A whole-split kind's evaluator, built once (compiled) and called per evaluation."""
        raise NotImplementedError(f"evaluator kind {self.name!r} does not run on a whole split")
