"""Per-example random crop (after zero padding), horizontal flip and rotation, jit-friendly.

The order is the reference's torchvision pipeline: RandomCrop(32, padding) -> RandomHorizontalFlip
-> RandomRotation(degrees) (the last for CIFAR-100 only).
"""

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


def rotate(image: jax.Array, degrees: jax.Array) -> jax.Array:
    """`image` (H, W, C) rotated counter-clockwise by `degrees` about its centre, nearest
    neighbour, zero fill: torchvision `rotate` on a PIL image (PIL `Image.rotate`).

    Output pixel (i, j) takes input pixel (floor(v), floor(u)), zero when outside, with
    x = j + 1/2 - W/2, y = i + 1/2 - H/2 and, for a = degrees in radians,
    u = cos(a) x - sin(a) y + W/2, v = sin(a) x + cos(a) y + H/2.
    """
    h, w = image.shape[0], image.shape[1]
    a = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    y = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5 - h / 2
    x = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5 - w / 2
    u = jnp.floor(jnp.cos(a) * x - jnp.sin(a) * y + w / 2).astype(jnp.int32)
    v = jnp.floor(jnp.sin(a) * x + jnp.cos(a) * y + h / 2).astype(jnp.int32)
    inside = (u >= 0) & (u < w) & (v >= 0) & (v < h)
    pixels = image[jnp.clip(v, 0, h - 1), jnp.clip(u, 0, w - 1)]
    return jnp.where(inside[..., None], pixels, jnp.zeros((), image.dtype))


def _augment_one(
    image: jax.Array, key: jax.Array, crop_padding: int, flip: bool, rotation_degrees: float
) -> jax.Array:
    crop_key, flip_key = jax.random.split(key)
    if crop_padding > 0:
        offset = jax.random.randint(crop_key, (2,), 0, 2 * crop_padding + 1)
        image = crop(image, offset, crop_padding)
    if flip:
        image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
    if rotation_degrees > 0:
        # A stream of its own, so crop and flip draw what they drew before rotation existed.
        rot_key = jax.random.fold_in(key, 3)
        angle = jax.random.uniform(rot_key, (), jnp.float32, -rotation_degrees, rotation_degrees)
        image = rotate(image, angle)
    return image


def augment(
    images: jax.Array,
    keys: jax.Array,
    *,
    crop_padding: int,
    flip: bool,
    rotation_degrees: float = 0.0,
) -> jax.Array:
    """Random crop (zero padding of `crop_padding` per side), flip (p = 0.5) and rotation by an
    angle U(-rotation_degrees, rotation_degrees) (`rotate`), per example, in that order.

    Args:
      images: float32 (B, H, W, C), in [0, 1].
      keys: (B,) per-example PRNG keys (typed keys, or raw uint32 (B, 2)); each example's
        result depends only on its own key.
      crop_padding: pixels of zero padding per side; 0 disables the crop.
      flip: whether to flip horizontally with probability 0.5.
      rotation_degrees: the largest rotation (torchvision RandomRotation(degrees)); 0 disables.

    Returns:
      The augmented images, same shape and dtype; the identity when all are off.
    """
    if crop_padding < 0:
        raise ConfigError(f"config.augment.crop_padding must be >= 0, got {crop_padding}")
    if rotation_degrees < 0:
        raise ConfigError(f"config.augment.rotation_degrees must be >= 0, got {rotation_degrees}")
    if crop_padding == 0 and not flip and rotation_degrees == 0:
        return images
    return jax.vmap(lambda x, k: _augment_one(x, k, crop_padding, flip, rotation_degrees))(
        images, keys
    )
