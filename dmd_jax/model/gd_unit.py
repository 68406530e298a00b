"""GD-Unit: the dynamic distillation graph over the modalities (l, v, a) (spec §2.7).

Nodes are modalities. For every ordered pair (student j, teacher i), i != j, a linear edge scorer
reads the concatenated node embeddings [z_j, z_i]; one softmax over all six edges (scaled by
alpha) gives the normalised edge weights E. The pairwise scorer is one function `jax.vmap`-ed over
the six pairs.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax.model.layers import Linear, torch_uniform
from dmd_jax.schema import STUDENT, TEACHER   # edge x = (STUDENT[x], TEACHER[x]), reference order


def edges_to_matrix(edge_list: jax.Array) -> jax.Array:
  """(B, 6) edges in reference order -> (B, 3, 3) indexed [source (teacher), target (student)]
  in modality order (l, v, a), zero diagonal."""
  m = jnp.zeros(edge_list.shape[:-1] + (3, 3), edge_list.dtype)
  return m.at[..., TEACHER, STUDENT].set(edge_list)


class EdgeScorer(nn.Module):
  """The edge function f: a Linear (4g -> 1) on [z_student, z_teacher], applied to every pair."""

  @nn.compact
  def __call__(self, z_student: jax.Array, z_teacher: jax.Array) -> jax.Array:
    """z_*: (P, B, 2g) -> raw edge logits (P, B)."""
    fan_in = 2 * z_student.shape[-1]
    kernel = self.param('kernel', torch_uniform(fan_in), (fan_in, 1))
    bias = self.param('bias', torch_uniform(fan_in), (1,))

    def score(zs, zt):  # one (student, teacher) pair: (B, 2g), (B, 2g) -> (B,)
      return (jnp.concatenate([zs, zt], axis=-1) @ kernel + bias)[:, 0]

    return jax.vmap(score)(z_student, z_teacher)


class GDUnit(nn.Module):
  """Returns the normalised edge weights (B, 6) in reference edge order.

  Node embedding g is linear: z_m = [W_logit(logit_m), W_repr(repr_m)] (B, 2g). Nothing is
  detached here: gradients reach the scorer, the embeddings and the backbone (as in the reference).
  """
  gd_size: int
  alpha: float = 1 / 8

  @nn.compact
  def __call__(self, logits: jax.Array, reprs: jax.Array) -> jax.Array:
    """logits: (3, B, 1), reprs: (3, B, D), stacked in modality order (l, v, a)."""
    logits, reprs = logits.astype(jnp.float32), reprs.astype(jnp.float32)  # f32 under bf16
    z = jnp.concatenate([Linear(self.gd_size, name='W_logit')(logits),
                         Linear(self.gd_size, name='W_repr')(reprs)], axis=-1)
    raw = EdgeScorer(name='W_edge')(z[STUDENT], z[TEACHER])  # (6, B)
    return jax.nn.softmax(self.alpha * raw.T, axis=-1)       # (B, 6), one softmax over all edges
