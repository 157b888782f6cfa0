"""The DDPM setting on CIFAR-100: as configs/cifar10_ddpm.py, with real fraction 0.4 (beta 4)
and the reference's extra augmentation: a random rotation U(-15, 15) degrees (torchvision
RandomRotation(15): nearest, zero fill) after crop and flip, for real and generated images.

Set `--config.dataset.ddpm_path` to the CIFAR-100 generated .npz.
"""

from score_jax import config_lib


def get_config(variant: str = ""):
    c = config_lib.ddpm_config("cifar100", 0.4, variant)
    c.augment.rotation_degrees = 15.0  # RandomRotation(15) after crop and flip (cifar100s.py)
    return c
