"""The basic setting (Tables 1 and 2): PreAct-ResNet-18 on CIFAR-10, no generated data.

Variants pick the row: `--config configs/cifar10_basic.py:<method>-<divergence>[,clip][,l2]`,
e.g. `pgd_at-kl` (Madry), `pgd_at-se`, `pgd_at-se,clip`, `trades-kl`, `trades-se` (default),
`trades-se,clip`, `pgd_at-js_dist` (Table 1), `trades-se,l2` (L2 threat model, eps 128/255).
As the reference (without_DDPM/train_cifar.py): PyTorch's default initialisation; SGD momentum
0.9, weight decay 5e-4 on every parameter, batch 128, 110 epochs of ceil(50000 / 128) = 391 steps
(43010 in all; the 1024 held-out images counted, as the reference trains on all 50000), lr x0.1
at epochs 100 and 105 (from steps 39099 and 41054: each step takes the lr of its end);
initial lr 0.1 for KL, 0.05 otherwise (the paper uses 0.05 for SE); PGD-10 with step 2/255
(16/255 for L2); TRADES beta 6; clipping at c = 0.4 (PGD-AT) / 0.3 (TRADES). The TRADES attack
starts from 0.001 N(0, 1) with the model in eval mode; the PGD-AT attack starts from
U(-eps, eps) in train mode, each of its 10 passes updating the BatchNorm running averages.
Best checkpoint (raw parameters, every epoch) by the min of the PGD-10 accuracies under
cross-entropy (`config.eval.pgd`) and under the training divergence (`config.eval.pgd_<div>`; one
evaluator for KL) on 1024 held-out images, a new best only when strictly greater; the reference
code selects on the test set.
"""

from score_jax import config_lib
from score_jax.evaluators import pgd

SPELLING = "<trades|pgd_at>-<divergence>[,clip][,l2]"
HEADS = config_lib.LOSS_ROWS  # the variant's first item: the row
OPTIONS = ("clip", "l2")


def get_config(variant: str = "trades-se"):
    row, options = config_lib.parse_variant(variant, OPTIONS, heads=HEADS, spelling=SPELLING)
    method, divergence = row.split("-", 1)
    c = config_lib.base_config()  # CIFAR-10, PreAct-ResNet-18, batch 128, 110 epochs, SGD, ...
    c.model.init_scheme = "torch"  # PyTorch's default init, as without_DDPM/preactresnet.py
    # train_cifar.py's epoch: 391 iterations over all 50000 images (1024 are held out here, see
    # the README), each at the lr of epoch + (i + 1) / 391: the drops at steps 39099 and 41054.
    c.dataset.epoch_size = 50000
    c.optim.schedule_unit = "step_end"
    c.update_from_flattened_dict(config_lib.paper_loss(method, divergence, "clip" in options))
    # train_cifar.py: TRADES attacks in model.eval(); PGD-AT's attack stays in train mode, so
    # each of its passes updates the running averages.
    c.attack.batchnorm = "batch_update" if method == "pgd_at" else "eval"
    c.loss.trades_pass_order = "adv_first"  # train_cifar.py: f(x_adv), then f(x)
    if "l2" in options:
        c.attack.norm, c.attack.eps, c.attack.step_size = "l2", 128 / 255, 16 / 255
        c.eval.pgd.step_size = c.test.pgd.step_size = c.attack.step_size
        # attack_pgd(_divergence)'s L2 start: a normal direction at radius U(0, 1) eps.
        c.eval.pgd.init = "uniform_radius"
        if method == "pgd_at":
            c.attack.init = "uniform_radius"
    # Selection as the reference: every epoch, min of PGD-10 (CE) and PGD-10 (the training
    # divergence) accuracies of the raw parameters, both from a uniform start, a new best on >.
    if divergence != "kl":  # D = KL against one-hot labels is the cross-entropy
        c.eval[f"pgd_{divergence}"] = pgd.spec(
            c.attack, objective=divergence, num_steps=10, step_size=c.attack.step_size
        )
        c.eval[f"pgd_{divergence}"].init = c.eval.pgd.init
        c.eval.select_by = ("pgd", f"pgd_{divergence}")
    c.test.pgd.num_steps = 10  # Table 1: PGD-10 (CE), eval_cifar.py; Table 2: c.test.autoattack
    c.best_by = "raw"  # no weight averaging in the basic setting
    return c
