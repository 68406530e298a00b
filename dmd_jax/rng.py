"""Dropout randomness: a counter-based hash PRNG that is cheap enough for attention dropout.

The 500-step cross-modal transformers of the unaligned settings apply dropout to attention
probabilities of shape (B, heads, 500, 500): ~40M Bernoulli draws per layer, ~450M per MOSI
training step. Drawing them with JAX's default Threefry-2x32 costs ~14 ns each on a CPU core
(about 6 s of a 20 s step); `rbg` is not much cheaper on CPU.

`HASH_IMPL` keeps Threefry for everything that handles keys (seed, split, fold_in: flax's
`make_rng` paths, per-step `fold_in`), and replaces only the bulk bit generation: element i of a
draw gets `mix(mix(i ^ k0) + k1)` for the key words (k0, k1), where `mix` is the
`lowbias32` integer finaliser (xorshift-multiply, a bijection on 32-bit words with strong
avalanche). It is one fused elementwise pass (~1 ns per element), depends only on the key and the
element's global index (so sharded and unsharded runs draw the same masks), and masks of
different keys are statistically independent for dropout's purposes.

Select it with `DMDConfig.dropout_rng = 'hash'` (the default); 'threefry' restores JAX's
generator. Dropout cannot match the PyTorch reference mask-for-mask either way.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.extend import random as jex_random

from dmd_jax.config import DROPOUT_RNGS

_THREEFRY = jex_random.threefry_prng_impl


def _mix(x: jax.Array) -> jax.Array:
  """lowbias32: x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  n = math.prod(shape)
  words = 2 if bit_width == 64 else 1
  if n * words >= 2 ** 32:
    raise ValueError(f'hash dropout RNG draws at most 2^32 words per call, asked for {n * words} '
                     f'(shape {shape}, {bit_width} bits); use dropout_rng="threefry"')
  idx = jax.lax.iota(jnp.uint32, n * words)
  x = _mix(_mix(idx ^ key[0]) + key[1])
  if bit_width == 64:
    x = x.reshape(n, 2).astype(jnp.uint64)
    return ((x[:, 0] << 32) | x[:, 1]).reshape(shape)
  if bit_width == 32:
    return x.reshape(shape)
  dtype = {8: jnp.uint8, 16: jnp.uint16}[bit_width]
  return (x >> (32 - bit_width)).astype(dtype).reshape(shape)   # the best-mixed high bits


HASH_IMPL = jex_random.define_prng_impl(
    key_shape=(2,), seed=_THREEFRY.seed, split=_THREEFRY.split, random_bits=_random_bits,
    fold_in=_THREEFRY.fold_in, name='dmd_hash32', tag='dh32')


def dropout_key(rng: jax.Array, kind: str = 'hash') -> jax.Array:
  """`rng` (a typed Threefry key or a raw uint32[2] key) as a key of the chosen dropout PRNG."""
  if kind not in DROPOUT_RNGS:
    raise ValueError(f'dropout_rng must be one of {DROPOUT_RNGS}, got {kind!r}')
  typed = jnp.issubdtype(rng.dtype, jax.dtypes.prng_key)
  if kind == 'threefry':
    return rng
  data = jax.random.key_data(rng) if typed else rng
  if data.shape[-1:] != (2,) or data.dtype != jnp.uint32:
    raise ValueError(f'dropout rng must be a Threefry key (uint32[2] data), got key data of '
                     f'shape {data.shape} and dtype {data.dtype}')
  return jax.random.wrap_key_data(data, impl=HASH_IMPL)
