"""Layers shared by the model zoo: a convolution with a switchable implementation, helpers."""

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from score_jax.errors import ConfigError

Padding = tuple[tuple[int, int], tuple[int, int]]
Dtype = Any

# PyTorch padding=1 at any stride (Flax "SAME" would pad (0, 1) at stride 2 on even sizes).
PAD_1: Padding = ((1, 1), (1, 1))
PAD_NONE: Padding = ((0, 0), (0, 0))

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

CONV_IMPLS = ("xla", "im2col", "hybrid", "auto")
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {"silu": nn.silu, "relu": nn.relu}

# He-normal (fan_out), as torchvision initialises ResNet convolutions.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# "default": He-normal (fan_out) convolutions, Flax's Dense (LeCun normal, zero bias); "torch":
# PyTorch's defaults everywhere; "dm": the reference's DeepMind-style WRN
# (core/models/wideresnetwithswish.py): He-normal (fan_out) convolutions, nn.Linear's default
# weight U(+-1/sqrt(fan_in)) and a zero bias.
INIT_SCHEMES = ("default", "torch", "dm")
# PyTorch's nn.Conv2d / nn.Linear default: kaiming_uniform(a=sqrt(5)), i.e. U(+-1/sqrt(fan_in))
# with fan_in = kh * kw * cin (HWIO) or the Dense input size.
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> Callable:
    """PyTorch's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / fan_in**0.5

    def init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def check_init_scheme(name: str) -> str:
    if name not in INIT_SCHEMES:
        raise ValueError(f"Unknown init_scheme {name!r}; valid: {', '.join(INIT_SCHEMES)}.")
    return name


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function called `name`."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"Unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def resolve_conv_impl(impl: str) -> str:
    """Maps "auto" to "hybrid" on CPU and "xla" elsewhere; validates the name."""
    if impl not in CONV_IMPLS:
        raise ConfigError(f"Unknown conv_impl {impl!r}; valid: {', '.join(CONV_IMPLS)}.")
    if impl == "auto":
        return "hybrid" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv_xla(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """NHWC x HWIO convolution with XLA's native convolution."""
    return lax.conv_general_dilated(
        x,
        kernel,
        window_strides=tuple(strides),
        padding=tuple(padding),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )


def conv_im2col(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """NHWC x HWIO convolution as patch extraction (strided slices) and one matrix product."""
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    if any(p for pair in padding for p in pair):
        x = jnp.pad(x, ((0, 0), tuple(padding[0]), tuple(padding[1]), (0, 0)))
    b, h, w, c = x.shape
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    strides_4d = (1, sh, sw, 1)
    # Patch channels are ordered (i, j, cin), matching kernel.reshape(kh * kw * cin, cout).
    cols = [
        lax.slice(x, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), strides_4d)
        for i in range(kh)
        for j in range(kw)
    ]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


