"""What the GD-Units learned: per-sample edge matrices, aggregates, history tables and figures.

Edges are the normalised weights of a GD-Unit (one softmax over the six directed edges of each
sample, so they are non-negative and sum to 1). Matrices are indexed [source, target] in modality
order (l, v, a): `m[0, 2]` is how much language teaches audio (L->A). The distillation losses
scale each edge by `edge + prior` (`weighted_mean` in the summary).
"""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any, Mapping, Sequence

import numpy as np
import matplotlib
from matplotlib.figure import Figure

from dmd_jax import fileio
from dmd_jax.analysis.dictionary import write_activations
from dmd_jax.config import DMDConfig
from dmd_jax.schema import (DISPLAY_EDGE_NAMES, DISPLAY_ORDER, MODALITIES, STUDENT, TEACHER,
                            UNITS)

LABELS = tuple(m.upper() for m in MODALITIES)      # L, V, A
EDGE_LABELS = DISPLAY_EDGE_NAMES                   # L->V, L->A, V->L, V->A, A->L, A->V
_SRC, _TGT = TEACHER[DISPLAY_ORDER], STUDENT[DISPLAY_ORDER]
GROUPS = {'negative': lambda y: y < 0, 'neutral': lambda y: y == 0, 'positive': lambda y: y > 0}


def edge_vector(matrices: np.ndarray) -> np.ndarray:
  """(..., 3, 3) [source, target] -> (..., 6) in display order (EDGE_LABELS)."""
  return np.asarray(matrices)[..., _SRC, _TGT]


def prior_matrix(cfg: DMDConfig, unit: str) -> np.ndarray:
  """The unit's prior (six edges in the reference's order) as a [source, target] matrix, zero
  diagonal: the layout of the model's edge matrices (`model.gd_unit.edges_to_matrix`)."""
  m = np.zeros((3, 3), np.float32)
  m[TEACHER, STUDENT] = cfg.gd_prior_homo if unit == 'homo' else cfg.gd_prior_hetero
  return m


def summarize(per_sample: Mapping[str, np.ndarray], labels: np.ndarray | None = None,
              cfg: DMDConfig | None = None) -> dict[str, Any]:
  """Mean and std over samples of each unit's 3x3 matrix; per sentiment group when `labels` are
  given; with `cfg`, also the prior-augmented weights (edge + prior) that scale the losses."""
  out = {}
  for u in UNITS:
    m = np.asarray(per_sample[u], np.float64)
    entry = {'mean': m.mean(0).tolist(), 'std': m.std(0).tolist(), 'count': int(len(m))}
    if labels is not None:
      y = np.asarray(labels).reshape(-1)
      entry['groups'] = {g: ({'mean': m[f(y)].mean(0).tolist(), 'std': m[f(y)].std(0).tolist(),
                              'count': int(f(y).sum())} if f(y).any() else {'count': 0})
                         for g, f in GROUPS.items()}
    if cfg is not None:
      prior = prior_matrix(cfg, u)
      entry['prior'] = prior.tolist()
      entry['weighted_mean'] = (m.mean(0) + prior).tolist()
    out[u] = entry
  return out


