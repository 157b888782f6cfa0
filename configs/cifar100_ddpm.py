"""The DDPM setting on CIFAR-100: as configs/cifar10_ddpm.py, with real fraction 0.4 (beta 4).

Set `--config.dataset.ddpm_path` to the CIFAR-100 generated .npz.
"""

from score_jax import config_lib


def get_config(variant: str = ""):
    return config_lib.ddpm_config("cifar100", 0.4, variant)
