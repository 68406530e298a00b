import math

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from dmd_jax.layers import (ROW_BLOCKS, TransformerEncoder, _batch_chunks, _head_forward,
                            _over_heads, _plan, _row_blocks, _scan_layers_now, attention,
                            from_loop_layout, future_mask, layer_loop, sample_keys,
                            sinusoidal_positions, to_loop_layout, unrolled_loops)
from dmd_jax.rng import dropout_key


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


def _naive_attention(q, k, v, offset):
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k)
  if offset is not None:
    s = jnp.where(future_mask(q.shape[1], k.shape[1], 0, offset), s, -jnp.inf)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, -1), v)


@pytest.mark.parametrize('tq,tk,masked', [(40, 40, True), (150, 150, True), (130, 170, True),
                                          (170, 130, False), (170, 40, True)])
def test_attention_blocked_paths_match_plain_softmax(tq, tk, masked):
  # (150, 150) and (130, 170) take the per-head loop with row blocks; (40, 40) the vmap;
  # (170, 40) with offset 130 hides no key, so its mask is skipped.
  rs = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rs.normal(size=(2, t, 3, 4)), jnp.float32) for t in (tq, tk, tk))
  offset = abs(tk - tq) if masked else None
  got = attention(q, k, v, causal_offset=offset)
  np.testing.assert_allclose(got, _naive_attention(q, k, v, offset), rtol=2e-5, atol=2e-6)
  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v))), argnums=(0, 1, 2))
  g1 = grad(lambda q, k, v: attention(q, k, v, causal_offset=offset))(q, k, v)
  g2 = grad(lambda q, k, v: _naive_attention(q, k, v, offset))(q, k, v)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_row_blocks_only_where_they_skip_work():
  # MOSI unaligned lengths after the convolutions: l 46, a 371, v 496 (offset = |tk - tq|).
  assert _row_blocks(371, 371, 0, 0) == ROW_BLOCKS          # self-attention: a triangle
  assert _row_blocks(371, 496, 0, 125) == ROW_BLOCKS        # a <- v: ~28% of scores skipped
  assert _row_blocks(496, 371, 0, 125) == 1                 # v <- a: only ~8%
  assert _row_blocks(46, 371, 0, 325) == 1                  # l <- a: small and nearly full
  assert _row_blocks(371, 46, 0, 325) == 1                  # a <- l: nothing hidden
  assert _row_blocks(496, 496, 0, None) == 1                # no mask


def test_attention_dropout_keeps_expected_rate():
  q = jnp.zeros((1, 200, 1, 2))   # uniform probabilities over the visible keys
  v = jnp.ones((1, 200, 1, 2))
  out = attention(q, q, v, causal_offset=None, dropout_rate=0.25, rng=jax.random.key(0))
  # Each output is (kept fraction) / 0.75 of 1: averages to 1 over rows.
  assert abs(float(jnp.mean(out)) - 1.0) < 0.02
  assert float(jnp.std(out)) > 0.01


@pytest.mark.parametrize('tq,tk,offset', [(150, 150, 0), (130, 170, 40), (20, 30, None)])
@pytest.mark.parametrize('key_kind', ['threefry', 'hash'])
def test_attention_hand_written_gradient_with_dropout_matches_autodiff(tq, tk, offset, key_kind):
  # The custom backward (recomputed scores, same dropout mask regenerated from the key) against
  # automatic differentiation of the very same forward code, on the looped/row-blocked and the
  # vmapped paths, with both dropout PRNGs.
  rs = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rs.normal(size=(2, t, 3, 4)), jnp.float32) for t in (tq, tk, tk))
  rng = dropout_key(jax.random.key(3), key_kind)

  def autodiff_attention(q, k, v):
    plan = _plan(tq, tk, 0, offset, 0.3, batch=2)
    args = to_loop_layout(plan.chunks, q, k, v, sample_keys(rng, 2, 3))
    fwd = lambda *a: _head_forward(plan, *a)
    return from_loop_layout(plan.chunks, _over_heads(plan, fwd, *args)[0])

  custom = lambda q, k, v: attention(q, k, v, causal_offset=offset, dropout_rate=0.3, rng=rng)
  np.testing.assert_allclose(custom(q, k, v), autodiff_attention(q, k, v), rtol=1e-6, atol=1e-6)
  w = jnp.asarray(rs.normal(size=(2, tq, 3, 4)), jnp.float32)
  grad = lambda f: jax.grad(lambda q, k, v: jnp.sum(w * f(q, k, v)), argnums=(0, 1, 2))
  g1, g2 = grad(custom)(q, k, v), grad(autodiff_attention)(q, k, v)
  for a, b in zip(g1, g2):
    assert float(jnp.max(jnp.abs(a))) > 0.1       # dropout did not zero the gradient
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_batch_chunks_fit_the_cache_budget_per_device():
  # 496 x 496 float32 scores are ~0.98 MB per sample: two samples per chunk within 2 MiB.
  assert _batch_chunks(16, 496, 496, devices=1) == 8
  assert _batch_chunks(32, 496, 496, devices=1) == 16
  assert _batch_chunks(16, 496, 496, devices=8) == 1        # 2 samples per device already
  assert _batch_chunks(16, 371, 371, devices=1) == 8        # 3 would fit; 2 divides 16
  assert _batch_chunks(16, 46, 496, devices=1) == 1         # the whole batch fits
  assert _batch_chunks(12, 600, 600, devices=1) == 12       # over budget: one sample per chunk
  assert _batch_chunks(12, 496, 496, devices=8) == 1        # uneven split over devices
  with pytest.raises(ValueError, match='3 chunks do not divide the batch of 8'):
    _plan(200, 200, 0, 0, 0.0, batch=8, chunks=3)


