"""The DDPM setting on CIFAR-100: configs/cifar10_ddpm.py (its variants too) with real fraction
0.4 (beta 4) and the reference's extra augmentation: a random rotation U(-15, 15) degrees
(torchvision RandomRotation(15): nearest, zero fill) after crop and flip, for real and generated
images.

Set `--config.dataset.ddpm_path` to the CIFAR-100 generated .npz.
"""

import os

from score_jax import config_lib

CIFAR10_DDPM = config_lib.load_config_module(
    os.path.join(os.path.dirname(__file__), "cifar10_ddpm.py")
)


OPTIONS = CIFAR10_DDPM.OPTIONS


def get_config(variant: str = ""):
    c = CIFAR10_DDPM.get_config(variant)
    c.dataset.name = "cifar100"
    c.dataset.real_fraction = 0.4  # --unsup-fraction 0.6
    c.augment.rotation_degrees = 15.0  # RandomRotation(15) after crop and flip (cifar100s.py)
    return c
