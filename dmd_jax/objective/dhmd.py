"""DHMD's dictionary matching losses (shared/spec/DHMD.md), one per decoupled space: how the
three modalities' dictionary embeddings or activations must agree. Vectorised over samples and
modality pairs.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.config import DMDConfig
from dmd_jax.objective.dmd import label_hinge_rows
from dmd_jax.schema import STUDENT, TEACHER, UNITS

# The three unordered modality pairs (l, v), (l, a), (v, a) as node indices.
PAIR_A = np.array([0, 0, 1])
PAIR_B = np.array([1, 2, 2])


def label_margin(feats: jax.Array, labels: jax.Array, margin_scale: float) -> jax.Array:
  """DMD's label-aware hinge (objective.dmd.margin_loss) on stacked features (B, 3, F)."""
  return label_hinge_rows(feats.reshape(-1, feats.shape[-1]), jnp.repeat(labels.reshape(-1), 3),
                          margin_scale)


def infonce(emb: jax.Array, log_scale: jax.Array) -> jax.Array:
  """Symmetric InfoNCE between the modalities of each pair: the same sample is the positive,
  the batch's other samples the negatives; mean over the 3 pairs and both directions.
  emb: (B, 3, w) L2-normalised; scale = exp(log_scale) capped at 100."""
  scale = jnp.minimum(jnp.exp(log_scale), 100.0)
  x, y = emb[:, PAIR_A].transpose(1, 0, 2), emb[:, PAIR_B].transpose(1, 0, 2)   # (3, B, w)
  logits = scale * jnp.einsum('pbw,pcw->pbc', x, y)                              # (3, B, B)
  idx = jnp.arange(emb.shape[0])
  ce_rows = -jnp.mean(jax.nn.log_softmax(logits, axis=2)[:, idx, idx], axis=1)
  ce_cols = -jnp.mean(jax.nn.log_softmax(logits, axis=1)[:, idx, idx], axis=1)
  return jnp.mean((ce_rows + ce_cols) / 2)


def edge_kl(acts: jax.Array, edges: jax.Array, eps: float = 1e-6) -> jax.Array:
  """sum_x mean_b E[b, x] KL(sg(a_teacher) || a_student) over the six GD edges x
  (student S_x, teacher T_x). acts: (B, 3, K); edges: (B, 6). Activations are smoothed,
  (a + eps) / (1 + K eps), so sparsemax's exact zeros give a finite KL."""
  k = acts.shape[-1]
  smooth = (acts + eps) / (1 + k * eps)
  student, teacher = smooth[:, STUDENT], jax.lax.stop_gradient(smooth[:, TEACHER])  # (B, 6, K)
  kl = jnp.sum(teacher * (jnp.log(teacher) - jnp.log(student)), axis=-1)           # (B, 6)
  return jnp.sum(jnp.mean(edges * kl, axis=0))


def matching_losses(out: Mapping[str, jax.Array], labels: jax.Array, cfg: DMDConfig) -> dict[str, jax.Array]:
  """DHMD's dictionary matching loss of each space (`homo_match`, `hetero_match`)."""
  kind, terms = cfg.dictionary.loss, {}
  for space in UNITS:
    if kind == 'label_hinge':
      loss = label_margin(out[f'dict_emb_{space}'], labels, cfg.margin_scale)
    elif kind == 'infonce':
      loss = infonce(out[f'dict_emb_{space}'], out[f'dict_logit_scale_{space}'])
    else:
      loss = edge_kl(out[f'dict_act_{space}'], out[f'edge_list_{space}'], cfg.dictionary.kl_eps)
    terms[f'{space}_match'] = loss
  return terms
