"""Per-example random crop (after zero padding) and horizontal flip, in JAX (jit-friendly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from score_jax.errors import ConfigError


def crop(image: jax.Array, offset: jax.Array, padding: int) -> jax.Array:
    """The (H, W) window at `offset` (dy, dx) in [0, 2*padding] of the zero-padded image."""
    padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    zero = jnp.zeros((), offset.dtype)
    return lax.dynamic_slice(padded, (offset[0], offset[1], zero), image.shape)


def _augment_one(image: jax.Array, key: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    if crop_padding > 0:
        offset = jax.random.randint(crop_key, (2,), 0, 2 * crop_padding + 1)
        image = crop(image, offset, crop_padding)
    if flip:
        image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
    return image


def augment(images: jax.Array, keys: jax.Array, *, crop_padding: int, flip: bool) -> jax.Array:
    """Random crop (zero padding of `crop_padding` per side) and flip (p = 0.5) per example.

    Args:
      images: float32 (B, H, W, C), in [0, 1].
      keys: (B,) per-example PRNG keys (typed keys, or raw uint32 (B, 2)); each example's
        result depends only on its own key.
      crop_padding: pixels of zero padding per side; 0 disables the crop.
      flip: whether to flip horizontally with probability 0.5.

    Returns:
      The augmented images, same shape and dtype; the identity when both are off.
    """
    if crop_padding < 0:
        raise ConfigError(f"config.augment.crop_padding must be >= 0, got {crop_padding}")
    if crop_padding == 0 and not flip:
        return images
    return jax.vmap(lambda x, k: _augment_one(x, k, crop_padding, flip))(images, keys)
