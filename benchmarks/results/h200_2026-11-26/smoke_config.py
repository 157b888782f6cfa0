"""The H200 smoke run of the main job: configs/digits.py with WRN-28-10 in bfloat16 at batch 512
(CIFAR could not be fetched there). From the repository root, C=this file:

    python -m score_jax.main --config $C --workdir W                               # 20 steps
    python -m score_jax.main --config $C --workdir W --config.num_train_steps=30   # resumes
"""

import os

import ml_collections

from score_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = config_lib.load_config_file(os.path.join(ROOT, "configs", "digits.py"))
    c.model = ml_collections.ConfigDict(
        {"name": arg or "wrn-28-10", "activation": "", "conv_impl": "auto", "dtype": "bfloat16"}
    )
    c.batch_size = 512
    c.eval_batch_size = 360
    c.num_train_steps = 20
    c.checkpoint_every_steps = 10
    c.log_every_steps = 5
    c.eval_every_epochs = 0
    c.progress_bar = False
    return c
