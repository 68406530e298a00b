"""DHMD's fine-grained distillation: a modality-shared dictionary per decoupled space.

Design from `shared/spec/DHMD.md` (the paper's code is not public; every inferred choice is a
switch in `DictionaryConfig`):
  - atoms D (K, w) shared by l, v, a; one query network per modality, applied per time step:
    LayerNorm -> Dense(w) -> GELU -> LayerNorm -> Dense(w);
  - scores q_t . D_k / sqrt(w) / tau, pooled over time (max or mean), then sparsemax (or softmax):
    activations a_m on the simplex of K atoms; embedding e_m = a_m D, L2-normalised;
  - a matching loss across modalities: `label_hinge`, `infonce` or `edge_kl`.

Everything is vectorised over samples, modalities and modality pairs.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.config import DictionaryConfig
from dmd_jax.distill import STUDENT, TEACHER
from dmd_jax.layers import LayerNorm
from dmd_jax.losses import label_hinge_rows

def temperature(cfg: DictionaryConfig, step=None) -> jax.Array:
  """tau at micro-step `step`: fixed, or linear from `temperature` to `temperature_end` over
  `anneal_steps` micro-steps and constant after (fixed when no step is given, e.g. in eval: the
  end value if annealing is configured)."""
  if not cfg.annealed:
    return jnp.float32(cfg.temperature)
  if step is None:
    return jnp.float32(cfg.temperature_end)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / cfg.anneal_steps, 0.0, 1.0)
  return jnp.float32(cfg.temperature) + frac * jnp.float32(cfg.temperature_end - cfg.temperature)


# ---- sparsemax ----------------------------------------------------------------------------------

@jax.custom_jvp
def sparsemax(z: jax.Array) -> jax.Array:
  """Euclidean projection of each row of z (..., K) onto the probability simplex (Martins &
  Astudillo, 2016): p = max(z - tau(z), 0), with tau chosen so that p sums to 1."""
  z = z - jnp.max(z, axis=-1, keepdims=True)        # shift-invariant; keeps the cumsum small
  z_sorted = -jnp.sort(-z, axis=-1)
  k = jnp.arange(1, z.shape[-1] + 1, dtype=z.dtype)
  cumsum = jnp.cumsum(z_sorted, axis=-1)
  in_support = 1 + k * z_sorted > cumsum
  k_z = jnp.sum(in_support, axis=-1, keepdims=True)          # support size (>= 1)
  tau = (jnp.take_along_axis(cumsum, k_z.astype(jnp.int32) - 1, axis=-1) - 1) / k_z
  return jnp.maximum(z - tau, 0.0)


@sparsemax.defjvp
def _sparsemax_jvp(primals, tangents):
  (z,), (dz,) = primals, tangents
  p = sparsemax(z)
  support = (p > 0).astype(z.dtype)
  # Jacobian diag(s) - s s^T / |s| applied to dz.
  mean_dz = jnp.sum(support * dz, axis=-1, keepdims=True) / jnp.sum(support, axis=-1,
                                                                    keepdims=True)
  return p, support * (dz - mean_dz)


def activate(scores: jax.Array, kind: str) -> jax.Array:
  if kind == 'sparsemax':
    return sparsemax(scores)
  return jax.nn.softmax(scores, axis=-1)


# ---- the dictionary ------------------------------------------------------------------------------

class QueryNet(nn.Module):
  """LayerNorm -> Dense(w) -> GELU -> LayerNorm -> Dense(w), per time step."""
  width: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.width, name='dense_0')(LayerNorm(name='norm_0')(x))
    x = jax.nn.gelu(x, approximate=False)
    return nn.Dense(self.width, name='dense_1')(LayerNorm(name='norm_1')(x))


class Dictionary(nn.Module):
  """Atoms shared by the three modalities of one space, with per-modality query networks.

  Returns (activations (B, 3, K), embeddings (B, 3, w)) in modality order (l, v, a).
  """
  config: DictionaryConfig
  width: int

  @nn.compact
  def __call__(self, seqs: Sequence[jax.Array], step=None) -> tuple[jax.Array, jax.Array]:
    cfg, w = self.config, self.width
    atoms = self.param('atoms', nn.initializers.normal(stddev=w ** -0.5), (cfg.num_atoms, w))
    if cfg.loss == 'infonce':   # CLIP's learnable logit scale, ln(1 / 0.07)
      self.param('logit_scale', nn.initializers.constant(math.log(1 / 0.07)), ())
    tau = temperature(cfg, step)
    acts = []
    for m, x in zip('lva', seqs):                          # x: (B, T_m, w)
      if x.shape[-1] != w:
        raise ValueError(f'dictionary input for modality {m!r} has width {x.shape[-1]}, '
                         f'expected {w}')
      if cfg.stop_gradient:
        x = jax.lax.stop_gradient(x)
      q = QueryNet(w, name=f'query_{m}')(x)
      scores = jnp.einsum('btw,kw->btk', q, atoms.astype(q.dtype)) / (math.sqrt(w) * tau)
      pooled = jnp.max(scores, axis=1) if cfg.pool == 'max' else jnp.mean(scores, axis=1)
      acts.append(activate(pooled.astype(jnp.float32), cfg.activation))
    a = jnp.stack(acts, axis=1)                                        # (B, 3, K)
    e = jnp.einsum('bmk,kw->bmw', a, atoms.astype(jnp.float32))
    e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    return a, e


# ---- matching losses -----------------------------------------------------------------------------

# The three unordered modality pairs (l, v), (l, a), (v, a) as node indices.
PAIR_A = np.array([0, 0, 1])
PAIR_B = np.array([1, 2, 2])


def label_margin(feats: jax.Array, labels: jax.Array, margin_scale: float) -> jax.Array:
  """DMD's label-aware hinge (losses.margin_loss) on stacked features (B, 3, F)."""
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
