"""Tests for the model zoo: shapes, parameter trees, BatchNorm behaviour, conv implementations.

CPU compilation dominates the runtime, so each tiny model is compiled once (`_run`, cached) and
variables are filled from numpy instead of a jitted `init`; the big models only go through
`jax.eval_shape`.
"""

import functools

import chex
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from score_jax.models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MODEL_NAMES,
    Conv,
    get_model,
    layers,
)
from score_jax.models.resnet import PreActResNet, ResNet
from score_jax.models.small import SmallCNN
from score_jax.models.wide_resnet import WideResNet

NUM_CLASSES = 10
SHAPE = (8, 16, 16, 3)  # Batch for the tiny models; 8 splits over the 4 fake devices.

# Tiny versions of each architecture. im2col compiles several times slower than XLA's native
# convolution on CPU, so it is used only where it is under test (and through "auto" for digits).
TINY = {
    "wrn": functools.partial(
        WideResNet, num_classes=NUM_CLASSES, depth=10, width=1, conv_impl="xla"
    ),
    "preact": functools.partial(
        PreActResNet, num_classes=NUM_CLASSES, num_blocks=(1,) * 4, base_width=4, conv_impl="xla"
    ),
    "resnet": functools.partial(
        ResNet, num_classes=NUM_CLASSES, num_blocks=(1,) * 4, base_width=4, conv_impl="xla"
    ),
    "small": functools.partial(
        SmallCNN, num_classes=NUM_CLASSES, width=4, hidden=8, conv_impl="xla"
    ),
}


def _images(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


@functools.cache
def _abstract_variables(model, shape=(2, 32, 32, 3)) -> dict:
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)


@functools.cache
def _variables(model, shape=SHAPE) -> dict:
    """Random variables of the right structure, from numpy (no XLA compilation)."""
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(size=leaf.shape).astype(np.float32) * np.sqrt(2.0 / fan_in)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, size=leaf.shape).astype(np.float32)
        return rng.normal(scale=0.1, size=leaf.shape).astype(np.float32)

    return jax.tree.map_with_path(fill, _abstract_variables(model, shape))


@functools.cache
def _run(model):
    """Jitted: train-mode logits, updated batch_stats and module outputs; eval-mode logits of the
    full batch and of its first example, both with the updated running statistics."""

    def run(variables, x):
        logits, state = model.apply(
            variables, x, True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
        )
        updated = {**variables, "batch_stats": state["batch_stats"]}
        return {
            "train": logits,
            "batch_stats": state["batch_stats"],
            "intermediates": state["intermediates"],
            "eval": model.apply(updated, x, False),
            "eval_first": model.apply(updated, x[:1], False),
        }

    return jax.jit(run)


def _paths(tree) -> set[str]:
    return {"/".join(k) for k in flax.traverse_util.flatten_dict(tree)}


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- Convolution implementations -------------------------------------------------------------


@pytest.mark.parametrize(
    "hw,k,stride,padding",
    [
        (8, 3, 1, ((1, 1), (1, 1))),
        (7, 3, 2, ((1, 1), (1, 1))),
        (8, 3, 2, ((0, 1), (0, 1))),
        (8, 1, 2, ((0, 0), (0, 0))),
        (8, 1, 1, ((0, 0), (0, 0))),
        (8, 3, 1, ((0, 2), (2, 0))),  # stride 1: hybrid's native input gradient (cin 16)
        (8, 3, 1, ((0, 0), (0, 0))),
        (8, 3, 1, ((3, 0), (0, 3))),  # padding > k - 1: im2col's input gradient
        (6, 1, 1, ((1, 0), (0, 1))),
    ],
)
@pytest.mark.parametrize("cin", [5, 16])  # hybrid's native input gradient needs >= 16
def test_im2col_and_hybrid_match_xla_forward_and_gradients(hw, k, stride, padding, cin):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, hw, hw, cin)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(k, k, cin, 6)), jnp.float32)
    ho = (hw + sum(padding[0]) - k) // stride + 1
    cot = jnp.asarray(rng.normal(size=(2, ho, ho, 6)), jnp.float32)

    @jax.jit
    def both(x, kernel, cot):
        outs = []
        for conv in (layers.conv_xla, layers.conv_im2col, layers.conv_hybrid):
            y, vjp = jax.vjp(
                lambda x, w, conv=conv: conv(x, w, (stride, stride), padding), x, kernel
            )
            outs.append((y, *vjp(cot)))
        return outs

    ref, *others = both(x, kernel, cot)
    for got in others:
        chex.assert_shape(got, [(2, ho, ho, 6), x.shape, kernel.shape])
        for r, g in zip(ref, got, strict=True):
            chex.assert_trees_all_close(g, r, atol=1e-5 * float(jnp.max(jnp.abs(r))), rtol=1e-5)


