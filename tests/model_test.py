"""The network: at the reference sizes (tiny BERT) its outputs, parameter counts and the gradient
of the whole DMD loss through the fast attention against autodiff of the plain attention; jit
and eager agree; dropout; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmd_jax
from dmd_jax import random_batch
from dmd_jax.config import AttentionConfig, BertConfig, DMDConfig, reference_config
from dmd_jax.model import attention as attn
from dmd_jax.model import kernels
from dmd_jax.model.attention import plain_attention
from dmd_jax.objective import compute_loss
from helpers import random_params

TINY_BERT = BertConfig.tiny(vocab_size=30522, hidden_size=32, layers=1, heads=2)


@pytest.fixture(scope='module')
def small():
  cfg = reference_config('mosei', False, bert=TINY_BERT, d=6, num_heads=2, nlevels=1,
                         seq_lens=(12, 20, 16))
  return cfg, dmd_jax.init_params(cfg, jax.random.key(1)), random_batch(cfg, 3)


@pytest.mark.slow
def test_jit_and_eager_agree(small):
  cfg, params, batch = small
  eager_total, eager = dmd_jax.compute_loss(params, batch, cfg)
  jit_total, jitted = jax.jit(lambda p, b: dmd_jax.compute_loss(p, b, cfg))(params, batch)
  np.testing.assert_allclose(eager_total, jit_total, rtol=1e-5)
  for k, v in eager['outputs'].items():
    np.testing.assert_allclose(v, jitted['outputs'][k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_dropout_only_in_training(small):
  cfg, params, batch = small
  f = jax.jit(lambda p, b, r, train: dmd_jax.forward(p, b, cfg, rng=r, train=train),
              static_argnums=3)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  e1, e2 = f(params, batch, k1, False), f(params, batch, k2, False)
  np.testing.assert_array_equal(e1['output_logit'], e2['output_logit'])
  t1, t1b, t2 = f(params, batch, k1, True), f(params, batch, k1, True), f(params, batch, k2, True)
  np.testing.assert_array_equal(t1['output_logit'], t1b['output_logit'])  # same key, same mask
  assert not np.allclose(t1['output_logit'], t2['output_logit'])
  assert not np.allclose(t1['output_logit'], e1['output_logit'])
  with pytest.raises(ValueError, match='needs an rng'):
    dmd_jax.forward(params, batch, cfg, train=True)
  # With every rate at zero, training mode is deterministic and equals evaluation.
  z = cfg.without_dropout()
  tz = jax.jit(lambda p, b, r: dmd_jax.forward(p, b, z, rng=r, train=True))(params, batch, k1)
  np.testing.assert_allclose(tz['output_logit'], e1['output_logit'], rtol=1e-5, atol=1e-6)


def test_wrong_shapes_and_missing_keys_are_named(small):
  cfg, params, batch = small
  bad = dict(batch, audio=batch['audio'][:, :-1])
  with pytest.raises(ValueError, match=r"input 'audio' has shape \(3, 19, 74\), expected \(B, 20, 74\)"):
    dmd_jax.compute_loss(params, bad, cfg)
  with pytest.raises(ValueError, match="'vision' has batch size 2"):
    dmd_jax.compute_loss(params, dict(batch, vision=batch['vision'][:2]), cfg)
  with pytest.raises(KeyError, match=r"lacks key\(s\) \['labels'\]"):
    dmd_jax.compute_loss(params, {k: v for k, v in batch.items() if k != 'labels'}, cfg)
  with pytest.raises(ValueError, match="'labels' has shape"):
    dmd_jax.compute_loss(params, dict(batch, labels=jnp.zeros((3, 2))), cfg)


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match='DMDConfig.dataset'):
    DMDConfig(dataset='iemocap')
  with pytest.raises(ValueError, match='DMDConfig.d: d=50 must be a positive multiple of num_heads=7'):
    DMDConfig(num_heads=7)
  with pytest.raises(ValueError, match='DMDConfig.feature_dims: text width 768 != text encoder'):
    DMDConfig(bert=TINY_BERT)
  with pytest.raises(ValueError, match='kernel 60 of modality a'):
    reference_config('mosi', bert=TINY_BERT, kernel_sizes=(5, 60, 5))

# ---- The network at the reference sizes: outputs and the gradient through the fast attention ----
# One forward pass, two backward passes: the fast attention's own, and autodiff of
# `plain_attention` at the same inputs (tests/attention_test.py checks each attention path
# against float64; here the whole DMD loss at full widths).

_BACKWARD = {'mode': 'fast'}
_FAST = attn.attention


def _dual_attention(q, k, v, *, causal_offset, row_start=0, dropout_rate=0.0, rng=None,
                    chunks=None, config=attn.DEFAULT):
  """The fast attention's forward; its backward is the fast one or, while _BACKWARD['mode'] is
  'plain' when the backward is traced, autodiff of `plain_attention` at the same inputs. Both
  gradients then come from one forward pass: the comparison sees the attention backward alone,
  not ReLU kinks that float32 rounding of two separately compiled forward passes can flip (a
  pre-activation within rounding of zero moves one unit's gradient by up to ~1e-3 of its scale at
  these sizes: measured on MOSI aligned in training mode, one element of
  trans_v_mem.layers_1.fc1.bias)."""
  kw = dict(causal_offset=causal_offset, row_start=row_start, dropout_rate=dropout_rate)

  @jax.custom_vjp
  def f(q, k, v, rng):
    return _FAST(q, k, v, rng=rng, chunks=chunks, config=config, **kw)

  def f_fwd(q, k, v, rng):
    out, vjp = jax.vjp(lambda *a: _FAST(*a, rng=rng, chunks=chunks, config=config, **kw), q, k, v)
    return out, (q, k, v, rng, vjp)

  def f_bwd(res, g):
    q, k, v, rng, vjp = res
    if _BACKWARD['mode'] == 'fast':
      return (*vjp(g), None)
    plain = lambda *a: plain_attention(*a, rng=rng, **kw)
    return (*jax.vjp(plain, q, k, v)[1](g), None)

  f.defvjp(f_fwd, f_bwd)
  return f(q, k, v, rng)


def _with_attention_biases(params, value):
  """Every MulT attention's query and key biases set to `value`: scores with large row maxima,
  as attention layers can develop in training."""
  def visit(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: visit(v) for k, v in tree.items()}
    if 'in_proj_bias' in out:
      b = out['in_proj_bias']
      out['in_proj_bias'] = b.at[:2 * b.shape[0] // 3].set(value)
    return out
  return visit(params)


def _model_gradients(cfg, params, batch_size, seed, train):
  """({name: (fast, plain)} gradients of the DMD loss, the loss's aux): one forward, both
  backward passes."""
  batch = random_batch(cfg, batch_size, seed)
  rng = jax.random.key(seed + 1) if train else None
  loss = lambda p: compute_loss(p, batch, cfg, rng=rng, train=train)
  _, vjp, aux = jax.jit(lambda p: jax.vjp(loss, p, has_aux=True))(params)

  def both(vjp):
    out = []
    for mode in ('fast', 'plain'):
      _BACKWARD['mode'] = mode          # read while this backward is traced
      out.append(vjp(jnp.ones((), jnp.float32))[0])
    return out

  try:
    fast, plain = jax.jit(both)(vjp)
  finally:
    _BACKWARD['mode'] = 'fast'
  flat = lambda t: {jax.tree_util.keystr(k): np.asarray(v, np.float64)
                    for k, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  fast, plain = flat(fast), flat(plain)
  return {k: (fast[k], plain[k]) for k in fast}, aux


def _check_model(setting, seq_lens, batch_size, seed, train, native, monkeypatch, bias=None):
  """The network at the full widths of `setting`: output shapes, finiteness, parameter counts,
  and the gradient through the fast attention against autodiff of the plain attention."""
  dataset, alignment = setting.split('_')
  kw = {} if seq_lens is None else {'seq_lens': seq_lens}
  cfg = reference_config(dataset, alignment == 'aligned', bert=TINY_BERT, **kw)
  if not train:
    cfg = cfg.without_dropout()
  if native == 'on' and not kernels.load():
    pytest.skip(f'native kernel unavailable: {kernels.kernel_status()}')
  cfg = cfg.replace(attention=AttentionConfig(native=native))
  monkeypatch.setattr(attn, 'attention', _dual_attention)
  params = random_params(cfg, seed)
  if bias is not None:
    params = _with_attention_biases(params, bias)
  grads, aux = _model_gradients(cfg, params, batch_size, seed, train)
  _check_outputs(cfg, aux, batch_size)
  checked, worst = 0, (0.0, '')
  for name, (fast, plain) in grads.items():
    scale = np.max(np.abs(plain))
    if 'text_model' in name:        # BERT does not use this attention (and its key biases have
      continue                      # an identically zero gradient, float noise on both sides)
    err = float(np.max(np.abs(fast - plain)) / scale) if scale > 0 else float(np.max(np.abs(fast)))
    worst = max(worst, (err, name))
    checked += 1
    assert err <= 1e-4, f'{name}: fast backward differs from autodiff by {err:.3g} of its scale'
  assert checked > 400
  return worst


def _check_outputs(cfg, aux, b):
  out, d = aux['outputs'], cfg.d
  lens = cfg.conv_lens
  for m in 'lva':
    for k in ('origin', 's', 'c', 'recon'):
      assert out[f'{k}_{m}'].shape == (b, lens[m], d), k
    assert out[f's_{m}_r'].shape == (b, lens[m], d)
    assert out[f'repr_{m}_homo'].shape == (b, d) and out[f'repr_{m}_hetero'].shape == (b, 2 * d)
    assert out[f'logits_{m}_homo'].shape == out[f'logits_{m}_hetero'].shape == (b, 1)
  assert out['output_logit'].shape == out['logits_c'].shape == (b, 1)
  assert out['edges_homo'].shape == out['edges_hetero'].shape == (b, 3, 3)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(aux))


@pytest.mark.parametrize('dataset', ['mosi', 'mosei'])
def test_reference_parameter_counts(dataset):
  """The reference's parameter counts without BERT (spec §2.1, aligned settings), and the
  GD-Units', from the parameter shapes (nothing compiled)."""
  cfg = reference_config(dataset, True, bert=TINY_BERT)
  params = jax.eval_shape(lambda r: dmd_jax.init_params(cfg, r), jax.random.key(0))
  n = sum(x.size for k, v in params.items() if k not in ('text_model', 'homo_gd', 'hetero_gd')
          for x in jax.tree.leaves(v))
  n_text_proj = params['proj_l']['kernel'].size
  ref_proj_l = 5 * 768 * cfg.d  # the reference's proj_l sees 768-wide bert-base features
  assert n - n_text_proj + ref_proj_l == {'mosi': 4_743_658, 'mosei': 1_792_778}[dataset]
  n_gd = [sum(x.size for x in jax.tree.leaves(params[k])) for k in ('homo_gd', 'hetero_gd')]
  assert n_gd == {'mosi': [3649, 3425], 'mosei': [2369, 2145]}[dataset]


# Full widths and head counts (MOSI d=50 / 10 heads, MOSEI d=30 / 6 heads, 4 levels). One CI
# case: training mode (dropout) through the native kernel at MOSEI's widths. The slow tier runs
# all four settings at the released lengths, with more seeds and batch sizes, on the pure-JAX
# path too, with scores of large row maxima at unaligned lengths (the per-head loop and row
# blocks; tests/attention_test.py checks those paths at small sizes in CI). `bias` sets the
# query and key biases of every MulT attention (scores with row maxima ~100, as in trained
# layers).
MODEL_CASES = [
    ('mosei_aligned', None, 4, 1, True, 'on', None),
]
SLOW_MODEL_CASES = [
    (s, None, b, seed, train, native, bias)
    for s in ('mosi_aligned', 'mosei_aligned', 'mosi_unaligned', 'mosei_unaligned')
    for b, seed, train, native, bias in ((8, 4, False, 'auto', None), (4, 5, True, 'on', None),
                                         (2, 6, True, 'off', 10.0))]
CASE_FIELDS = 'setting,seq_lens,batch_size,seed,train,native,bias'


@pytest.mark.parametrize(CASE_FIELDS, MODEL_CASES)
def test_reference_sizes_and_gradients_through_the_fast_attention(setting, seq_lens, batch_size, seed,
                                                          train, native, bias, monkeypatch):
  _check_model(setting, seq_lens, batch_size, seed, train, native, monkeypatch, bias)


@pytest.mark.slow
@pytest.mark.parametrize(CASE_FIELDS, SLOW_MODEL_CASES)
def test_model_gradients_match_autodiff_full_length(setting, seq_lens, batch_size, seed, train,
                                                    native, bias, monkeypatch):
  _check_model(setting, seq_lens, batch_size, seed, train, native, monkeypatch, bias)
