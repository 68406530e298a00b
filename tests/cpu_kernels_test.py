"""The native CPU attention kernel: same values, gradients and dropout masks as the pure-JAX
attention; fallback and errors when it cannot be built or used."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax import cpu_kernels, layers
from dmd_jax.rng import dropout_key

pytestmark = pytest.mark.skipif(not cpu_kernels.load(),
                                reason=f'native kernel unavailable: {cpu_kernels.kernel_status()}')


def _attention(mode, q, k, v, **kw):
  with layers.native_attention(mode):
    return layers.attention(q, k, v, **kw)


# (tq, tk, head width, dropout, causal offset, row_start). (150, 150) is cut into row blocks (the
# dropout index restarts per block); (130, 150, row_start 3) is a last-rows call with an offset;
# width 3 and 10 check the kernel's per-width code, width 20 (> 16) its portable scalar code;
# None has no mask.
CASES = [(37, 37, 5, 0.0, 0, 0), (40, 29, 4, 0.3, 11, 0), (50, 50, 10, 0.2, None, 0),
         (150, 150, 5, 0.3, 0, 0), (130, 150, 3, 0.2, 20, 3), (24, 60, 10, 0.0, 36, 0),
         (30, 30, 20, 0.3, 0, 0)]


@pytest.mark.parametrize('tq,tk,hd,rate,offset,row_start', CASES)
def test_native_attention_matches_pure_jax(tq, tk, hd, rate, offset, row_start):
  rs = np.random.default_rng(tq + tk)
  q, k, v = (jnp.asarray(rs.normal(size=(3, t, 4, hd)), jnp.float32) for t in (tq, tk, tk))
  kw = dict(causal_offset=offset, row_start=row_start, dropout_rate=rate,
            rng=dropout_key(jax.random.key(5), 'hash') if rate else None)
  outs, grads = {}, {}
  for mode in ('off', 'on'):
    loss = lambda q, k, v, mode=mode: jnp.sum(jnp.sin(_attention(mode, q, k, v, **kw)))
    outs[mode] = jax.jit(lambda q, k, v, mode=mode: _attention(mode, q, k, v, **kw))(q, k, v)
    grads[mode] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  scale = float(jnp.max(jnp.abs(outs['off'])))
  # Same dropout masks: a single differing mask entry would move outputs by O(1).
  np.testing.assert_allclose(outs['on'], outs['off'], atol=2e-6 * scale, rtol=0)
  for name, a, b in zip('qkv', grads['on'], grads['off']):
    np.testing.assert_allclose(a, b, atol=5e-6 * float(jnp.max(jnp.abs(b))), rtol=0,
                               err_msg=f'd{name}')
  if rate:   # dropout really acted: the no-dropout output differs
    plain = _attention('on', q, k, v, causal_offset=offset, row_start=row_start)
    assert float(jnp.max(jnp.abs(plain - outs['on']))) > 0.1 * scale


def test_causal_rows_ignore_hidden_keys():
  rs = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rs.normal(size=(2, 64, 2, 5)), jnp.float32) for _ in range(3))
  out = _attention('on', q, k, v, causal_offset=0)
  out2 = _attention('on', q, k.at[:, 40:].set(9.0), v.at[:, 40:].set(-9.0), causal_offset=0)
  np.testing.assert_array_equal(out[:, :40], out2[:, :40])   # rows 0..39 see keys 0..39 only
  assert not np.allclose(out[:, 40:], out2[:, 40:])


def test_transformers_in_training_mode_match_pure_jax():
  """Cross-modal and last-position transformers (scanned layers, attention dropout drawn from the
  module's rng): the loss and the gradients of every parameter and input agree."""
  cross = layers.TransformerEncoder(embed_dim=12, num_heads=2, layers=2, attn_dropout=0.2,
                                    res_dropout=0.1)
  last = layers.TransformerEncoder(embed_dim=12, num_heads=3, layers=2, attn_dropout=0.3,
                                   last_only=True)
  x, kv = jax.random.normal(jax.random.key(0), (3, 12, 12)), jax.random.normal(
      jax.random.key(1), (3, 40, 12))
  params = (cross.init(jax.random.key(2), x, kv), last.init(jax.random.key(3), kv))

  def loss(params, x, kv):
    rngs = {'dropout': dropout_key(jax.random.key(4))}
    a = cross.apply(params[0], x, kv, deterministic=False, rngs=rngs)
    b = last.apply(params[1], kv, deterministic=False, rngs=rngs)
    return jnp.sum(jnp.sin(a)) + jnp.sum(b ** 2)

  res = {}
  for mode in ('off', 'on'):
    with layers.native_attention(mode):
      res[mode] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(params, x, kv)
  np.testing.assert_allclose(res['on'][0], res['off'][0], rtol=1e-5)
  flat_on, flat_off = jax.tree.leaves(res['on'][1]), jax.tree.leaves(res['off'][1])
  assert len(flat_on) == len(flat_off) > 20
  for a, b in zip(flat_on, flat_off):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * max(1.0, float(jnp.max(jnp.abs(b)))))


def test_mode_errors_name_the_problem():
  with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
    with layers.native_attention('always'):
      pass
  q = jnp.zeros((1, 8, 2, 4), jnp.bfloat16)
  with pytest.raises(ValueError, match='float32'):
    _attention('on', q, q, q, causal_offset=None)
  # Threefry dropout keys are not what the kernel hashes: refused under 'on' ...
  q = jnp.zeros((1, 8, 2, 4), jnp.float32)
  with pytest.raises(ValueError, match='hash or no dropout'):
    _attention('on', q, q, q, causal_offset=None, dropout_rate=0.5, rng=jax.random.key(0))
  # ... and left to pure JAX under 'auto'.
  out = _attention('auto', q, q, q, causal_offset=None, dropout_rate=0.5, rng=jax.random.key(0))
  assert out.shape == q.shape


def test_disabled_or_unbuildable_falls_back(monkeypatch, tmp_path):
  saved = dict(cpu_kernels._state)
  try:
    monkeypatch.setenv('DMD_JAX_CPU_KERNELS', '0')
    cpu_kernels._state.clear()
    assert not cpu_kernels.load()
    assert 'DMD_JAX_CPU_KERNELS' in cpu_kernels.kernel_status()
    # A compiler that fails: the reason names the source, and no library is left behind.
    monkeypatch.setenv('DMD_JAX_CPU_KERNELS', '1')
    monkeypatch.setenv('CXX', '/bin/false')
    monkeypatch.setenv('DMD_JAX_CACHE_DIR', str(tmp_path))
    cpu_kernels._state.clear()
    assert not cpu_kernels.load()
    assert 'attention_cpu.cc' in cpu_kernels.kernel_status()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError, match='native attention unavailable'):
      q = jnp.zeros((1, 8, 2, 4), jnp.float32)
      _attention('on', q, q, q, causal_offset=None)
  finally:
    cpu_kernels._state.clear()
    cpu_kernels._state.update(saved)
