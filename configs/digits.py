"""The offline quick start: TRADES-SE on scikit-learn's digits (8x8 grey, 10 classes), small CNN.

Runs on a 2-core CPU in about a minute and a half, the test AutoAttack included; no download.
Linf eps 0.1 on pixels in [0, 1] (the digits take 17 grey levels, 1/16 apart): an undefended
small CNN falls to ~14% PGD-20 accuracy there.
"""

from score_jax import config_lib


def get_config():
    c = config_lib.base_config()  # TRADES-SE, beta 6, PGD-10 from 0.001 N(0, 1), SGD lr 0.05
    c.dataset.name = "digits"
    c.dataset.num_validation = 180  # the digits split is fixed: 1257 train / 180 val / 360 test
    c.model.name = "small-cnn"
    c.model.width = 32
    c.model.hidden = 128
    c.batch_size = 64
    c.eval_batch_size = 180
    c.num_epochs = 30
    c.log_every_steps = 20
    c.eval_every_epochs = 5
    c.checkpoint_every_steps = 200
    c.augment.crop_padding = 1
    c.augment.flip = False  # a mirrored digit is another symbol
    c.attack.eps = 0.1
    c.attack.step_size = 0.025
    c.optim.schedule = "cosine"
    c.optim.nesterov = True
    c.eval.pgd.step_size = 0.025
    c.test.pgd.step_size = 0.025
    return c