def test_conv_module_param_tree_independent_of_impl():
    x = _images(0, (2, 8, 8, 3))
    variables, outs = None, {}
    for impl in ("xla", "im2col", "hybrid", "auto"):
        conv = Conv(4, (3, 3), (2, 2), ((0, 1), (0, 1)), impl=impl)
        abstract = jax.eval_shape(conv.init, jax.random.key(0), x)
        assert _paths(abstract) == {"params/kernel"}
        chex.assert_shape(abstract["params"]["kernel"], (3, 3, 3, 4))
        variables = variables or {"params": {"kernel": _images(1, (3, 3, 3, 4))}}
        outs[impl] = conv.apply(variables, x)
    chex.assert_trees_all_close(outs["im2col"], outs["xla"], atol=1e-5)
    chex.assert_trees_all_close(outs["hybrid"], outs["xla"], atol=1e-5)
    assert layers.resolve_conv_impl("auto") == "hybrid"  # Tests run on CPU.


def test_small_wrn_same_logits_with_both_impls():
    variables, x = _variables(TINY["wrn"]()), _images()
    expected = _run(TINY["wrn"](conv_impl="xla"))(variables, x)
    model = TINY["wrn"](conv_impl="im2col")
    logits, state = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    chex.assert_trees_all_close(
        (logits, state["batch_stats"]),
        (expected["train"], expected["batch_stats"]),
        atol=1e-4,
        rtol=1e-4,
    )


# --- Shapes, parameter counts and names ------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_named_model_output_shape(name):
    model = get_model(name, num_classes=7)
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = _abstract_variables(model)
    assert set(variables) == {"params", "batch_stats"}
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    chex.assert_shape(out, (2, 7))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("arch", sorted(TINY))
def test_tiny_models_run(arch):
    model = TINY[arch]()
    out = _run(model)(_variables(model), _images())
    chex.assert_shape([out["train"], out["eval"]], (SHAPE[0], NUM_CLASSES))
    chex.assert_tree_all_finite(out)
    assert out["train"].dtype == out["eval"].dtype == jnp.float32


def test_small_cnn_on_digits_with_real_init():
    model = get_model("small-cnn", num_classes=10, mean=(0.5,), std=(0.25,), width=8)
    x = _images(0, (5, 8, 8, 1))
    # An rbg key compiles much faster on CPU than the default threefry.
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(0, impl="rbg"), x
    )
    logits, _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    chex.assert_shape(logits, (5, 10))
    chex.assert_tree_all_finite((logits, variables))


@pytest.mark.parametrize("name,expected", [("wrn-28-10", 36_479_194), ("wrn-70-16", 266_796_506)])
def test_wrn_param_counts(name, expected):
    assert _count(_abstract_variables(get_model(name, num_classes=10))["params"]) == expected


