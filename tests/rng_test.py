import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmd_jax.model.rng import HASH_IMPL, dropout_key


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


def _leaf(params, path):
  for k in path.split('/'):
    params = params[k]
  return np.asarray(params, np.float64)


def test_init_params_follow_their_initialisers_with_independent_leaves():
  from dmd_jax import init_params
  from dmd_jax.config import BertConfig, reference_config
  from dmd_jax.model.rng import INIT_IMPL, init_key
  bert = BertConfig.tiny(vocab_size=30522, hidden_size=32, layers=2, heads=2)
  cfg = reference_config('mosi', True, bert=bert, d=6, num_heads=2, nlevels=1)
  p = init_params(cfg, jax.random.key(0))
  words = _leaf(p, 'text_model/embeddings/word_embeddings/embedding').ravel()   # normal(0.02)
  assert abs(words.std() / 0.02 - 1) < 0.01 and abs(words.mean()) < 1e-4
  assert abs(np.corrcoef(words[:-1], words[1:])[0, 1]) < 0.01
  # PyTorch's Linear: kernel and bias uniform in +-1/sqrt(fan_in); Conv1d: fan_in = kernel*in.
  for path, fan_in in (('align_c_l/kernel', 276), ('align_c_l/bias', 276),
                       ('proj_l/kernel', 5 * 32)):
    w, bound = _leaf(p, path), fan_in ** -0.5
    assert np.abs(w).max() <= bound, path
    assert w.size < 10 or abs(w.std() / (bound / 3 ** 0.5) - 1) < 0.1, path
  fc1 = _leaf(p, 'trans_l_mem/layers_0/fc1/kernel')                           # Xavier uniform
  assert np.abs(fc1).max() <= (6 / (12 + 48)) ** 0.5 and not fc1.std() == 0
  assert not _leaf(p, 'trans_l_mem/layers_0/fc1/bias').any()
  # Same-shaped leaves of different modules are unrelated draws.
  layer = lambda i: np.concatenate([_leaf(p, f'text_model/encoder/layer_{i}/{m}/kernel').ravel()
                                    for m in ('attention/self/query', 'attention/self/key',
                                              'attention/self/value', 'intermediate/dense')])
  assert abs(np.corrcoef(layer(0), layer(1))[0, 1]) < 0.06
  assert abs(np.corrcoef(_leaf(p, 'align_c_l/kernel').ravel(),
                         _leaf(p, 'align_c_a/kernel').ravel())[0, 1]) < 0.15
  # Reproducible per seed, different across seeds; keys of the wrong kind are refused.
  again, other = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
  for a, b, c in zip(jax.tree.leaves(p), jax.tree.leaves(again), jax.tree.leaves(other)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.size < 2 or not np.array_equal(np.asarray(a), np.asarray(c)) or not np.asarray(a).std()
  assert jax.random.key_impl(init_key(jax.random.key(0))) == jax.random.key_impl(
      jax.random.key(0, impl=INIT_IMPL))
  with pytest.raises(ValueError, match=r'init rng must be a single key .* shape \(2, 2\)'):
    init_params(cfg, jax.random.split(jax.random.key(0)))