def epoch_row(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Flatten {unit: {'mean': (6,), 'std': (6,)}} into 'homo/L->V/mean'-style scalars."""
  return {f'{u}/{e}/{k}': float(stats[u][k][i]) for u in UNITS for k in ('mean', 'std')
          for i, e in enumerate(EDGE_LABELS)}


def vector_stats(vectors: np.ndarray) -> dict[str, np.ndarray]:
  v = np.asarray(vectors, np.float64)
  return {'mean': v.mean(0), 'std': v.std(0)}


def moment_stats(total: np.ndarray, m2_within: np.ndarray, batch_sums_sq: np.ndarray,
                 batch_size: int, batches: int) -> dict[str, np.ndarray]:
  """Mean and std over every sample of equal-sized batches from per-batch moments (train edges):
  `total` = sum of the batch sums S_i, `m2_within` = sum of each batch's squared deviations from
  its own mean, `batch_sums_sq` = sum of S_i^2. The between-batch part is formed in float64."""
  n = batch_size * batches
  total = np.asarray(total, np.float64)
  m2 = (np.asarray(m2_within, np.float64) + np.asarray(batch_sums_sq, np.float64) / batch_size
        - total ** 2 / n)
  return {'mean': total / n, 'std': np.sqrt(np.maximum(m2, 0.0) / n)}


def write_history(rows: Sequence[Mapping[str, Any]], directory: str) -> None:
  """edges_history.{csv,json}: one row per epoch, split and unit with the six means and stds."""
  head = ['epoch', 'split', 'unit'] + [f'{e} {k}' for k in ('mean', 'std') for e in EDGE_LABELS]
  table = []
  for r in rows:
    for split in ('train', 'valid', 'test'):
      for u in UNITS:
        table.append([r['epoch'], split, u] +
                     [r['edges'][split][f'{u}/{e}/{k}'] for k in ('mean', 'std')
                      for e in EDGE_LABELS])
  fileio.atomic_write(os.path.join(directory, 'edges_history.csv'), _csv([head] + table))
  fileio.atomic_write(os.path.join(directory, 'edges_history.json'),
                      json.dumps([{'epoch': r['epoch'], **r['edges']} for r in rows], indent=1))


def _csv(rows) -> str:
  buf = io.StringIO()
  csv.writer(buf).writerows(rows)
  return buf.getvalue()


def write_export(directory: str, per_sample: Mapping[str, np.ndarray], ids: Sequence[str],
                 cfg: DMDConfig, split: str, figures: bool = True, title: str = ''
                 ) -> dict[str, str]:
  """edges_<split>.npz (per sample), edges_<split>_summary.{json,csv}, heatmaps (PNG, SVG)
  unless figures=False, titled `title` (say whose parameters: seed, epoch)."""
  base = os.path.join(directory, f'edges_{split}')
  fileio.savez(base + '.npz', homo=per_sample['homo'], hetero=per_sample['hetero'],
               index=per_sample['index'], label=per_sample['label'], pred=per_sample['pred'],
               id=np.asarray(ids, dtype=str), modalities=np.asarray(LABELS))
  summary = summarize(per_sample, per_sample['label'], cfg)
  fileio.atomic_write(base + '_summary.json', json.dumps(
      {'split': split, 'order': 'matrix[source, target], modalities L, V, A', **summary},
      indent=1))
  rows = [['unit', 'group', 'statistic', 'source'] + [f'to {t}' for t in LABELS]]
  for u in UNITS:
    parts = [('all', summary[u])] + list(summary[u].get('groups', {}).items())
    for group, entry in parts:
      for stat in ('mean', 'std'):
        if stat in entry:
          rows += [[u, group, stat, s] + [f'{v:.6f}' for v in entry[stat][i]]
                   for i, s in enumerate(LABELS)]
    rows += [[u, 'all', 'mean+prior', s] + [f'{v:.6f}' for v in summary[u]['weighted_mean'][i]]
             for i, s in enumerate(LABELS)]
  fileio.atomic_write(base + '_summary.csv', _csv(rows))
  figs = (plot_heatmaps(summary, base + '_heatmap', title=f'{split} split, mean over '
                        f"{len(ids)} samples{': ' + title if title else ''}")
          if figures else [])
  result = {'npz': base + '.npz', 'summary': base + '_summary.json', 'figures': figs,
            'stats': summary}
  if 'dict_homo' in per_sample:    # DHMD: the dictionary activations beside the edges
    result['dictionary'] = write_activations(directory, per_sample, ids, split)
  return result


def heatmap_figure(summary: Mapping[str, Any], title: str = '') -> Figure:
  """One labelled 3x3 heatmap per unit (rows: source, columns: target), values in the cells. The
  diagonal (no edge) is masked, and each unit's colours span its own off-diagonal values: a
  unit's edges sit close together (HomoGD's near 1/6), and a scale from 0 would draw them as
  one colour."""
  fig = Figure(figsize=(8.4, 3.6), layout='constrained')
  off = ~np.eye(3, dtype=bool)
  for ax, u in zip(fig.subplots(1, 2), UNITS):
    m = np.asarray(summary[u]['mean'], np.float64)
    lo, hi = float(m[off].min()), float(m[off].max())
    if hi - lo < 1e-9:
      lo, hi = lo - 1e-3, hi + 1e-3
    cmap = matplotlib.colormaps['viridis'].with_extremes(bad='0.85')
    im = ax.imshow(np.ma.masked_array(m, ~off), cmap=cmap, vmin=lo, vmax=hi)
    ax.set_xticks(range(3), [f'to {t}' for t in LABELS])
    ax.set_yticks(range(3), [f'from {s}' for s in LABELS])
    ax.set_title(f"{'HomoGD' if u == 'homo' else 'HeteroGD'}")
    for i in range(3):
      for j in range(3):
        ax.text(j, i, 'no edge' if i == j else f'{m[i, j]:.3f}', ha='center', va='center',
                color='black' if i == j or m[i, j] > lo + 0.6 * (hi - lo) else 'white')
    fig.colorbar(im, ax=ax, shrink=0.8, label='mean edge weight')
  if title:
    fig.suptitle(title)
  return fig


def plot_heatmaps(summary: Mapping[str, Any], path_stem: str, title: str = '') -> list[str]:
  """`heatmap_figure` as PNG and SVG."""
  fig = heatmap_figure(summary, title)
  return [fileio.savefig(fig, path_stem + ext, dpi=120) for ext in ('.png', '.svg')]


def plot_history(rows: Sequence[Mapping[str, Any]], path_stem: str, split: str = 'train',
                 best_epoch: int | None = None, seed: int | None = None) -> list[str]:
  """Per-epoch curves of the six edges, one panel per unit (the reference README's layout), each
  on its own y-range (HomoGD's edges move in the third decimal), the best epoch marked."""
  epochs = [r['epoch'] for r in rows]
  fig = Figure(figsize=(10, 3.8), layout='constrained')
  axes = fig.subplots(1, 2)
  for ax, u in zip(axes, UNITS):
    for e in EDGE_LABELS:
      ax.plot(epochs, [r['edges'][split][f'{u}/{e}/mean'] for r in rows], marker='o', ms=3,
              label=e)
    if best_epoch:
      ax.axvline(best_epoch, color='0.4', ls='--', lw=1, label=f'best epoch ({best_epoch})')
    ax.set_title(f"{'HomoGD' if u == 'homo' else 'HeteroGD'} ({split})")
    ax.set_xlabel('epoch')
    ax.set_ylabel('mean edge weight')
    ax.grid(alpha=0.3)
  axes[1].legend(loc='center left', bbox_to_anchor=(1.0, 0.5))
  if seed is not None:
    fig.suptitle(f'seed {seed}: edges per epoch ({split} split)')
  return [fileio.savefig(fig, path_stem + ext, dpi=120) for ext in ('.png', '.svg')]
