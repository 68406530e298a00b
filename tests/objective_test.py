"""Losses against direct loop implementations of the reference's definitions (spec §3)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.config import reference_config, BertConfig
from dmd_jax.model.gd_unit import edges_to_matrix
from dmd_jax.schema import STUDENT, TEACHER
from dmd_jax.objective import dmd as losses, total


def _hinge_loop(feats, ids):
  """HingeLoss.forward as the reference computes it: per anchor, over (positive, negative)."""
  n = len(ids)
  def cos(a, b):
    na = max(np.sqrt((a * a).sum() + 1e-8), 1e-8)
    nb = max(np.sqrt((b * b).sum() + 1e-8), 1e-8)
    return (a * b).sum() / (na * nb)
  total, count = 0.0, 0
  for i in range(n):
    pos = [j for j in range(n) if j != i and ids[j] == ids[i]]
    neg = [j for j in range(n) if ids[j] != ids[i]]
    if not pos or not neg:
      continue
    terms = [max(0.0, 0.15 * abs(ids[i] - ids[q]) - cos(feats[i], feats[p]) + cos(feats[i], feats[q]))
             for p, q in itertools.product(pos, neg)]
    total += np.mean(terms)
    count += 1
  return total / max(count, 1)


def test_margin_loss_matches_loop():
  rs = np.random.default_rng(0)
  for labels in ([1.0, -1.0, 1.0, 0.6666667], [2.0, 2.0, 2.0, 2.0], [0.2, -0.4, 1.8, 3.0]):
    b = len(labels)
    out = {f'c_{m}_sim': rs.normal(size=(b, 5)).astype(np.float32) for m in 'lva'}
    feats = np.stack([out[f'c_{m}_sim'] for m in 'lva'], 1).reshape(-1, 5)
    ids = np.repeat(np.float32(labels), 3)
    got = losses.margin_loss({k: jnp.asarray(v) for k, v in out.items()}, jnp.asarray(labels))
    np.testing.assert_allclose(got, _hinge_loop(feats.astype(np.float64), ids), rtol=1e-5)


def test_orthogonality_is_batch_axis_cosine():
  rs = np.random.default_rng(1)
  s, c = rs.normal(size=(2, 4, 6, 3))  # (B, T, d)
  want = np.mean([max(0.0, (s[:, t, k] @ c[:, t, k]) / np.sqrt(
      ((s[:, t, k] ** 2).sum() + 1e-12) * ((c[:, t, k] ** 2).sum() + 1e-12)))
                  for t in range(6) for k in range(3)])
  np.testing.assert_allclose(losses.batch_axis_cosine_hinge(jnp.asarray(s), jnp.asarray(c)), want,
                             rtol=1e-5)


def test_edge_matrix_layout():
  e = jnp.arange(1.0, 7.0)[None]  # edge x gets value x + 1
  m = np.asarray(edges_to_matrix(e))[0]
  # Edge 0 is (student l, teacher v): source v (row 1) -> target l (column 0).
  assert m[1, 0] == 1.0 and m[2, 0] == 2.0 and m[0, 1] == 3.0 and m[0, 2] == 5.0
  np.testing.assert_array_equal(np.diag(m), 0)
  assert sorted(m[TEACHER, STUDENT]) == [1, 2, 3, 4, 5, 6]


def test_distillation_teacher_is_detached():
  """Gradients flow through the student argument only: the gradient of the vectorised loss
  equals that of an explicit form whose teachers are constants."""
  rs = np.random.default_rng(2)
  v = jnp.asarray(rs.normal(size=(3, 4, 5)))
  w = jnp.asarray(rs.uniform(size=(4, 6)))
  teachers = v[TEACHER]

  def l1_explicit(x):
    return jnp.sum(jnp.mean(w.T * jnp.abs(x[STUDENT] - teachers).sum(-1), axis=1))

  def cos_explicit(x):
    s = x[STUDENT]
    cos = (s * teachers).sum(-1) / jnp.sqrt(((s * s).sum(-1) + 1e-12)
                                             * ((teachers * teachers).sum(-1) + 1e-12))
    return jnp.sum(jnp.mean(jax.nn.relu(cos), 1) * jnp.mean(w, 0))

  for fn, explicit in ((losses.weighted_l1_distill, l1_explicit),
                       (losses.min_cosine_distill, cos_explicit)):
    np.testing.assert_allclose(fn(v, w), explicit(v), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: fn(x, w))(v), jax.grad(explicit)(v),
                               rtol=1e-5, atol=1e-7)


def test_homo_repr_is_not_in_total():
  cfg = reference_config('mosi', bert=BertConfig.tiny(hidden_size=16))
  rs = np.random.default_rng(3)
  b = 4
  out = {}
  for m in 'lva':
    out[f'origin_{m}'] = out[f'recon_{m}'] = out[f's_{m}'] = out[f's_{m}_r'] = out[f'c_{m}'] = \
        jnp.asarray(rs.normal(size=(b, 3, cfg.d)))
    out[f'c_{m}_sim'] = jnp.asarray(rs.normal(size=(b, cfg.d)))
    for space, width in (('homo', cfg.d), ('hetero', 2 * cfg.d)):
      out[f'logits_{m}_{space}'] = jnp.asarray(rs.normal(size=(b, 1)))
      out[f'repr_{m}_{space}'] = jnp.asarray(rs.normal(size=(b, width)))
  out['output_logit'] = out['logits_c'] = jnp.zeros((b, 1))
  out['edge_list_homo'] = out['edge_list_hetero'] = jnp.full((b, 6), 1 / 6)
  base = total.dmd_losses(out, jnp.zeros((b, 1)), cfg)
  other = total.dmd_losses(out, jnp.zeros((b, 1)), cfg.replace(w_losses_homo=(1.0, 99.0)))
  assert float(other['homo_repr']) != float(base['homo_repr'])
  assert float(other['total']) == float(base['total'])
  # Uniform edges: reg = gd_reg * sum (1/6 - prior)^2, the reference's "~2.99 at init" value.
  np.testing.assert_allclose(base['homo_reg'],
                             10 * np.sum((1 / 6 - np.array(cfg.gd_prior_homo)) ** 2), rtol=1e-6)
