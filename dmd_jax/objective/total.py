"""The DMD objective as one number: every term (dmd_jax.objective.dmd, and DHMD's matching
losses) weighted as the reference trainer adds them (spec §3.7), and `compute_loss`, which runs
the network on a batch and returns the total with every term and output."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from dmd_jax.config import DMDConfig
from dmd_jax.model.batch import check_batch
from dmd_jax.model import forward
from dmd_jax.objective.dhmd import matching_losses
from dmd_jax.objective.dmd import (cycle_loss, gd_losses, margin_loss, orthogonality_loss,
                                   reconstruction_loss, task_loss)
from dmd_jax.schema import UNITS

PyTree = Any


# The weights of the total that a hyper-parameter sweep may vary per member (traced values, so
# that members share one compiled step); the rest stay static fields of DMDConfig.
LOSS_WEIGHTS = ('gd_weight', 'decouple_weight', 'margin_ort_weight')


def loss_weights(cfg: DMDConfig, overrides: Optional[Mapping[str, Any]] = None) -> dict:
  """The LOSS_WEIGHTS of `cfg`, with any given in `overrides` (numbers or arrays) in their place."""
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(LOSS_WEIGHTS))
  if unknown:
    raise ValueError(f'unknown loss weight(s) {unknown}; sweepable: {list(LOSS_WEIGHTS)}')
  return {k: overrides.get(k, getattr(cfg, k)) for k in LOSS_WEIGHTS}


def dmd_losses(out: Mapping[str, jax.Array], labels: jax.Array, cfg: DMDConfig,
               weights: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
  """Every term of the objective, and `total` (spec §3.7). `homo_repr` is computed but, as in
  the reference, not part of the total. DHMD adds `homo_match` and `hetero_match`, each weighted
  by `cfg.dictionary.weight`. `weights` overrides LOSS_WEIGHTS of `cfg` (a sweep member's)."""
  w = loss_weights(cfg, weights)
  labels = labels.reshape(-1, 1).astype(jnp.float32)
  terms = {'task': task_loss(out, labels), 'recon': reconstruction_loss(out),
           'cycle': cycle_loss(out), 'ort': orthogonality_loss(out),
           'margin': margin_loss(out, labels, cfg.margin_scale)}
  for space in UNITS:
    terms.update(gd_losses(out, space, cfg))
  if cfg.dhmd:
    terms.update(matching_losses(out, labels, cfg))
  terms['total'] = (
      terms['task']
      + w['gd_weight'] * (terms['homo_logit'] + terms['homo_reg'])
      + w['gd_weight'] * (terms['hetero_logit'] + terms['hetero_repr'] + terms['hetero_reg'])
      + w['decouple_weight'] * (terms['cycle'] + terms['recon']
                                + w['margin_ort_weight'] * (terms['margin'] + terms['ort'])))
  if cfg.dhmd:
    terms['total'] = terms['total'] + cfg.dictionary.weight * (terms['homo_match']
                                                               + terms['hetero_match'])
  return terms


def compute_loss(params: PyTree, batch: Mapping[str, jax.Array], config: DMDConfig, *,
                 rng: Optional[jax.Array] = None, train: bool = False,
                 step: Optional[jax.Array] = None,
                 weights: Optional[Mapping[str, Any]] = None) -> tuple[jax.Array, dict[str, Any]]:
  """The DMD objective on one batch (`weights`: see `dmd_losses`).

  Returns:
    (total, aux) with aux = {'losses': every named term (task, recon, cycle, ort, margin,
    homo_reg, homo_logit, homo_repr, hetero_reg, hetero_logit, hetero_repr, total),
    'outputs': every forward output under the reference's names, including `edges_homo` and
    `edges_hetero` (B, 3, 3) indexed [source, target] in (l, v, a) order}.
  """
  check_batch(batch)
  out = forward(params, batch, config, rng=rng, train=train, step=step)
  terms = dmd_losses(out, batch['labels'], config, weights)
  return terms['total'], {'losses': terms, 'outputs': out}