def _input_grad_xla(g: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
    """d conv(x, kernel) / d x, contracted with g, of a stride-1 convolution with padding p:
    g correlated with the spatially flipped kernel, its in/out channels swapped, padding
    k - 1 - p. Written out (an HWIO kernel) so that XLA:CPU runs its canonical convolution: JAX's
    transpose rule leaves the kernel's channels swapped (`01oi`), which XLA re-lays out outside
    loops but not inside one, where it ran 2.8x slower (64 channels, 32x32, batch 64)."""
    flipped = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    pad = [(k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip(kernel.shape[:2], padding, strict=True)]
    return conv_xla(g, flipped, (1, 1), pad)


def conv_hybrid(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """XLA's native convolution forward; each gradient from whichever of native and im2col
    XLA:CPU runs faster (a `custom_vjp`; `benchmarks.conv --layers`): for kernels larger than
    1x1, the kernel gradient natively, and the input gradient natively at stride 1 with at least
    16 input channels (`_input_grad_xla`); im2col's otherwise (for 1x1 kernels, one matrix
    product each)."""
    kh, kw, cin, _ = kernel.shape
    native_dw = (kh, kw) != (1, 1)
    native_dx = (
        native_dw
        and tuple(strides) == (1, 1)
        and cin >= 16
        and all(0 <= p <= k - 1 for k, pair in zip((kh, kw), padding, strict=True) for p in pair)
    )

    @jax.custom_vjp
    def conv(x, kernel):
        return conv_xla(x, kernel, strides, padding)

    def fwd(x, kernel):
        return conv(x, kernel), (x, kernel)

    def bwd(res, g):
        x, kernel = res
        if not (native_dx and native_dw):
            _, im2col_vjp = jax.vjp(lambda a, k: conv_im2col(a, k, strides, padding), x, kernel)
            dx_im2col, dw_im2col = im2col_vjp(g)
        dx = _input_grad_xla(g, kernel, padding) if native_dx else dx_im2col
        if native_dw:
            _, kernel_vjp = jax.vjp(lambda k: conv_xla(x, k, strides, padding), kernel)
            (dw,) = kernel_vjp(g)
        else:
            dw = dw_im2col
        return dx, dw

    conv.defvjp(fwd, bwd)
    return conv(x, kernel)


class Conv(nn.Module):
    """2-D convolution (NHWC, HWIO `kernel`) with explicit padding and a choice of implementation.

    The parameter tree is the same for every `impl`: "xla" (native), "im2col" (slices + dot),
    "hybrid" (xla's forward, per gradient native or im2col), "auto" (hybrid on CPU, xla
    elsewhere).
    """

    features: int
    kernel_size: tuple[int, int] = (3, 3)
    strides: tuple[int, int] = (1, 1)
    padding: Padding = ((0, 0), (0, 0))
    use_bias: bool = False
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        impl = resolve_conv_impl(self.impl)
        kernel = self.param(
            "kernel",
            self.kernel_init,
            (*self.kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        conv = {"im2col": conv_im2col, "hybrid": conv_hybrid, "xla": conv_xla}[impl]
        y = conv(x, kernel, self.strides, self.padding)
        if self.use_bias:  # added in float32: its gradient sums over the batch
            bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
            y = (y.astype(jnp.float32) + bias).astype(self.dtype)
        return y


class Dense(nn.Module):
    """y = x W + b, returned in float32: the product in `dtype` (inputs and kernel cast), the bias
    added in float32, so the logits are never rounded to bfloat16 and the bias gradient (a sum
    over the batch) accumulates in float32. Parameters, their names and initialisation as
    `flax.linen.Dense`: kernel (in, features), bias (features,), both float32."""

    features: int
    dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
        y = jax.lax.dot_general(
            x.astype(self.dtype), kernel.astype(self.dtype), (((x.ndim - 1,), (0,)), ((), ()))
        )
        return y.astype(jnp.float32) + bias


def normalize(x: jax.Array, mean: Sequence[float], std: Sequence[float], dtype: Dtype) -> jax.Array:
    """Returns (x - mean) / std per channel, computed in float32 and cast to `dtype`."""
    mean_arr = jnp.asarray(mean, jnp.float32)
    std_arr = jnp.asarray(std, jnp.float32)
    return ((x.astype(jnp.float32) - mean_arr) / std_arr).astype(dtype)


def global_avg_pool(x: jax.Array) -> jax.Array:
    """Mean over the spatial axes of an NHWC array."""
    return jnp.mean(x, axis=(1, 2))


class ModelBase(nn.Module):
    """Options shared by every model and submodule, and BatchNorm / Conv factories using them."""

    activation: str = "relu"
    bn_axis_name: str | None = None
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    # "default": He-normal (fan_out) convolutions, Flax's Dense; "torch": PyTorch's defaults.
    init_scheme: str = "default"
    # The BatchNorm momentum (Flax terms) instead of bn_momentum, e.g. a traced one (train_step's
    # first step); None: bn_momentum.
    bn_momentum_override: Any = None

    bn_momentum: ClassVar[float] = 0.9  # Flax terms: PyTorch momentum 0.1.

    def shared(self) -> dict[str, Any]:
        """The shared options, to pass on to submodules."""
        return dict(
            activation=self.activation,
            bn_axis_name=self.bn_axis_name,
            conv_impl=self.conv_impl,
            dtype=self.dtype,
            init_scheme=self.init_scheme,
            bn_momentum_override=self.bn_momentum_override,
        )

    def act(self, x: jax.Array) -> jax.Array:
        return get_activation(self.activation)(x)

    def batch_norm(self, name: str, train: bool) -> nn.BatchNorm:
        """BatchNorm with batch statistics in training, synced over `bn_axis_name` if set."""
        momentum = self.bn_momentum_override
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum if momentum is None else momentum,
            epsilon=1e-5,
            axis_name=self.bn_axis_name,
            dtype=self.dtype,
            name=name,
        )

    def conv(self, features: int, kernel: int, stride: int, padding: Padding, name: str) -> Conv:
        """Bias-free square convolution."""
        return Conv(
            features,
            (kernel, kernel),
            (stride, stride),
            padding,
            impl=self.conv_impl,
            dtype=self.dtype,
            kernel_init=torch_kernel_init if self.torch_init() else conv_kernel_init,
            name=name,
        )

    def torch_init(self) -> bool:
        return check_init_scheme(self.init_scheme) == "torch"

    def dense(self, features: int, name: str) -> Callable[[jax.Array], jax.Array]:
        """A `Dense` layer (float32 output) with the init scheme's kernel and bias initialisers."""

        def apply(x: jax.Array) -> jax.Array:
            scheme = check_init_scheme(self.init_scheme)
            if scheme == "default":
                return Dense(features, dtype=self.dtype, name=name)(x)
            bias_init = torch_bias_init(x.shape[-1]) if scheme == "torch" else nn.initializers.zeros
            return Dense(
                features,
                dtype=self.dtype,
                kernel_init=torch_kernel_init,
                bias_init=bias_init,
                name=name,
            )(x)

        return apply
