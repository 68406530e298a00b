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

`INIT_IMPL` uses the same bit generator for random parameter initialisation and also derives
keys (seed, split, fold_in) by hashing instead of Threefry. Initialising DMD with a bert-base-sized
encoder draws ~900 parameter leaves, each behind a chain of flax `make_rng` fold-ins; with
Threefry every one of them is a 20-round kernel for XLA to compile (or, eagerly, one dispatch
compile per distinct shape), which made initialisation cost 24-50 s on a 2-core CPU. With hashed
keys and bits it is one short elementwise kernel per leaf (~10 s, most of it compiling).
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


_GOLDEN = 0x9E3779B9   # distinct odd constants keep seed, split and fold_in streams apart


def _derive(key: jax.Array, data: jax.Array) -> jax.Array:
  """Two new key words from a key and uint32 `data` (any shape): (..., 2)."""
  d = _mix(data ^ jnp.uint32(0x85EBCA6B))
  k0 = _mix(_mix(key[0] ^ d) + key[1])
  k1 = _mix(_mix(key[1] ^ d ^ jnp.uint32(_GOLDEN)) + k0)
  return jnp.stack([k0, k1], axis=-1)


def _init_seed(seed: jax.Array) -> jax.Array:
  s = jnp.asarray(seed)
  lo = s.astype(jnp.uint32)
  hi = (s.astype(jnp.int64) >> 32).astype(jnp.uint32) if s.dtype.itemsize == 8 else jnp.uint32(0)
  return _derive(jnp.stack([_mix(lo), _mix(hi ^ jnp.uint32(0xC2B2AE35))]), jnp.uint32(0))


def _init_split(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  idx = jax.lax.iota(jnp.uint32, math.prod(shape))
  return _derive(key, idx + jnp.uint32(_GOLDEN)).reshape(*shape, 2)


def _init_fold_in(key: jax.Array, data: jax.Array) -> jax.Array:
  return _derive(key, jnp.asarray(data).astype(jnp.uint32))


INIT_IMPL = jex_random.define_prng_impl(
    key_shape=(2,), seed=_init_seed, split=_init_split, random_bits=_random_bits,
    fold_in=_init_fold_in, name='dmd_hash32_init', tag='dhi')


def _key_data(rng: jax.Array) -> jax.Array:
  """The uint32 words of a typed key, or `rng` itself when it is raw key data."""
  return jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng


def init_key(rng: jax.Array) -> jax.Array:
  """`rng` (a typed key with uint32[2] data, e.g. Threefry's, or raw uint32[2] key data) as an
  `INIT_IMPL` key: the same seed gives the same parameters, with hashed keys and bits."""
  data = _key_data(rng)
  if data.shape != (2,) or data.dtype != jnp.uint32:
    raise ValueError(f'init rng must be a single key with uint32[2] data (jax.random.key(seed)), '
                     f'got key data of shape {data.shape} and dtype {data.dtype}')
  return jax.random.wrap_key_data(data, impl=INIT_IMPL)


def dropout_key(rng: jax.Array, kind: str = 'hash') -> jax.Array:
  """`rng` (a typed Threefry key or a raw uint32[2] key) as a key of the chosen dropout PRNG."""
  if kind not in DROPOUT_RNGS:
    raise ValueError(f'dropout_rng must be one of {DROPOUT_RNGS}, got {kind!r}')
  if kind == 'threefry':
    return rng
  data = _key_data(rng)
  if data.shape[-1:] != (2,) or data.dtype != jnp.uint32:
    raise ValueError(f'dropout rng must be a Threefry key (uint32[2] data), got key data of '
                     f'shape {data.shape} and dtype {data.dtype}')
  return jax.random.wrap_key_data(data, impl=HASH_IMPL)
