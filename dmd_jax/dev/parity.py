"""The reference's parity fixtures (`shared/parity/<variant>/`) and how far a compute dtype
drifts from them.

A fixture folder holds the reference's weights (`dmd.npz`, `homo_gd.npz`, `hetero_gd.npz`), its
text-encoder config (`bert/config.json`), the variant (`variant.json`), inputs (`batch<i>.npz`)
and what the PyTorch code computed from them (`outputs.npz`, `losses.json`, ...).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np

from dmd_jax.config import BertConfig, reference_config
from dmd_jax.objective import compute_loss
from dmd_jax.training.checkpoints import import_reference

FIXTURES = ('mosi_aligned_small', 'mosei_unaligned_small')


def fixture_config(path: str):
  """The `DMDConfig` a fixture was computed with (dropout off: the reference ran in eval mode)."""
  variant_file = os.path.join(path, 'variant.json')
  if not os.path.isfile(variant_file):
    raise FileNotFoundError(f'not a parity fixture folder (no variant.json): {path}')
  with open(variant_file) as f:
    v = json.load(f)
  bert = BertConfig.from_json_file(os.path.join(path, 'bert', 'config.json'))
  try:
    return reference_config(
        v['dataset'], v['aligned'], bert=bert, d=v['dst_feature_dim'], num_heads=v['nheads'],
        nlevels=v['nlevels'], attn_mask=v['attn_mask'],
        kernel_sizes=tuple(v['conv1d_kernel_sizes_lav']), feature_dims=tuple(v['feature_dims']),
        seq_lens=tuple(v['seq_lens_tav'])).without_dropout()
  except KeyError as e:
    raise KeyError(f'{variant_file} lacks key {e}') from e


def _npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def drift(path: str, compute_dtype: str = 'bfloat16') -> dict[str, Any]:
  """Forward outputs and loss terms of the fixture's batch 0 under `compute_dtype`, compared with
  the reference's float32 results.

  Returns {'outputs': {name: max |ours - ref| / max |ref|}, 'losses': {name: |ours - ref| /
  max(|ref|, 1e-6)}} for every output and loss term the reference recorded.
  """
  cfg = fixture_config(path).replace(compute_dtype=compute_dtype)
  params = import_reference(cfg, *(os.path.join(path, f) for f in
                                   ('dmd.npz', 'homo_gd.npz', 'hetero_gd.npz')))
  batch = {k: jax.numpy.asarray(v) for k, v in _npz(os.path.join(path, 'batch0.npz')).items()}
  _, aux = jax.jit(functools.partial(compute_loss, config=cfg))(params, batch)
  aux = jax.device_get(aux)
  ref_out = _npz(os.path.join(path, 'outputs.npz'))
  with open(os.path.join(path, 'losses.json')) as f:
    ref_loss = json.load(f)
  outputs = {}
  for k, want in ref_out.items():
    got = aux['outputs'].get(k)
    if got is None:
      continue
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-12)
    outputs[k] = float(np.abs(np.asarray(got, np.float64) - want).max() / scale)
  losses = {k: float(abs(float(aux['losses'][k]) - v) / max(abs(v), 1e-6))
            for k, v in ref_loss.items()}
  return {'outputs': outputs, 'losses': losses}
