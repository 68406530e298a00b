"""The terms of the DMD objective (spec §3), one pure function each, vectorised (no loop over
anchors, samples or modality pairs). Stop-gradients sit exactly where the reference detaches:
the teacher argument inside the GD distances, nothing else. The weighted total is in
dmd_jax.objective.total.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from dmd_jax.config import DMDConfig
from dmd_jax.schema import MODALITIES as MODS, STUDENT, TEACHER

Outputs = Mapping[str, jax.Array]
TASK_HEADS = ('output_logit', 'logits_l_homo', 'logits_v_homo', 'logits_a_homo',
              'logits_l_hetero', 'logits_v_hetero', 'logits_a_hetero', 'logits_c')


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean(jnp.abs(pred - target))


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  return jnp.mean(jnp.square(target - pred))


def task_loss(out: Outputs, labels: jax.Array) -> jax.Array:
  """Sum of L1 losses of the eight prediction heads against labels (B, 1)."""
  return sum(l1(out[k], labels) for k in TASK_HEADS)


def reconstruction_loss(out: Outputs) -> jax.Array:
  """sum_m MSE(recon_m, origin_m); origin is the conv projection, not detached."""
  return sum(mse(out[f'recon_{m}'], out[f'origin_{m}']) for m in MODS)


def cycle_loss(out: Outputs) -> jax.Array:
  """sum_m MSE(s_m, s_m_r): the specific encoder re-applied to the reconstruction."""
  return sum(mse(out[f's_{m}'], out[f's_{m}_r']) for m in MODS)


def batch_axis_cosine_hinge(x: jax.Array, y: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch-1.9 CosineEmbeddingLoss(target=-1, margin 0) on (T, B, d) inputs, given here as
  (B, T, d): the cosine runs over the *batch* axis for every (t, channel), then
  mean_{t,c} relu(cos) (spec §3.4)."""
  dot = jnp.sum(x * y, axis=0)
  denom = jnp.sqrt((jnp.sum(x * x, axis=0) + eps) * (jnp.sum(y * y, axis=0) + eps))
  return jnp.mean(jax.nn.relu(dot / denom))


def orthogonality_loss(out: Outputs) -> jax.Array:
  return sum(batch_axis_cosine_hinge(out[f's_{m}'], out[f'c_{m}']) for m in MODS)


def _hinge_cosine_matrix(feats: jax.Array) -> jax.Array:
  norm = jnp.maximum(jnp.sqrt(jnp.sum(feats * feats, axis=1) + 1e-8), 1e-8)
  return (feats @ feats.T) / (norm[:, None] * norm[None, :])


def margin_loss(out: Outputs, labels: jax.Array, margin_scale: float = 0.15) -> jax.Array:
  """Label-aware hinge on the aligned common features (HingeLoss, spec §3.5).

  Rows are [c_l_sim[0], c_v_sim[0], c_a_sim[0], c_l_sim[1], ...] (3B), each labelled with its
  sample's label. For anchor i, positives P_i = {j != i: y_j == y_i} (exact float equality),
  negatives N_i = {j: y_j != y_i}; loss_i = mean_{p in P_i, n in N_i}
  relu(margin_scale |y_i - y_n| - cos(i, p) + cos(i, n)); anchors lacking P or N are skipped and
  the loss is the mean over the remaining anchors (0 if none).
  """
  feats = jnp.stack([out[f'c_{m}_sim'] for m in MODS], axis=1).reshape(-1, out['c_l_sim'].shape[-1])
  return label_hinge_rows(feats, jnp.repeat(labels.reshape(-1), 3), margin_scale)


def label_hinge_rows(feats: jax.Array, ids: jax.Array, margin_scale: float) -> jax.Array:
  """The hinge of `margin_loss` over rows feats (N, F) labelled ids (N,)."""
  n = ids.shape[0]
  cos = _hinge_cosine_matrix(feats)
  same = ids[:, None] == ids[None, :]
  pos = same & ~jnp.eye(n, dtype=bool)
  neg = ~same
  margin = margin_scale * jnp.abs(ids[:, None] - ids[None, :])
  # hinge[i, p, q] = relu(margin[i, q] - cos[i, p] + cos[i, q]), kept where p in P_i, q in N_i.
  hinge = jax.nn.relu(margin[:, None, :] - cos[:, :, None] + cos[:, None, :])
  pair_mask = pos[:, :, None] & neg[:, None, :]
  n_pos, n_neg = pos.sum(1), neg.sum(1)
  valid = (n_pos > 0) & (n_neg > 0)
  per_anchor = jnp.sum(jnp.where(pair_mask, hinge, 0.0), axis=(1, 2)) / jnp.maximum(n_pos * n_neg, 1)
  return jnp.sum(jnp.where(valid, per_anchor, 0.0)) / jnp.maximum(valid.sum(), 1)


def _stack(out: Outputs, kind: str, space: str) -> jax.Array:
  return jnp.stack([out[f'{kind}_{m}_{space}'] for m in MODS])  # (3, B, .) in (l, v, a) order


def gd_regulariser(edges: jax.Array, prior: jax.Array, gd_reg: float) -> jax.Array:
  """gd_reg * sum_x (mean_b E[b, x] - prior[x])^2 for edges (B, 6)."""
  return gd_reg * jnp.sum(jnp.square(jnp.mean(edges, axis=0) - prior))


def weighted_l1_distill(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_x mean_b(w[b, x] * sum_f |v[S_x, b] - sg(v[T_x, b])|) for values (3, B, F), w (B, 6)."""
  dist = jnp.sum(jnp.abs(values[STUDENT] - jax.lax.stop_gradient(values[TEACHER])), axis=-1)
  return jnp.sum(jnp.mean(weights.T * dist, axis=1))


def min_cosine_distill(values: jax.Array, weights: jax.Array, eps: float = 1e-12) -> jax.Array:
  """HeteroGD 'repr distillation' (spec §3.6): sum_x mean_b relu(cos(v[S_x,b], sg(v[T_x,b])))
  * mean_b w[b, x]; it penalises positive cosine between student and teacher."""
  s, t = values[STUDENT], jax.lax.stop_gradient(values[TEACHER])  # (6, B, F)
  cos = jnp.sum(s * t, -1) / jnp.sqrt((jnp.sum(s * s, -1) + eps) * (jnp.sum(t * t, -1) + eps))
  return jnp.sum(jnp.mean(jax.nn.relu(cos), axis=1) * jnp.mean(weights, axis=0))


def gd_losses(out: Outputs, space: str, cfg: DMDConfig) -> dict[str, jax.Array]:
  """reg, logit and repr losses of one GD-Unit; edge weights w = E + prior, neither detached."""
  edges = out[f'edge_list_{space}']
  prior = jnp.asarray(cfg.gd_prior_homo if space == 'homo' else cfg.gd_prior_hetero, jnp.float32)
  w_logit, w_repr = cfg.w_losses_homo if space == 'homo' else cfg.w_losses_hetero
  weights = edges + prior
  reprs = _stack(out, 'repr', space)
  repr_fn = weighted_l1_distill if space == 'homo' else min_cosine_distill
  return {f'{space}_reg': gd_regulariser(edges, prior, cfg.gd_reg),
          f'{space}_logit': w_logit * weighted_l1_distill(_stack(out, 'logits', space), weights),
          f'{space}_repr': w_repr * repr_fn(reprs, weights)}
