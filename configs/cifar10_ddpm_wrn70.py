"""The DDPM setting with WRN-70-16 (Table 4): configs/cifar10_ddpm.py:wrn-70-16 as its own file."""

from score_jax import config_lib


def get_config(variant: str = ""):
    return config_lib.ddpm_config("cifar10", 0.3, ",".join(v for v in ("wrn-70-16", variant) if v))