def _expected_wrn_paths(depth: int, width: int) -> tuple[set[str], set[str]]:
    """DMWideResNet state-dict names, in Flax form: (params paths, batch_stats paths)."""
    bns = ["batchnorm"]
    params = {"init_conv/kernel", "logits/kernel", "logits/bias"}
    channels = [16, 16 * width, 32 * width, 64 * width]
    for g in range(3):
        for i in range((depth - 4) // 6):
            prefix = f"layer_{g}/block_{i}"
            params |= {f"{prefix}/conv_0/kernel", f"{prefix}/conv_1/kernel"}
            bns += [f"{prefix}/batchnorm_0", f"{prefix}/batchnorm_1"]
            if i == 0 and channels[g] != channels[g + 1]:
                params.add(f"{prefix}/shortcut/kernel")
    params |= {f"{bn}/{p}" for bn in bns for p in ("scale", "bias")}
    return params, {f"{bn}/{s}" for bn in bns for s in ("mean", "var")}


@pytest.mark.parametrize("depth,width", [(28, 10), (10, 1)])
def test_wrn_param_tree_matches_dm_wide_resnet(depth, width):
    variables = _abstract_variables(WideResNet(num_classes=10, depth=depth, width=width))
    params, stats = _expected_wrn_paths(depth, width)
    assert _paths(variables["params"]) == params
    assert _paths(variables["batch_stats"]) == stats
    assert variables["params"]["init_conv"]["kernel"].shape == (3, 3, 3, 16)
    assert variables["params"]["logits"]["kernel"].shape == (64 * width, 10)
    has_shortcut = ["shortcut" in variables["params"][f"layer_{g}"]["block_0"] for g in range(3)]
    assert has_shortcut == [width != 1, True, True]


def test_resnet_param_trees():
    preact = _abstract_variables(get_model("preact-resnet-18", 10))["params"]
    resnet = _abstract_variables(get_model("resnet-18", 10))["params"]
    stages = {f"layer{s}_{i}" for s in range(1, 5) for i in range(2)}
    assert set(preact) == {"conv1", "bn", "linear"} | stages
    assert set(resnet) == {"conv1", "bn1", "linear"} | stages
    assert set(preact["layer1_0"]) == {"bn1", "conv1", "bn2", "conv2"}
    assert set(preact["layer2_0"]) == {"bn1", "conv1", "bn2", "conv2", "shortcut"}
    block = {"conv1", "bn1", "conv2", "bn2"}
    assert set(resnet["layer1_1"]) == block
    assert set(resnet["layer3_0"]) == block | {"shortcut_conv", "bn_shortcut"}
    assert preact["layer2_0"]["shortcut"]["kernel"].shape == (1, 1, 64, 128)
    assert _count(preact) == 11_172_170
    assert _count(resnet) == 11_173_962


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_batchnorm_names(name):
    """BatchNorm modules (scale+bias leaves) start with batchnorm/bn; no other module does."""
    flat = flax.traverse_util.flatten_dict(_abstract_variables(get_model(name, 10))["params"])
    modules = {path[:-1] for path in flat}
    prefixes = {path[:i] for path in modules for i in range(1, len(path))}
    for path in modules | prefixes:
        is_bn = path in modules and {k[-1] for k in flat if k[:-1] == path} == {"scale", "bias"}
        assert path[-1].startswith(("batchnorm", "bn")) == is_bn, path


# --- BatchNorm behaviour ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["wrn", "resnet"])
def test_eval_mode_deterministic_and_batch_independent(arch):
    model = TINY[arch]()
    out = _run(model)(_variables(model), _images())
    again = _run(model)(_variables(model), _images())
    chex.assert_trees_all_equal(out["eval"], again["eval"])
    chex.assert_trees_all_close(out["eval_first"], out["eval"][:1], atol=1e-5, rtol=1e-5)


def test_train_mode_updates_running_stats_eval_mode_immutable():
    model = TINY["small"]()
    variables, x = _variables(model), _images()
    out = _run(model)(variables, x)
    old, new = variables["batch_stats"], out["batch_stats"]
    chex.assert_trees_all_equal_structs(old, new)
    for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new), strict=True):
        assert not np.allclose(a, b)
    assert not np.allclose(out["train"], out["eval"])  # Batch vs running statistics.
    # Eval mode needs no `mutable` and returns the logits alone.
    logits = model.apply(variables, x[:1], train=False)
    chex.assert_shape(logits, (1, NUM_CLASSES))


@pytest.mark.parametrize(
    "arch,bn_input,bn_name,momentum",
    [("wrn", "layer_2", "batchnorm", 0.99), ("resnet", "conv1", "bn1", 0.9)],
)
def test_batchnorm_momentum(arch, bn_input, bn_name, momentum):
    model = TINY[arch]()
    variables = _variables(model)
    out = _run(model)(variables, _images())
    features = out["intermediates"][bn_input]["__call__"][0]
    expected = momentum * variables["batch_stats"][bn_name]["mean"] + (1 - momentum) * jnp.mean(
        features, axis=(0, 1, 2)
    )
    chex.assert_trees_all_close(out["batch_stats"][bn_name]["mean"], expected, atol=1e-5)


def test_synced_batchnorm_in_shard_map_matches_full_batch():
    mesh = jax.make_mesh((4,), ("batch",), axis_types=(jax.sharding.AxisType.Auto,))
    plain, synced = TINY["wrn"](), TINY["wrn"](bn_axis_name="batch")
    variables, x = _variables(plain), _images()
    expected = _run(plain)(variables, x)
    sharded = jax.shard_map(
        functools.partial(synced.apply, train=True, mutable=["batch_stats"]),
        mesh=mesh,
        in_specs=(PartitionSpec(), PartitionSpec("batch")),
        out_specs=(PartitionSpec("batch"), PartitionSpec()),
    )
    logits, state = jax.jit(sharded)(variables, x)
    chex.assert_trees_all_close(
        (logits, state["batch_stats"]),
        (expected["train"], expected["batch_stats"]),
        atol=1e-4,
        rtol=1e-4,
    )


# --- Options ---------------------------------------------------------------------------------


