"""The DDPM setting (Tables 3 and 4) on CIFAR-10: WRN-28-10 (SiLU) + 1M DDPM images, TRADES-SE.

`--config configs/cifar10_ddpm.py[:variant]`, variant a comma list of: `beta3` (default beta 4),
`l2` (L2 eps 128/255), `wrn-70-16`. Set the generated data with
`--config.dataset.ddpm_path=/path/to/cifar10_ddpm.npz` (keys `image` uint8 Nx32x32x3, `label`).
As the reference (P2333/SCORE, train-wa.py): batch 512 with real fraction 0.3, 400 epochs of
ceil(50000/512) = 98 steps (the 1024 held-out images counted, as the reference counts them), each
epoch's real images the first 98 x 154 of a fresh permutation (core/data/semisup.py); SGD
Nesterov, weight decay 5e-4 (not on BatchNorm); PyTorch's OneCycleLR(max_lr=0.2,
pct_start=0.025, total_steps=400) stepped once per epoch: cosine from 0.008 up to 0.2 at epoch 9,
then down to 8e-7, with the momentum cycled 0.95 -> 0.85 -> 0.95; EMA tau 0.995 after a 2.5%
warm-up; BatchNorm momentum 1 for the first step (watrain.py); the logits layer initialised as
torch's nn.Linear with a zero bias (core/models/wideresnetwithswish.py); no clipping, no label
smoothing, crop + flip. The TRADES-SE attack runs with batch statistics without updating the
running averages: Linf from x + U(-eps, eps) (clamped to the box), 10 sign steps of 2/255; L2
(trades_loss_LSE) from 0.001 N(0, 1), 10 steps of 2 eps/10 along the normalised gradient, each
clipped to the box and then renormed to the ball. Best checkpoint by PGD-40 (the reference's CW
loss, `config.eval.pgd_cw`, as core/attacks/pgd.py: uniform start, steps of --attack-step's
default 2/255; L2: from a point of the image box scaled to the ball, box then ball) of the EMA on
1024 held-out images, every epoch, a new best on >=.

configs/cifar100_ddpm.py and configs/cifar10_ddpm_wrn70.py build on this file.
"""

from score_jax import config_lib
from score_jax.evaluators import pgd

OPTIONS = ("beta3", "l2", "wrn-70-16")


def get_config(variant: str = ""):
    _, options = config_lib.parse_variant(variant, OPTIONS)
    l2 = "l2" in options
    c = config_lib.base_config()
    c.dataset.real_fraction = 0.3  # dataset.ddpm_path: required, the generated .npz
    c.dataset.epoch_size = 50000  # the reference counts all 50000 images (validation included)
    c.dataset.real_sampling = "per_epoch"  # semisup.py: a fresh permutation every epoch
    c.model.name = "wrn-70-16" if "wrn-70-16" in options else "wrn-28-10"
    c.model.activation = "silu"
    c.model.init_scheme = "dm"  # wideresnetwithswish.py: nn.Linear's weight, zero bias
    c.bn_first_batch_stats = True  # watrain.py: BatchNorm momentum 1 for the first step
    c.batch_size = 512
    c.eval_batch_size = 512
    c.num_epochs = 400
    c.checkpoint_every_steps = 2000
    # OneCycleLR(max_lr=0.2, pct_start=0.025, total_steps=epochs) stepped once per epoch, the
    # momentum cycled 0.95 -> 0.85 -> 0.95 (OneCycleLR's default; optim.momentum unused).
    c.optim.learning_rate = 0.2
    c.optim.schedule = "one_cycle"
    c.optim.schedule_unit = "epoch"
    c.optim.cycle_momentum = True
    c.optim.nesterov = True
    c.optim.weight_decay_batchnorm = False
    c.loss.beta = 3.0 if "beta3" in options else 4.0
    # The attack: batch statistics, running averages not tracked (base's "batch_frozen", trades.py).
    if l2:
        # trades_loss_LSE's L2 loop: 0.001 N(0,1) start (base's), lr 2 eps / steps, box then renorm.
        c.attack.norm, c.attack.eps = "l2", 128 / 255
        c.attack.step_size = 2 * c.attack.eps / c.attack.num_steps
        c.attack.l2_rule = "box_then_ball"
    else:
        # x + U(-eps, eps) clamped to [0, 1], then sign steps of 2/255 (base's eps and step).
        c.attack.init = "uniform"
    # The reference's validation (watrain.py): PGD-40 on its CW loss of the EMA, every epoch, a
    # new best on >=, with core/attacks/pgd.py's start and steps (L2: a box point scaled to
    # the ball, box then ball) of --attack-step, whose default is 2/255 for both norms.
    del c.eval.pgd
    c.eval.pgd_cw = pgd.spec(
        c.attack,
        objective="cw_clamped",
        num_steps=40,
        step_size=2 / 255,
        init="box_point" if l2 else "uniform",
        l2_rule="advertorch" if l2 else "ball_then_box",
    )
    c.eval.select_by = ("pgd_cw",)
    c.eval.select_ties = "later"
    c.test.pgd.step_size = 16 / 255 if l2 else 2 / 255
    return c
