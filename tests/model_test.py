"""The network at the reference sizes (tiny BERT): shapes, finiteness, jit, dropout, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dmd_jax
from dmd_jax.config import BertConfig, DMDConfig, reference_config
from dmd_jax import random_batch
from helpers import random_params

TINY_BERT = BertConfig.tiny(vocab_size=30522, hidden_size=32, layers=1, heads=2)


@pytest.mark.parametrize('dataset,aligned', [('mosi', True), ('mosi', False), ('mosei', True),
                                             ('mosei', False)])
def test_reference_sizes_shapes_and_finite(dataset, aligned):
  cfg = reference_config(dataset, aligned, bert=TINY_BERT)
  # Shapes and finiteness need no reference initialisation (compiling init at four reference
  # sizes would dominate the test's time).
  params = random_params(cfg)
  batch = random_batch(cfg, 2)
  total, aux = jax.jit(lambda p, b: dmd_jax.compute_loss(p, b, cfg))(params, batch)
  out, d = aux['outputs'], cfg.d
  lens = cfg.conv_lens
  for m in 'lva':
    for k in ('origin', 's', 'c', 'recon'):
      assert out[f'{k}_{m}'].shape == (2, lens[m], d), k
    assert out[f's_{m}_r'].shape == (2, lens[m], d)
    assert out[f'repr_{m}_homo'].shape == (2, d) and out[f'repr_{m}_hetero'].shape == (2, 2 * d)
    assert out[f'logits_{m}_homo'].shape == out[f'logits_{m}_hetero'].shape == (2, 1)
  assert out['output_logit'].shape == out['logits_c'].shape == (2, 1)
  assert out['edges_homo'].shape == out['edges_hetero'].shape == (2, 3, 3)
  assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(aux))
  # Reference parameter counts without BERT (spec §2.1), aligned settings; plus the GD-Units.
  if aligned:
    n = sum(x.size for k, v in params.items() if k not in ('text_model', 'homo_gd', 'hetero_gd')
            for x in jax.tree.leaves(v))
    n_text_proj = params['proj_l']['kernel'].size
    ref_proj_l = 5 * 768 * d  # the reference's proj_l sees 768-wide bert-base features
    assert n - n_text_proj + ref_proj_l == {'mosi': 4_743_658, 'mosei': 1_792_778}[dataset]
    n_gd = [sum(x.size for x in jax.tree.leaves(params[k])) for k in ('homo_gd', 'hetero_gd')]
    assert n_gd == {'mosi': [3649, 3425], 'mosei': [2369, 2145]}[dataset]


@pytest.fixture(scope='module')
def small():
  cfg = reference_config('mosei', False, bert=TINY_BERT, d=6, num_heads=2, nlevels=1,
                         seq_lens=(12, 20, 16))
  return cfg, dmd_jax.init_params(cfg, jax.random.key(1)), random_batch(cfg, 3)


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
  tz = dmd_jax.forward(params, batch, z, rng=k1, train=True)
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
