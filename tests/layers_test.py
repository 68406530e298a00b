import math

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.layers import TransformerEncoder, future_mask, sinusoidal_positions


def test_positions_known_values_and_padding_rule():
  x = jnp.ones((1, 3, 4)).at[0, 1, 0].set(0.0)  # step 1 has channel 0 exactly zero
  pe = np.asarray(sinusoidal_positions(x))[0]
  f = np.array([1.0, math.exp(-math.log(1e4))])  # E=4: half=2, f_i = exp(-i ln(1e4) / (half-1))
  for t in (0, 2):
    p = t + 1
    np.testing.assert_allclose(pe[t], np.concatenate([np.sin(p * f), np.cos(p * f)]), rtol=1e-6)
  np.testing.assert_array_equal(pe[1], 0.0)  # no position at all, not even cos(0) = 1


def test_future_mask_offsets():
  np.testing.assert_array_equal(future_mask(3, 3), np.tril(np.ones((3, 3), bool)))
  # |Tk - Tq| = 2: query i sees keys 0..i+2.
  m = np.asarray(future_mask(2, 4))
  np.testing.assert_array_equal(m, [[1, 1, 1, 0], [1, 1, 1, 1]])
  assert np.asarray(future_mask(50, 46))[:, 0].all()  # key 0 is always visible


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
