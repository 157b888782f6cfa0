"""Evaluator kinds, one module each (clean, pgd, autoattack), and their registry.

A spec (config.eval.<name> / config.test.<name>, a sub-ConfigDict) names its kind in `kind`;
KINDS maps the name to its `Kind` record, which config validation, the runner
(score_jax.evaluate) and the trainer read. A new kind is one module plus its entry in the
registration line below (or `register(kind)`; tests/test_evaluator_kinds.py registers a toy one).
"""

import ml_collections

from score_jax.evaluators import autoattack, clean, pgd
from score_jax.evaluators.kind import CorrectFn, Kind, SplitFn

__all__ = ["CorrectFn", "KINDS", "Kind", "SplitFn", "clean", "kind_of", "register", "specs"]

KINDS: dict[str, Kind] = {k.name: k for k in (pgd.KIND, autoattack.KIND)}


def register(kind: Kind) -> Kind:
    """Adds `kind` to KINDS (a name already taken by another kind is a ValueError)."""
    if KINDS.get(kind.name, kind) is not kind:
        raise ValueError(f"evaluator kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def kind_of(spec: ml_collections.ConfigDict) -> Kind:
    """The registered Kind of `spec` (spec.kind)."""
    return KINDS[spec.kind]


def specs(section: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """The named evaluators of config.eval / config.test (its ConfigDict entries), in order."""
    return {k: v for k, v in section.items() if isinstance(v, ml_collections.ConfigDict)}
