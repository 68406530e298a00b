"""DHMD's fine-grained distillation: a modality-shared dictionary per decoupled space.

Design from `shared/spec/DHMD.md` (the paper's code is not public; every inferred choice is a
switch in `DictionaryConfig`):
  - atoms D (K, w) shared by l, v, a; one query network per modality, applied per time step:
    LayerNorm -> Dense(w) -> GELU -> LayerNorm -> Dense(w);
  - scores q_t . D_k / sqrt(w) / tau, pooled over time (max or mean), then sparsemax (or softmax):
    activations a_m on the simplex of K atoms; embedding e_m = a_m D, L2-normalised;
  - a matching loss across modalities: `label_hinge`, `infonce` or `edge_kl`.

Everything is vectorised over samples and modalities. The matching losses are in
dmd_jax.objective.dhmd.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax.projections import projection_simplex

from dmd_jax.config import DictionaryConfig
from dmd_jax.model.layers import LayerNorm
from dmd_jax.schema import MODALITIES

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


def sparsemax(z: jax.Array) -> jax.Array:
  """Euclidean projection of each row of z (..., K) onto the probability simplex (Martins &
  Astudillo, 2016): sparse probabilities, optax's simplex projection per row."""
  rows = z.reshape(-1, z.shape[-1])
  return jax.vmap(projection_simplex)(rows).reshape(z.shape)


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
    for m, x in zip(MODALITIES, seqs):                          # x: (B, T_m, w)
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
