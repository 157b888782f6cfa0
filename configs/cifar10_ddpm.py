"""The DDPM setting (Tables 3 and 4) on CIFAR-10: WRN-28-10 (SiLU) + 1M DDPM images, TRADES-SE.

`--config configs/cifar10_ddpm.py[:variant]`, variant a comma list of: `beta3` (default beta 4),
`l2` (L2 eps 128/255, step 16/255), `wrn-70-16`. Set the generated data with
`--config.dataset.ddpm_path=/path/to/cifar10_ddpm.npz` (keys `image` uint8 Nx32x32x3, `label`).
Batch 512 with real fraction 0.3, 400 epochs, SGD Nesterov 0.9, weight decay 5e-4 (not on
BatchNorm), lr 0.2 with one-cycle cosine (2.5% warm-up from lr/25), EMA tau 0.995, no clipping,
no label smoothing, crop + flip; best checkpoint by PGD-40 (the reference's CW loss, uniform start,
`config.eval.pgd_cw`) of the EMA on 1024 held-out images, every epoch, a new best on >=.
"""

from score_jax import config_lib


def get_config(variant: str = ""):
    return config_lib.ddpm_config("cifar10", 0.3, variant)
