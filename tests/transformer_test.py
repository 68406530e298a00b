"""The MulT transformer encoder: positions, causality, the last-position shortcut, and the two
layer loops (scan, unroll) against each other and an independent layer-by-layer evaluation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.config import AttentionConfig
from dmd_jax.model.layers import sinusoidal_positions
from dmd_jax.model.rng import dropout_key
from dmd_jax.model.transformer import TransformerEncoder, TransformerEncoderLayer, scan_now


def test_positions_known_values_and_padding_rule():
  x = jnp.ones((1, 3, 4)).at[0, 1, 0].set(0.0)  # step 1 has channel 0 exactly zero
  pe = np.asarray(sinusoidal_positions(x))[0]
  f = np.array([1.0, math.exp(-math.log(1e4))])  # E=4: half=2, f_i = exp(-i ln(1e4) / (half-1))
  for t in (0, 2):
    p = t + 1
    np.testing.assert_allclose(pe[t], np.concatenate([np.sin(p * f), np.cos(p * f)]), rtol=1e-6)
  np.testing.assert_array_equal(pe[1], 0.0)  # no position at all, not even cos(0) = 1


def test_cross_attention_shapes_and_causality():
  enc = TransformerEncoder(embed_dim=8, num_heads=2, layers=2)
  rs = np.random.default_rng(0)
  q, kv = jnp.asarray(rs.normal(size=(2, 5, 8))), jnp.asarray(rs.normal(size=(2, 7, 8)))
  params = enc.init(jax.random.key(0), q, kv)
  y = enc.apply(params, q, kv)
  assert y.shape == (2, 5, 8)
  # Query step 0 sees keys 0..2 only (offset |7-5| = 2): later keys do not change it.
  y2 = enc.apply(params, q, kv.at[:, 3:].set(5.0))
  np.testing.assert_allclose(y[:, 0], y2[:, 0], atol=1e-6)
  assert not np.allclose(y[:, -1], y2[:, -1])


@pytest.mark.parametrize('loop', ['scan', 'unroll'])
def test_last_only_and_layer_loops_match_full_encoder(loop):
  rs = np.random.default_rng(2)
  x = jnp.asarray(rs.normal(size=(2, 9, 8)), jnp.float32)
  kv = jnp.asarray(rs.normal(size=(2, 12, 8)), jnp.float32)
  att = AttentionConfig(layer_loop=loop)
  full = TransformerEncoder(embed_dim=8, num_heads=2, layers=3, attention=att)
  last = TransformerEncoder(embed_dim=8, num_heads=2, layers=3, last_only=True, attention=att)
  params = full.init(jax.random.key(0), x, kv)
  assert jax.tree.structure(params) == jax.tree.structure(last.init(jax.random.key(0), x, kv))
  y = full.apply(params, x, kv)
  y_last = last.apply(params, x, kv)
  assert y_last.shape == (2, 1, 8)
  np.testing.assert_allclose(y_last[:, 0], y[:, -1], rtol=1e-5, atol=1e-6)
  # Either loop equals an independent layer-by-layer evaluation of the same parameters.
  unrolled = full.apply(params, x, kv, method=_unrolled)
  np.testing.assert_allclose(y, unrolled, rtol=1e-5, atol=1e-6)


def test_scanned_and_unrolled_layers_agree_in_training():
  """Same outputs and gradients, dropout included (each layer gets the same key either way)."""
  rs = np.random.default_rng(3)
  x = jnp.asarray(rs.normal(size=(2, 9, 8)), jnp.float32)
  kv = jnp.asarray(rs.normal(size=(2, 12, 8)), jnp.float32)
  make = lambda loop: TransformerEncoder(embed_dim=8, num_heads=2, layers=3, attn_dropout=0.3,
                                         relu_dropout=0.2, res_dropout=0.1,
                                         attention=AttentionConfig(layer_loop=loop))
  enc = make('auto')
  params = enc.init(jax.random.key(0), x, kv)
  rng = {'dropout': dropout_key(jax.random.key(5))}

  def loss(p, x, loop):
    return jnp.sum(jnp.sin(make(loop).apply(p, x, kv, deterministic=False, rngs=rng)))

  results = {loop: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(
      params, x, loop) for loop in ('scan', 'unroll')}
  (v_s, g_s), (v_u, g_u) = results['scan'], results['unroll']
  np.testing.assert_allclose(v_s, v_u, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  deterministic = enc.apply(params, x, kv)
  assert not np.allclose(enc.apply(params, x, kv, deterministic=False, rngs=rng), deterministic)


def test_layer_loop_modes():
  small = jnp.zeros((4, 50, 8))
  large = jax.ShapeDtypeStruct((16, 496, 50), jnp.float32)
  assert scan_now('auto', small, 'cpu') and not scan_now('auto', large, 'cpu')
  assert scan_now('scan', small, 'cpu') and scan_now('scan', large, 'cpu')
  assert scan_now('auto', large, 'tpu') and scan_now('auto', large, 'gpu')   # scanned off the CPU
  assert not scan_now('unroll', small, 'tpu')
  with pytest.raises(ValueError, match=r"AttentionConfig.layer_loop: must be one of \('auto', "
                     r"'scan', 'unroll'\), got 'loop'"):
    AttentionConfig(layer_loop='loop')


def _unrolled(m, x_in, x_kv):
  scale = math.sqrt(m.embed_dim)
  x = scale * x_in + sinusoidal_positions(x_in)
  kv = scale * x_kv + sinusoidal_positions(x_kv)
  params = m.variables['params']
  for i in range(m.layers):
    layer = TransformerEncoderLayer(m.embed_dim, m.num_heads, parent=None)
    x = layer.apply({'params': params[f'layers_{i}']}, x, kv, kv,
                    abs(x_kv.shape[1] - x_in.shape[1]), True)
  ln = params['layer_norm']
  c = x - x.mean(-1, keepdims=True)
  return c / jnp.sqrt((c * c).mean(-1, keepdims=True) + 1e-5) * ln['scale'] + ln['bias']
