"""On-device training augmentations, pure functions of (images, key).

Each maps a batch (B, H, W, C) and a PRNG key to a batch of the same shape; keys
come from (seed, step), so a resumed run augments exactly as an uninterrupted one.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _shift_crop(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (max_shift,) * 2, (max_shift,) * 2, (0, 0)))
  offsets = jax.random.randint(rng, (b, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def shift(images: jax.Array, rng: jax.Array, max_shift: int = 2) -> jax.Array:
  """Translates each image by up to `max_shift` pixels each way, filling with zeros."""
  return _shift_crop(images, rng, max_shift)


def crop_flip(images: jax.Array, rng: jax.Array, max_shift: int = 4) -> jax.Array:
  """CIFAR's standard augmentation: zero-pad by `max_shift`, random crop, random h-flip."""
  crop_key, flip_key = jax.random.split(rng)
  images = _shift_crop(images, crop_key, max_shift)
  flip = jax.random.bernoulli(flip_key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


AUGMENTATIONS: dict[str, Callable[..., jax.Array]] = {"shift": shift, "crop_flip": crop_flip}


def get(name: str) -> Callable[..., jax.Array] | None:
  """The augmentation called `name` (None for "none")."""
  if name == "none":
    return None
  if name not in AUGMENTATIONS:
    raise ValueError(f"Unknown augment {name!r}; known: 'none', {sorted(AUGMENTATIONS)}.")
  return AUGMENTATIONS[name]
