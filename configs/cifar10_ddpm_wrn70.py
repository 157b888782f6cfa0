"""The DDPM setting with WRN-70-16 (Table 4): configs/cifar10_ddpm.py:wrn-70-16 as its own file."""

import os

from score_jax import config_lib

CIFAR10_DDPM = config_lib.load_config_module(
    os.path.join(os.path.dirname(__file__), "cifar10_ddpm.py")
)


OPTIONS = tuple(o for o in CIFAR10_DDPM.OPTIONS if o != "wrn-70-16")


def get_config(variant: str = ""):
    return CIFAR10_DDPM.get_config(",".join(v for v in ("wrn-70-16", variant) if v))
