"""The basic setting (Tables 1 and 2): PreAct-ResNet-18 on CIFAR-10, no generated data.

Variants pick the row: `--config configs/cifar10_basic.py:<type>-<kind>[-clip][-l2]`, e.g.
`pgd_at-kl` (Madry), `pgd_at-se`, `pgd_at-se-clip`, `trades-kl`, `trades-se` (default),
`trades-se-clip`, `pgd_at-js_dist` (Table 1), `trades-se-l2` (L2 threat model, eps 128/255).
As the reference (without_DDPM/train_cifar.py): PyTorch's default initialisation; SGD momentum
0.9, weight decay 5e-4 on every parameter, batch 128, 110 epochs, lr x0.1 at epochs 100 and 105;
initial lr 0.1 for KL, 0.05 otherwise (the paper uses 0.05 for SE); PGD-10 with step 2/255
(16/255 for L2); TRADES beta 6; clipping at c = 0.4 (PGD-AT) / 0.3 (TRADES). The TRADES attack
starts from 0.001 N(0, 1) with the model in eval mode; the PGD-AT attack starts from
U(-eps, eps) in train mode, each of its 10 passes updating the BatchNorm running averages.
Best checkpoint (raw parameters, every epoch) by the min of the PGD-10 accuracies under
cross-entropy (`config.eval.pgd`) and under the training divergence (`config.eval.pgd_<kind>`; one
evaluator for KL) on 1024 held-out images, a new best only when strictly greater; the reference
code selects on the test set.
"""

from score_jax import config_lib, losses
from score_jax.errors import ConfigError


def get_config(variant: str = "trades-se"):
    parts = variant.split("-")
    loss_type, kind = parts[0], parts[1] if len(parts) > 1 else "se"
    flags = set(parts[2:])
    if loss_type not in ("trades", "pgd_at") or kind not in losses.DIVERGENCES:
        raise ConfigError(
            f"config variant {variant!r}: expected <trades|pgd_at>-<kind>[-clip][-l2]"
        )
    if flags - {"clip", "l2"}:
        raise ConfigError(f"config variant {variant!r}: unknown options {sorted(flags)}")

    c = config_lib.base_config()
    c.dataset.name = "cifar10"
    c.dataset.num_validation = 1024
    c.model.name = "preact-resnet-18"
    c.model.init_scheme = "torch"  # PyTorch's default init, as without_DDPM/preactresnet.py
    c.batch_size = 128
    c.num_epochs = 110
    c.optim.schedule = "piecewise"
    c.optim.lr_boundaries_epochs = (100, 105)
    c.optim.lr_decay_factor = 0.1
    c.optim.learning_rate = 0.1 if kind == "kl" else 0.05
    c.optim.momentum = 0.9
    c.optim.nesterov = False
    c.optim.weight_decay = 5e-4
    c.optim.weight_decay_batchnorm = True
    c.loss.type = loss_type
    c.loss.kind = kind
    c.loss.beta = 6.0
    c.loss.clip_c = (0.4 if loss_type == "pgd_at" else 0.3) if "clip" in flags else None
    c.attack.num_steps = 10
    if "l2" in flags:
        c.attack.norm, c.attack.eps, c.attack.step_size = "l2", 128 / 255, 16 / 255
    else:
        c.attack.norm, c.attack.eps, c.attack.step_size = "linf", 8 / 255, 2 / 255
    c.attack.init = "uniform" if loss_type == "pgd_at" else "normal"
    # train_cifar.py: TRADES attacks in model.eval(); PGD-AT's attack stays in train mode, so
    # each of its passes updates the running averages.
    c.attack.batchnorm = "batch_update" if loss_type == "pgd_at" else "eval"
    # Selection as the reference: every epoch, min of PGD-10 (CE) and PGD-10 (the training
    # divergence) accuracies of the raw parameters, both from a uniform start, a new best on >.
    c.eval.pgd.num_steps = 10
    c.eval.pgd.step_size = c.attack.step_size
    c.eval.select_by = ("pgd",)
    if kind != "kl":  # D = KL against one-hot labels is the cross-entropy
        c.eval[f"pgd_{kind}"] = config_lib.pgd_evaluator(
            c.attack, objective=kind, num_steps=10, step_size=c.attack.step_size
        )
        c.eval.select_by = ("pgd", f"pgd_{kind}")
    c.eval.select_ties = "strict"
    c.test.pgd.num_steps = 20
    c.test.pgd.step_size = c.attack.step_size
    c.best_by = "raw"  # no weight averaging in the basic setting
    c.eval_every_epochs = 1
    return c
