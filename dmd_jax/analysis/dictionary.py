"""DHMD dictionary activations for analysis: per sample, per modality, the most used atoms.

Activations a_m are points on the simplex over the K atoms of a space's dictionary (sparse with
sparsemax). Written beside the edge export:
  dictionary_<split>.npz           homo, hetero (N, 3, K) in modality order (l, v, a); index, id
  dictionary_<split>_summary.json  per space and modality: mean activation (K,), mean number of
                                   active atoms, the top atoms with their mean activation
  dictionary_<split>.png / .svg    per space, mean activation of the most used atoms per modality
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from dmd_jax import fileio
from dmd_jax.schema import MODALITIES, UNITS as SPACES

LABELS = tuple(m.upper() for m in MODALITIES)      # L, V, A


def summarize_activations(acts: np.ndarray, top: int = 10) -> dict[str, Any]:
  """acts (N, 3, K) -> {'mean': (3, K), 'active': (3,) mean count of atoms > 0,
  'top': per modality [(atom, mean activation), ...] by decreasing mean}."""
  acts = np.asarray(acts, np.float64)
  if acts.ndim != 3 or acts.shape[1] != 3:
    raise ValueError(f'activations must be (N, 3, K), got shape {acts.shape}')
  mean = acts.mean(axis=0)                                        # (3, K)
  order = np.argsort(-mean, axis=1, kind='stable')[:, :top]
  return {'mean': mean, 'active': (acts > 0).sum(axis=2).mean(axis=0),
          'top': [[(int(k), float(mean[m, k])) for k in order[m]] for m in range(3)]}


def write_activations(directory: str, per_sample: Mapping[str, np.ndarray], ids: Sequence[str],
                      split: str, top: int = 10) -> dict[str, Any]:
  base = os.path.join(directory, f'dictionary_{split}')
  fileio.savez(base + '.npz', homo=per_sample['dict_homo'], hetero=per_sample['dict_hetero'],
           index=per_sample['index'], id=np.asarray(ids, dtype=str),
           modalities=np.asarray(LABELS))
  stats = {s: summarize_activations(per_sample[f'dict_{s}'], top) for s in SPACES}
  doc = {'split': split, 'samples': int(len(per_sample['index'])),
         'atoms': int(per_sample['dict_homo'].shape[-1]), 'modalities': list(LABELS)}
  for s in SPACES:
    doc[s] = {m: {'mean_activation': stats[s]['mean'][i].round(6).tolist(),
                  'active_atoms': float(stats[s]['active'][i]),
                  'top_atoms': [{'atom': k, 'mean': round(v, 6)} for k, v in stats[s]['top'][i]]}
              for i, m in enumerate(LABELS)}
  fileio.atomic_write(base + '_summary.json', json.dumps(doc, indent=1))
  figs = plot_activations(stats, base, title=f'{split}: mean dictionary activation')
  return {'npz': base + '.npz', 'summary': base + '_summary.json', 'figures': figs,
          'stats': stats}


def plot_activations(stats: Mapping[str, Any], path_stem: str, title: str = '',
                     atoms: int = 32) -> list[str]:
  """Per space, a (3 x atoms) heatmap of the mean activation of the atoms most used overall."""
  fig = Figure(figsize=(10, 4.2), layout='constrained')
  for ax, s in zip(fig.subplots(2, 1), SPACES):
    mean = stats[s]['mean']
    cols = np.argsort(-mean.sum(axis=0), kind='stable')[:atoms]
    im = ax.imshow(mean[:, cols], aspect='auto', cmap='viridis')
    ax.set_yticks(range(3), LABELS)
    ax.set_xticks(range(len(cols)), [str(c) for c in cols], fontsize=6, rotation=90)
    ax.set_title(f"{'homogeneous' if s == 'homo' else 'heterogeneous'} space: top {len(cols)} "
                 f'atoms (index)', fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.02)
  if title:
    fig.suptitle(title, fontsize=10)
  return [fileio.savefig(fig, f'{path_stem}.{ext}') for ext in ('png', 'svg')]
