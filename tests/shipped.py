"""The shipped configs and their variants, found from configs/ itself: every `configs/*.py`, with
every combination of its declared `OPTIONS` (after each of its `HEADS`, if it has them); a file
with neither takes no variant."""

import itertools
import os

import ml_collections

from score_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def config_names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(CONFIGS) if f.endswith(".py"))


def variants(name: str) -> list[str | None]:
    """Every variant of configs/<name>.py (None: a config without variants)."""
    module = config_lib.load_config_module(os.path.join(CONFIGS, name + ".py"))
    options = getattr(module, "OPTIONS", None)
    if options is None:
        return [None]
    subsets = [c for r in range(len(options) + 1) for c in itertools.combinations(options, r)]
    heads = getattr(module, "HEADS", ("",))
    return [",".join(v for v in (h, *opts) if v) for h in heads for opts in subsets]


def shipped(sample: bool = False) -> dict[str, tuple[str, str | None]]:
    """{"<name>:<variant>": (name, variant)} of every shipped config; `sample`: each file's
    first, second and last variant only (the default and a spread of the rest)."""
    out = {}
    for name in config_names():
        found = variants(name)
        if sample and len(found) > 3:
            found = [found[0], found[1], found[-1]]
        for v in found:
            out[f"{name}:{'' if v is None else v}" if v is not None else name] = (name, v)
    return out


def load(name: str, variant: str | None) -> ml_collections.ConfigDict:
    return config_lib.load_config_file(os.path.join(CONFIGS, name + ".py"), variant)