@pytest.mark.parametrize('tq,tk,offset', [(150, 150, 0), (130, 170, None)])
def test_attention_does_not_depend_on_batch_chunks(tq, tk, offset):
  # Chunking the batch in the head loop (and so the device count, which sets the chunks) must
  # change nothing: dropout masks are drawn per sample and head.
  rs = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rs.normal(size=(4, t, 2, 4)), jnp.float32) for t in (tq, tk, tk))
  rng = dropout_key(jax.random.key(7))
  run = lambda c: jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(attention(
      q, k, v, causal_offset=offset, dropout_rate=0.3, rng=rng, chunks=c))), argnums=(0, 1, 2))
  (l1, g1), (l4, g4) = run(1)(q, k, v), run(4)(q, k, v)
  assert _plan(tq, tk, 0, offset, 0.3, batch=4, chunks=4).loop   # the chunked head loop ran
  np.testing.assert_allclose(l4, l1, rtol=1e-6)
  # Float32 rounding of the batched products only: within 2e-6 of each gradient's scale (an
  # element far below the scale inherits the rounding of the large terms summed into it).
  for a, b in zip(g4, g1):
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(b))))
  out2 = attention(q, k, v, causal_offset=offset, dropout_rate=0.3, rng=rng, chunks=2)
  other = attention(q, k, v, causal_offset=offset, dropout_rate=0.3,
                    rng=dropout_key(jax.random.key(8)), chunks=2)
  assert not np.allclose(out2, other)                       # the masks do depend on the key


@pytest.mark.parametrize('loop', ['scan', 'unroll'])
def test_last_only_and_layer_loops_match_full_encoder(loop):
  rs = np.random.default_rng(2)
  x = jnp.asarray(rs.normal(size=(2, 9, 8)), jnp.float32)
  kv = jnp.asarray(rs.normal(size=(2, 12, 8)), jnp.float32)
  full = TransformerEncoder(embed_dim=8, num_heads=2, layers=3)
  last = TransformerEncoder(embed_dim=8, num_heads=2, layers=3, last_only=True)
  params = full.init(jax.random.key(0), x, kv)
  assert jax.tree.structure(params) == jax.tree.structure(last.init(jax.random.key(0), x, kv))
  with layer_loop(loop):
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
  enc = TransformerEncoder(embed_dim=8, num_heads=2, layers=3, attn_dropout=0.3,
                           relu_dropout=0.2, res_dropout=0.1)
  params = enc.init(jax.random.key(0), x, kv)
  rng = {'dropout': dropout_key(jax.random.key(5))}

  def loss(p, x):
    return jnp.sum(jnp.sin(enc.apply(p, x, kv, deterministic=False, rngs=rng)))

  results = {}
  for loop in ('scan', 'unroll'):
    with layer_loop(loop):
      results[loop] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  (v_s, g_s), (v_u, g_u) = results['scan'], results['unroll']
  np.testing.assert_allclose(v_s, v_u, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_s), jax.tree.leaves(g_u)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  deterministic = enc.apply(params, x, kv)
  assert not np.allclose(enc.apply(params, x, kv, deterministic=False, rngs=rng), deterministic)


def test_layer_loop_modes():
  small = jnp.zeros((4, 50, 8))
  large = jax.ShapeDtypeStruct((16, 496, 50), jnp.float32)
  assert _scan_layers_now(small) and not _scan_layers_now(large)    # 'auto' on the CPU backend
  with layer_loop('scan'):
    assert _scan_layers_now(small) and _scan_layers_now(large)
    with unrolled_loops():
      assert not _scan_layers_now(large)
  with layer_loop('unroll'):
    assert not _scan_layers_now(small)
  with pytest.raises(ValueError, match="layer loop mode must be 'auto', 'scan' or 'unroll'"):
    with layer_loop('loop'):
      pass
  from dmd_jax import layers
  saved = dict(layers._LAYER_LOOP)
  layers._LAYER_LOOP['mode'] = 'scanned'                # as a bad DMD_JAX_LAYER_LOOP would set it
  try:
    with pytest.raises(ValueError, match="DMD_JAX_LAYER_LOOP must be .* got 'scanned'"):
      _scan_layers_now(small)
  finally:
    layers._LAYER_LOOP.update(saved)


def _unrolled(m, x_in, x_kv):
  import math
  from dmd_jax.layers import TransformerEncoderLayer, sinusoidal_positions
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
