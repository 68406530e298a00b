import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmd_jax.rng import HASH_IMPL, dropout_key


def test_hash_bernoulli_rate_and_independence():
  key = dropout_key(jax.random.key(3))
  assert jax.random.key_impl(key) == jax.random.key_impl(jax.random.key(0, impl=HASH_IMPL))
  a = np.asarray(jax.random.bernoulli(key, 0.7, (400_000,)), np.float64)
  b = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.7, (400_000,)), np.float64)
  # Binomial standard error of the mean is ~7e-4: 5 sigma bounds.
  assert abs(a.mean() - 0.7) < 4e-3 and abs(b.mean() - 0.7) < 4e-3
  assert abs(np.corrcoef(a, b)[0, 1]) < 0.01                 # different keys: unrelated masks
  assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.01        # neighbours within one mask
  assert not np.array_equal(a, b)


def test_hash_bits_same_when_sharded():
  key = dropout_key(jax.random.key(5))
  full = jax.jit(lambda k: jax.random.bits(k, (16, 24), jnp.uint32))(key)
  mesh = Mesh(np.array(jax.devices()), ('data',))
  sharded = jax.jit(lambda k: jax.random.bits(k, (16, 24), jnp.uint32),
                    out_shardings=NamedSharding(mesh, P('data')))(key)
  np.testing.assert_array_equal(np.asarray(full), np.asarray(sharded))


def test_dropout_key_choices_and_errors():
  k = jax.random.key(0)
  assert dropout_key(k, 'threefry') is k
  with pytest.raises(ValueError, match='dropout_rng must be one of'):
    dropout_key(k, 'philox')
  with pytest.raises(ValueError, match='Threefry key'):
    dropout_key(jnp.zeros((4,), jnp.uint32))
