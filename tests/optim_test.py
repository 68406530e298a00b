import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dmd_jax.training.optim import (accumulate_clipped, get_learning_rate, reference_optimizer,
                           reset_window, set_learning_rate)


def test_clipped_sum_then_one_update_per_window():
  tx = accumulate_clipped(optax.sgd(1.0), every_k=3, clip=0.6)
  params = jnp.zeros(2)
  state = tx.init(params)
  grads = [jnp.array([0.5, -0.1]), jnp.array([0.5, -0.1]), jnp.array([-0.3, -0.1])]
  acc = np.zeros(2)
  for i, g in enumerate(grads):
    updates, state = tx.update(g, state, params)
    acc = np.clip(acc + np.asarray(g), -0.6, 0.6)  # clip after every micro-batch, on the sum
    if i < 2:
      np.testing.assert_array_equal(updates, 0.0)
      np.testing.assert_allclose(state.acc[0], acc)   # one segment: the single leaf
  np.testing.assert_allclose(updates, -acc)  # sgd(1): the clipped sum 0.6 - 0.3, not 1.0 - 0.3
  np.testing.assert_allclose(updates, [-0.3, 0.3], rtol=1e-6)
  assert int(state.count) == 0 and not np.any(state.acc[0])


def test_partial_window_is_dropped():
  tx = accumulate_clipped(optax.sgd(1.0), every_k=2, clip=None)
  state = tx.init(jnp.zeros(1))
  _, state = tx.update(jnp.ones(1), state)
  state = reset_window(state)
  updates, state = tx.update(jnp.full(1, 2.0), state)
  np.testing.assert_array_equal(updates, 0.0)
  updates, _ = tx.update(jnp.full(1, 3.0), state)
  np.testing.assert_allclose(updates, [-5.0])  # 2 + 3; the dropped 1 is gone


def test_adam_matches_pytorch_formula_and_lr_is_settable():
  tx = reference_optimizer(1e-3, update_epochs=1, grad_clip=None)
  p = jnp.array([1.0, -2.0])
  state = tx.init(p)
  m = v = np.zeros(2)
  pn = np.asarray(p, np.float64)
  for t, g in enumerate([np.array([0.1, -0.2]), np.array([0.3, 0.05])], start=1):
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, p)
    p = optax.apply_updates(p, updates)
    m = 0.9 * m + 0.1 * g
    v = 0.999 * v + 0.001 * g * g
    pn = pn - 1e-3 / (1 - 0.9 ** t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999 ** t) + 1e-8)
  np.testing.assert_allclose(p, pn, rtol=1e-6)
  state = set_learning_rate(state, 5e-4)
  assert abs(get_learning_rate(state) - 5e-4) < 1e-10


def test_fused_apply_equals_update_then_apply_updates():
  """`apply` (used by TrainState) returns the parameters `update` + apply_updates would give,
  and leaves them bit-identical (the same buffers' values) on accumulating micro-steps."""
  tx = reference_optimizer(1e-2, update_epochs=2, grad_clip=0.6)
  rs = np.random.default_rng(0)
  params = {'w': jnp.asarray(rs.normal(size=(3, 2)), jnp.float32), 'b': jnp.ones(2)}
  s_apply = s_update = tx.init(params)
  p_apply = p_update = params
  for i in range(4):
    g = {k: jnp.asarray(rs.normal(size=v.shape), jnp.float32) for k, v in params.items()}
    before = p_apply
    p_apply, s_apply = tx.apply(g, s_apply, p_apply)
    updates, s_update = tx.update(g, s_update, p_update)
    p_update = optax.apply_updates(p_update, updates)
    for k in params:
      np.testing.assert_array_equal(p_apply[k], p_update[k])
      if i % 2 == 0:                          # accumulating: parameters unchanged
        np.testing.assert_array_equal(p_apply[k], before[k])
      else:
        assert np.any(np.asarray(p_apply[k]) != np.asarray(before[k]))
    for a, b in zip(jax.tree.leaves((s_apply.acc, s_apply.inner.inner_state[0].mu)),
                    jax.tree.leaves((s_update.acc, s_update.inner.inner_state[0].mu))):
      np.testing.assert_array_equal(a, b)


def test_segments_group_repeated_layers_and_round_trip():
  from dmd_jax.training.optim import Segments
  rs = np.random.default_rng(1)
  arr = lambda *shape: jnp.asarray(rs.normal(size=shape), jnp.float32)
  layer = lambda: {'dense': {'kernel': arr(3, 4), 'bias': arr(4)}, 'ln': {'scale': arr(4)}}
  tree = {'encoder': {'layer_0': layer(), 'layer_1': layer()}, 'head': {'kernel': arr(4, 1)},
          'mult': {'layers_0': layer(), 'layers_1': layer(), 'layer_norm': {'scale': arr(4)}}}
  seg = Segments(tree)
  # One segment per layer; everything outside a layer (head, final norm) shares the segment '',
  # placed where its first leaf comes in the tree's order.
  assert seg.names == ('encoder/layer_0', 'encoder/layer_1', '', 'mult/layers_0', 'mult/layers_1')
  flat = seg.flatten(tree)
  assert [v.shape for v in flat] == [(20,), (20,), (8,), (20,), (20,)]
  # Layers of one stack are laid out identically: bias, kernel, scale in tree order.
  np.testing.assert_array_equal(flat[1][:4], tree['encoder']['layer_1']['dense']['bias'])
  np.testing.assert_array_equal(flat[3][16:], tree['mult']['layers_0']['ln']['scale'])
  back = seg.unflatten(flat)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='expected 5 segment vectors, got 4'):
    seg.unflatten(flat[:4])
  with pytest.raises(ValueError, match=r'segment vector of shape \(19,\), expected \(20,\)'):
    seg.unflatten((flat[0][:19],) + flat[1:])


def test_large_segments_are_padded_for_sharding_and_round_trip():
  """A segment of >= 2^14 parameters is padded with zeros to a multiple of 1024 (so the fsdp
  layout can shard it over 8, 16, ... devices); the padding never reaches the parameters."""
  from dmd_jax.training.optim import Segments, padded_size
  assert (padded_size(16383), padded_size(16384), padded_size(26619508)) == (16383, 16384,
                                                                             26619904)
  rs = np.random.default_rng(2)
  tree = {'emb': jnp.asarray(rs.normal(size=(1001, 17)), jnp.float32),   # 17017 parameters
          'bias': jnp.asarray(rs.normal(size=(3,)), jnp.float32)}
  seg = Segments(tree)
  (flat,) = seg.flatten(tree)
  assert flat.shape == (17408,) and not np.any(flat[17020:])
  for a, b in zip(jax.tree.leaves(seg.unflatten((flat,))), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(a, b)
  # Adam through the accumulator: the padded tail keeps zero moments and zero updates
  tx = accumulate_clipped(optax.adam(1e-2), every_k=1, clip=0.6)
  state = tx.init(tree)
  new, state = tx.apply(jax.tree.map(jnp.ones_like, tree), state, tree)
  mu = state.inner[0].mu[0]
  assert np.all(mu[:17020] != 0) and not np.any(mu[17020:])
  np.testing.assert_allclose(new['bias'], tree['bias'] - 1e-2, rtol=1e-5)
