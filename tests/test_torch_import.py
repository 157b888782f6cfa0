"""Released PyTorch checkpoints (the reference's PreAct-ResNet-18 files, RobustBench-style WRN state
dicts) load into the Flax models: same logits as the PyTorch model that wrote them, and a bad file
is one line naming the offending key."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from score_jax import models  # noqa: E402
from score_jax.errors import CheckpointError  # noqa: E402
from score_jax.models.layers import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402
from score_jax.torch_bridge.models import build_torch_model  # noqa: E402
from score_jax.torch_bridge.released import load_variables  # noqa: E402


# A transcription of the reference's `without_DDPM/preactresnet.py` (ReLU, BatchNorm with
# running statistics): the module names are what its checkpoints hold.
class RefPreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            )
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        return self.conv2(self.relu(self.bn2(out))) + shortcut


class RefPreActResNet18(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, 1)
        self.layer2 = self._make_layer(128, 2)
        self.layer3 = self._make_layer(256, 2)
        self.layer4 = self._make_layer(512, 2)
        self.bn = nn.BatchNorm2d(512)
        self.linear = nn.Linear(512, num_classes)
        self.relu = nn.ReLU()

    def _make_layer(self, planes, stride):
        layers = []
        for s in (stride, 1):
            layers.append(RefPreActBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):  # x already normalised, as the reference calls model(normalize(X))
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        out = self.relu(self.bn(out))
        out = F.avg_pool2d(out, out.shape[-1])  # the reference's avg_pool2d(out, 4) at 32x32
        return self.linear(out.flatten(1))


def randomise_batchnorm(model: nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters (fresh ones are 0 / 1)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


def template_of(flax_model, shape):
    return jax.eval_shape(
        lambda: flax_model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
    )


def jax_logits(flax_model, variables, x_nhwc: np.ndarray) -> np.ndarray:
    return np.asarray(flax_model.apply(variables, jnp.asarray(x_nhwc), train=False))


@torch.no_grad()
def test_reference_preact_checkpoint_gives_its_logits(tmp_path):
    torch.manual_seed(0)
    ref = RefPreActResNet18().eval()
    randomise_batchnorm(ref, 1)
    path = tmp_path / "model_best.pth"
    # What train_cifar.py saves: a dict around the DataParallel state dict.
    wrapped = nn.DataParallel(ref).state_dict()
    torch.save({"state_dict": wrapped, "test_robust_acc_KL": 0.5, "test_acc": 0.8}, path)

    shape = (8, 8, 3)
    flax_model = models.get_model("preact-resnet-18", 10, conv_impl="xla")
    variables = load_variables(str(path), "preact-resnet-18", template_of(flax_model, shape))
    x = np.random.default_rng(0).uniform(0, 1, (4, *shape)).astype(np.float32)
    mu = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    sd = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    expected = ref((torch.from_numpy(x).permute(0, 3, 1, 2) - mu) / sd).numpy()
    np.testing.assert_allclose(jax_logits(flax_model, variables, x), expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("wrapper", ["bare", "model_state_dict", "compiled"])
@torch.no_grad()
def test_wrn_state_dict_wrappers(tmp_path, wrapper):
    torch.manual_seed(1)
    twin = build_torch_model("wrn-16-2", 10).eval()  # RobustBench DMWideResNet's names
    randomise_batchnorm(twin, 2)
    state = twin.state_dict()
    if wrapper == "model_state_dict":  # core/utils/train.py save_model, DataParallel inside
        obj = {"model_state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif wrapper == "compiled":
        obj = {f"_orig_mod.{k}": v for k, v in state.items()}
    else:
        obj = dict(state)
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    shape = (16, 16, 3)
    flax_model = models.get_model("wrn-16-2", 10, conv_impl="xla")
    variables = load_variables(str(path), "wrn-16-2", template_of(flax_model, shape))
    x = np.random.default_rng(1).uniform(0, 1, (3, *shape)).astype(np.float32)
    expected = twin(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(jax_logits(flax_model, variables, x), expected, atol=2e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def wrn_state():
    torch.manual_seed(2)
    return build_torch_model("wrn-16-2", 10).state_dict()


@pytest.fixture(scope="module")
def wrn_template():
    return template_of(models.get_model("wrn-16-2", 10, conv_impl="xla"), (16, 16, 3))


def test_normalisation_buffers_are_checked(tmp_path, wrn_state, wrn_template):
    good = dict(wrn_state, mean=torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1),
                std=torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))  # fmt: skip
    torch.save(good, tmp_path / "good.pt")
    load_variables(str(tmp_path / "good.pt"), "wrn-16-2", wrn_template, CIFAR10_MEAN, CIFAR10_STD)
    bad = dict(good, mean=torch.tensor([0.5, 0.5, 0.5]))
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad\.pt.*'mean'"):
        load_variables(
            str(tmp_path / "bad.pt"), "wrn-16-2", wrn_template, CIFAR10_MEAN, CIFAR10_STD
        )


def _save(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def test_bad_files_name_file_and_key(tmp_path, wrn_state, wrn_template):
    cases = {
        "missing.pt": ({k: v for k, v in wrn_state.items() if k != "logits.weight"},
                       "logits.weight"),
        "extra.pt": (dict(wrn_state, **{"head.weight": torch.zeros(2)}), "head.weight"),
        "shape.pt": (dict(wrn_state, **{"init_conv.weight": torch.zeros(16, 3, 5, 5)}),
                     "init_conv.weight"),
        "nodict.pt": ([torch.zeros(1)], "not a state dict"),
        "nowrap.pt": ({"epoch": 3, "acc": 0.5}, "none of the keys"),
    }  # fmt: skip
    for name, (obj, expected) in cases.items():
        path = _save(tmp_path, name, obj)
        with pytest.raises(CheckpointError) as err:
            load_variables(path, "wrn-16-2", wrn_template)
        message = str(err.value)
        assert name in message and expected in message and "\n" not in message, message
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pt.*cannot be loaded"):
        load_variables(str(tmp_path / "junk.pt"), "wrn-16-2", wrn_template)
    with pytest.raises(CheckpointError, match="file not found"):
        load_variables(str(tmp_path / "absent.pt"), "wrn-16-2", wrn_template)


def _trained_small_cnn(dataset, steps: int = 150) -> nn.Module:
    """The torch twin of the digits small CNN, trained briefly in PyTorch (so that its
    predictions are not trivial)."""
    torch.manual_seed(3)
    model = build_torch_model(
        "small-cnn", 10, width=8, hidden=16, mean=dataset.mean, std=dataset.std
    )
    x = torch.from_numpy(dataset.train.images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    y = torch.from_numpy(dataset.train.labels.astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval()


def test_init_from_evaluates_and_starts_from_a_released_checkpoint(tmp_path):
    import subprocess
    import sys

    from cli_helpers import AUTOATTACK_QUICK, REPO

    from score_jax import checkpoint, trainer
    from score_jax.data import digits

    dataset = digits.load()
    model = _trained_small_cnn(dataset)
    path = tmp_path / "released.pth"
    torch.save({"model_state_dict": nn.DataParallel(model).state_dict()}, path)
    with torch.no_grad():
        x = torch.from_numpy(dataset.test.images.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        predicted = model(x).argmax(1).numpy()
    torch_accuracy = float(np.mean(predicted == dataset.test.labels))
    assert torch_accuracy > 0.5  # a non-trivial model

    overrides = {
        "init_from": str(path),
        "model.width": 8,
        "model.hidden": 16,
        "model.conv_impl": "xla",
        "eval_batch_size": 60,
        "test.pgd.num_steps": 1,
        **AUTOATTACK_QUICK,
    }
    workdir = tmp_path / "eval"
    cmd = [sys.executable, "-m", "score_jax.main", "--config", "configs/digits.py"]
    cmd += ["--workdir", str(workdir), "--mode", "eval"]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    results = json.loads((workdir / "results.json").read_text())
    assert results["checkpoint"] == str(path) and results["step"] == 0
    assert results["test_ema"]["clean_accuracy"] == pytest.approx(torch_accuracy, abs=1e-9)

    # Fine-tuning starts from the imported weights (params, EMA and BatchNorm statistics).
    from score_jax import config_lib

    config = config_lib.load_config_file(f"{REPO}/configs/digits.py")
    config.update_from_flattened_dict(overrides)
    setup = trainer.Setup(config, str(tmp_path / "fine"))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "fine"))
    state, meta = trainer._restore_or_init(setup, ckpt)
    ckpt.close()
    assert meta == {} and int(state.step) == 0
    expected = dict(model.state_dict())
    np.testing.assert_array_equal(
        np.asarray(state.params["logits"]["kernel"]), expected["logits.weight"].numpy().T
    )
    np.testing.assert_array_equal(
        np.asarray(state.ema_params["conv_0"]["kernel"]),
        expected["conv_0.weight"].numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        np.asarray(state.batch_stats["batchnorm_1"]["var"]),
        expected["batchnorm_1.running_var"].numpy(),
    )


def test_non_finite_or_impossible_weights_are_refused_naming_the_tensor(
    tmp_path, wrn_state, wrn_template
):
    """One NaN weight, an inf bias, a running variance of -1: each made --mode eval report
    made-up accuracies; now each is refused on load, naming the tensor."""
    nan = {k: v.clone() for k, v in wrn_state.items()}
    nan["init_conv.weight"][0, 0, 0, 0] = float("nan")
    inf = dict(wrn_state, **{"logits.bias": torch.full((10,), float("inf"))})
    var = {k: v.clone() for k, v in wrn_state.items()}
    var["layer.0.block.0.batchnorm_0.running_var"][3] = -1.0
    cases = {
        "nan.pt": (nan, "'init_conv.weight' holds 1 non-finite value(s) (NaN)"),
        "inf.pt": ({"state_dict": inf}, "'logits.bias' holds 10 non-finite value(s) (inf)"),
        "var.pt": (var, "'layer.0.block.0.batchnorm_0.running_var' (a BatchNorm running "
                   "variance) holds 1 negative value(s) (min -1)"),
    }  # fmt: skip
    for name, (obj, expected) in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_variables(_save(tmp_path, name, obj), "wrn-16-2", wrn_template)
        message = str(err.value)
        assert name in message and expected in message and "\n" not in message, message