def test_normalisation_inside_model():
    mean, std = (0.3, 0.5, 0.7), (0.2, 0.3, 0.4)
    default = TINY["small"]()
    assert default.mean == CIFAR10_MEAN and default.std == CIFAR10_STD
    custom = TINY["small"](mean=mean, std=std)
    identity = TINY["small"](mean=(0.0,) * 3, std=(1.0,) * 3)
    variables, x = _variables(default), _images()

    @jax.jit
    def outputs(variables, x):
        x_normalised = (x - jnp.array(mean)) / jnp.array(std)
        return [
            default.apply(variables, x, False),
            custom.apply(variables, x, False),
            identity.apply(variables, x_normalised, False),
        ]

    out_default, out_custom, out_identity = outputs(variables, x)
    assert not np.allclose(out_default, out_custom)
    chex.assert_trees_all_close(out_identity, out_custom, atol=1e-5)


def test_activations():
    assert get_model("wrn-16-2", 10).activation == "silu"
    for name in ("preact-resnet-18", "resnet-18", "small-cnn"):
        assert get_model(name, 10).activation == "relu"
    silu, relu = TINY["small"](activation="silu"), TINY["small"]()
    variables, x = _variables(relu), _images()
    outputs = jax.jit(lambda v, x: [m.apply(v, x, False) for m in (silu, relu)])(variables, x)
    assert not np.allclose(*outputs)


def test_compute_dtype_bfloat16():
    model = TINY["small"](dtype=jnp.bfloat16)
    abstract = _abstract_variables(model, SHAPE)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
    out = _run(model)(_variables(model), _images())
    assert out["train"].dtype == out["eval"].dtype == jnp.float32
    chex.assert_tree_all_finite(out["train"])


def test_get_model_errors():
    with pytest.raises(ValueError) as err:
        get_model("wrn-28-11", 10)
    message = str(err.value)
    assert "\n" not in message and all(name in message for name in MODEL_NAMES)
    with pytest.raises(ValueError, match="activation"):
        get_model("wrn-16-2", 10, activation="tanh")
    with pytest.raises(ValueError, match="conv_impl"):
        get_model("resnet-18", 10, conv_impl="cudnn")
    with pytest.raises(ValueError, match="activation"):
        init = functools.partial(TINY["small"](activation="gelu").init, train=False)
        jax.eval_shape(init, jax.random.key(0), _images())


def test_torch_init_scheme_matches_pytorch_default_initialisation():
    """init_scheme "torch": PreAct-ResNet-18's weights drawn as PyTorch's nn.Conv2d / nn.Linear
    defaults (kaiming-uniform a=sqrt(5): U(+-1/sqrt(fan_in)); bias U(+-1/sqrt(fan_in)))."""
    torch = pytest.importorskip("torch")
    from score_jax import models

    def init_params(model):
        # Parameters only, rbg keys: a fraction of the full init's compile time on CPU.
        init = lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False)["params"]  # noqa: E731
        return jax.jit(init)(jax.random.key(0, impl="rbg"))

    params = init_params(models.get_model("preact-resnet-18", 10, init_scheme="torch"))
    torch.manual_seed(0)
    cases = [
        (params["conv1"]["kernel"], torch.nn.Conv2d(3, 64, 3, bias=False).weight, 27),
        (params["layer4_1"]["conv2"]["kernel"], torch.nn.Conv2d(512, 512, 3).weight, 4608),
        (params["layer2_0"]["shortcut"]["kernel"], torch.nn.Conv2d(64, 128, 1).weight, 64),
        (params["linear"]["kernel"], torch.nn.Linear(512, 10).weight, 512),
        (params["linear"]["bias"], torch.nn.Linear(512, 10).bias, 512),
    ]
    for ours, theirs, fan_in in cases:
        ours, theirs = np.asarray(ours), theirs.detach().numpy()
        assert ours.size == theirs.size
        bound = 1.0 / np.sqrt(fan_in) * (1 + 1e-6)  # float32 rounding of the bound
        assert np.abs(theirs).max() <= bound  # the formula is torch's
        assert np.abs(ours).max() <= bound
        if ours.size >= 1000:
            np.testing.assert_allclose(np.var(theirs), bound**2 / 3, rtol=0.06)
            np.testing.assert_allclose(np.var(ours), bound**2 / 3, rtol=0.06)
            assert np.abs(ours).max() > 0.99 * bound  # uniform up to the bound, not a normal
    # The default scheme is unchanged (Flax's Dense: zero bias).
    p0 = init_params(models.get_model("small-cnn", 10, width=4, hidden=8))
    assert not np.any(np.asarray(p0["logits"]["bias"]))
    with pytest.raises(ValueError, match="init_scheme"):
        models.get_model("preact-resnet-18", 10, init_scheme="xavier")
