"""Batches in the MMSA layout the model reads (dmd_jax.schema.BATCH_KEYS): zeros for shape
inference, random ones for tests and benchmarks, and the check a batch must pass."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.config import DMDConfig
from dmd_jax.schema import BATCH_KEYS

Batch = Mapping[str, jax.Array]


def dummy_batch(config: DMDConfig, batch_size: int = 2) -> dict[str, jax.Array]:
  """Zeros in the MMSA layout, e.g. for initialisation or shape inference."""
  t, a, v = config.seq_lens
  _, da, dv = config.feature_dims
  return {'text': jnp.zeros((batch_size, 3, t), jnp.float32),
          'audio': jnp.zeros((batch_size, a, da), jnp.float32),
          'vision': jnp.zeros((batch_size, v, dv), jnp.float32),
          'labels': jnp.zeros((batch_size, 1), jnp.float32)}


def random_batch(cfg, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
  """Random inputs in the MMSA layout: real-looking token ids and masks, Gaussian features with
  zero-padded tails, labels on MOSEI's 1/3 grid."""
  rs = np.random.default_rng(seed)
  t, a, v = cfg.seq_lens
  _, da, dv = cfg.feature_dims
  n_tok = rs.integers(5, t + 1, batch_size)
  mask = (np.arange(t)[None] < n_tok[:, None]).astype(np.float32)
  vocab = cfg.bert.vocab_size     # ids above the special tokens (1000+ in bert-base)
  ids = rs.integers(min(1000, vocab // 2), min(vocab, 30000), (batch_size, t)) * mask
  text = np.stack([ids, mask, np.zeros_like(mask)], axis=1).astype(np.float32)

  def feats(length, dim):
    x = rs.normal(size=(batch_size, length, dim)).astype(np.float32)
    keep = rs.integers(length // 2, length + 1, batch_size)
    return x * (np.arange(length)[None, :, None] < keep[:, None, None])

  labels = np.round(rs.uniform(-3, 3, (batch_size, 1)) * 3) / 3
  return {'text': jnp.asarray(text), 'audio': jnp.asarray(feats(a, da)),
          'vision': jnp.asarray(feats(v, dv)), 'labels': jnp.asarray(labels, jnp.float32)}


def check_batch(batch: Batch) -> None:
  """A batch has every key the model and objective read, and labels (B,) or (B, 1)."""
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f'batch lacks key(s) {missing}; a batch needs {list(BATCH_KEYS)} '
                   f'(got {sorted(batch)})')
  n = batch['text'].shape[0]
  labels = batch['labels']
  if labels.shape not in ((n,), (n, 1)):
    raise ValueError(f"batch 'labels' has shape {tuple(labels.shape)}, expected ({n},) or ({n}, 1)")
