"""Shared helpers for the tests that run `python -m score_jax.main` as a user would."""

import ast
import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = [
    "--config.num_train_steps=3",
    "--config.model.width=4",
    "--config.model.hidden=8",
    "--config.model.conv_impl=xla",
    "--config.batch_size=16",
    "--config.eval_batch_size=60",
    "--config.attack.num_steps=2",
    "--config.eval.num_steps=1",
    "--config.test.num_steps=1",
    "--config.eval_every_epochs=0",
    "--config.progress_bar=False",
]


def digits_tiny_config():
    """configs/digits.py with OVERRIDES applied as the command line does."""
    spec = importlib.util.spec_from_file_location("digits", os.path.join(REPO, "configs/digits.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in OVERRIDES:
        key, value = item.removeprefix("--config.").split("=")
        *path, last = key.split(".")
        node = config
        for p in path:
            node = node[p]
        try:
            node[last] = ast.literal_eval(value)
        except ValueError:
            node[last] = value
    return config
