"""The DDPM setting (Tables 3 and 4) on CIFAR-10: WRN-28-10 (SiLU) + 1M DDPM images, TRADES-SE.

`--config configs/cifar10_ddpm.py[:variant]`, variant a comma list of: `beta3` (default beta 4),
`l2` (L2 eps 128/255), `wrn-70-16`. Set the generated data with
`--config.dataset.ddpm_path=/path/to/cifar10_ddpm.npz` (keys `image` uint8 Nx32x32x3, `label`).
As the reference (P2333/SCORE, train-wa.py): batch 512 with real fraction 0.3, 400 epochs of
ceil(50000/512) = 98 steps (the 1024 held-out images counted, as the reference counts them);
SGD Nesterov, weight decay 5e-4 (not on BatchNorm); PyTorch's OneCycleLR(max_lr=0.2,
pct_start=0.025, total_steps=400) stepped once per epoch: cosine from 0.008 up to 0.2 at epoch 9,
then down to 8e-7, with the momentum cycled 0.95 -> 0.85 -> 0.95; EMA tau 0.995 after a 2.5%
warm-up; no clipping, no label smoothing, crop + flip. The TRADES-SE attack runs with batch
statistics without updating the running averages: Linf from x + U(-eps, eps) (clamped to the
box), 10 sign steps of 2/255; L2 (trades_loss_LSE) from 0.001 N(0, 1), 10 steps of 2 eps/10 along
the normalised gradient, each clipped to the box and then renormed to the ball. Best checkpoint by
PGD-40 (the reference's CW loss, uniform start, `config.eval.pgd_cw`; steps of 2/255, 16/255 for
L2) of the EMA on 1024 held-out images, every epoch, a new best on >=.
"""

from score_jax import config_lib


def get_config(variant: str = ""):
    return config_lib.ddpm_config("cifar10", 0.3, variant)
