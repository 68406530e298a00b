"""bfloat16 compute (DMDConfig.compute_dtype): where it runs bf16, what stays float32, and how far
it drifts from the float32 reference on the parity fixtures; the matmul precision of float32
products (DMDConfig.matmul_precision) on the CPU and, emulated, as a TPU computes it."""

import collections

import jax
import numpy as np
import pytest

import dmd_jax
from dmd_jax.dev import parity as parity_module
from dmd_jax.model import precision
from helpers import random_params


def _tiny(**kw):
  return dmd_jax.reference_config('mosi', aligned=True, bert=dmd_jax.BertConfig.tiny(), d=8,
                                  num_heads=2, nlevels=1, **kw)


def _count_products(jaxpr, counts):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      counts[tuple(str(v.aval.dtype) for v in eqn.invars)] += 1
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (list, tuple)) else [value]):
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          _count_products(inner, counts)
  return counts


def _abstract_params(cfg):
  return jax.eval_shape(lambda r: dmd_jax.init_params(cfg, r), jax.random.key(0))


def test_bfloat16_runs_products_in_bf16_and_keeps_float32_state():
  cfg = _tiny(compute_dtype='bfloat16')
  params = _abstract_params(cfg)
  batch = dmd_jax.random_batch(cfg, 2)
  loss = lambda p: dmd_jax.compute_loss(p, batch, cfg, rng=jax.random.key(1), train=True)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(p)[0]))(params)
  counts = _count_products(jaxpr.jaxpr, collections.Counter())
  bf16 = counts[('bfloat16', 'bfloat16')]
  assert bf16 / sum(counts.values()) > 0.95, counts          # all but the GD-Units' few
  # Shapes and dtypes only (no compute): losses, outputs, gradients and the updated state.
  total, aux = jax.eval_shape(loss, params)
  grads = jax.eval_shape(jax.grad(lambda p: loss(p)[0]), params)
  assert total.dtype == np.float32
  assert {str(x.dtype) for x in jax.tree.leaves(aux)} == {'float32'}
  assert {str(x.dtype) for x in jax.tree.leaves(grads)} == {'float32'}
  tx = dmd_jax.reference_optimizer(update_epochs=1)
  state = jax.eval_shape(lambda p: dmd_jax.create_train_state(p, tx), params)
  state, _ = jax.eval_shape(lambda s: dmd_jax.train_step(s, batch, jax.random.key(2), config=cfg),
                            state)
  assert {str(x.dtype) for x in jax.tree.leaves((state.params, state.opt_state))} <= {
      'float32', 'int32'}


def test_float32_config_traces_no_bf16():
  cfg = _tiny()
  batch = dmd_jax.random_batch(cfg, 2)
  jaxpr = jax.make_jaxpr(lambda p: dmd_jax.compute_loss(p, batch, cfg)[0])(_abstract_params(cfg))
  counts = _count_products(jaxpr.jaxpr, collections.Counter())
  assert set(counts) == {('float32', 'float32')}, counts


def test_compute_dtype_is_validated():
  with pytest.raises(ValueError, match='compute_dtype: must be one of'):
    _tiny(compute_dtype='float16')
  assert precision.compute_dtype(_tiny(compute_dtype='bfloat16')) == jax.numpy.bfloat16


def test_bfloat16_drift_from_reference(parity_first):
  """bf16 keeps ~3 significant digits per op: the prediction stays within 1% of its scale, the
  objective within 1%, every output within 10% (the deepest: eight transformer layers). (The CI
  tier checks the first fixture; the slow tier every one.)"""
  _bfloat16_drift_bounds(parity_first)


@pytest.mark.slow
def test_bfloat16_drift_on_every_fixture(parity):
  _bfloat16_drift_bounds(parity)


def _bfloat16_drift_bounds(parity):
  d = parity_module.drift(str(parity.path), 'bfloat16')
  assert d['outputs']['output_logit'] < 1e-2
  assert max(d['outputs'][k] for k in ('edges_homo', 'edges_hetero')) < 1e-2
  assert max(d['outputs'].values()) < 0.1
  assert d['losses']['total'] < 1e-2
  assert max(d['losses'].values()) < 0.05
  assert d['outputs']['output_logit'] > 1e-6      # it did run in bf16 (float32 is ~1e-6 off)


def test_matmul_precision_is_validated_and_changes_nothing_on_cpu():
  """'float32' (HIGHEST) and 'default' products are the same float32 arithmetic on a CPU: the
  losses and outputs agree bit for bit, so CPU training and the parity tests are unchanged."""
  with pytest.raises(ValueError, match="matmul_precision: must be one of .*got 'tf32'"):
    _tiny(matmul_precision='tf32')
  params = random_params(_tiny())
  batch = dmd_jax.random_batch(_tiny(), 2)
  outs = [jax.jit(lambda p, b, c=cfg: dmd_jax.compute_loss(p, b, c))(params, batch)
          for cfg in (_tiny(matmul_precision='float32'), _tiny(matmul_precision='default'))]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(a, b)


def test_one_bf16_pass_per_product_drift_from_reference(parity_first):
  """matmul_precision='default' as a TPU computes it (operands of every product rounded to bf16,
  8 significant bits, float32 sums; emulated here): the prediction stays within 1% of its
  scale, the edges within 0.1%, the objective within 0.1%, every output within 5% and every loss
  term within 2%. (The CI tier checks the first fixture; the slow tier every one.)"""
  _one_pass_drift_bounds(parity_first)


@pytest.mark.slow
def test_one_bf16_pass_per_product_drift_on_every_fixture(parity):
  _one_pass_drift_bounds(parity)


def _one_pass_drift_bounds(parity):
  d = parity_module.drift(str(parity.path), 'float32', 'default')
  assert d['outputs']['output_logit'] < 1e-2
  assert max(d['outputs'][k] for k in ('edges_homo', 'edges_hetero')) < 1e-3
  assert max(d['outputs'].values()) < 0.05
  assert d['losses']['total'] < 1e-3
  assert max(d['losses'].values()) < 0.02
  assert d['outputs']['output_logit'] > 1e-4     # it did round (float32 is ~2e-7 off)
