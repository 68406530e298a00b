"""What the GD-Units learned: per-sample edge matrices, aggregates, history tables and figures.

Edges are the normalised weights of a GD-Unit (one softmax over the six directed edges of each
sample, so they are non-negative and sum to 1). Matrices are indexed [source, target] in modality
order (l, v, a): `m[0, 2]` is how much language teaches audio (L->A). The distillation losses
scale each edge by `edge + prior` (`prior=True` below).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from dmd_jax.config import DMDConfig

UNITS = ('homo', 'hetero')
MODALITIES = ('L', 'V', 'A')
# The six directed edges in the order the paper and the reference README list them.
EDGES = (('L', 'V'), ('L', 'A'), ('V', 'L'), ('V', 'A'), ('A', 'L'), ('A', 'V'))
EDGE_LABELS = tuple(f'{s}->{t}' for s, t in EDGES)
_SRC = np.array([MODALITIES.index(s) for s, _ in EDGES])
_TGT = np.array([MODALITIES.index(t) for _, t in EDGES])
GROUPS = {'negative': lambda y: y < 0, 'neutral': lambda y: y == 0, 'positive': lambda y: y > 0}


def edge_vector(matrices: np.ndarray) -> np.ndarray:
  """(..., 3, 3) [source, target] -> (..., 6) in EDGES order."""
  return np.asarray(matrices)[..., _SRC, _TGT]


def prior_matrix(cfg: DMDConfig, unit: str) -> np.ndarray:
  """The unit's prior as a [source, target] matrix."""
  from dmd_jax.distill import edges_to_matrix  # pylint: disable=import-outside-toplevel
  prior = cfg.gd_prior_homo if unit == 'homo' else cfg.gd_prior_hetero
  return np.asarray(edges_to_matrix(np.asarray(prior, np.float32)[None]))[0]


def batch_edges(params, batch: Mapping[str, Any], cfg: DMDConfig) -> dict[str, jax.Array]:
  """Per-sample edge matrices {'homo': (B, 3, 3), 'hetero': (B, 3, 3)} of one batch (eval mode)."""
  from dmd_jax.api import forward  # pylint: disable=import-outside-toplevel
  out = forward(params, batch, cfg, train=False)
  return {u: out[f'edges_{u}'] for u in UNITS}


def dataset_edges(params, cfg: DMDConfig, loader, steps=None) -> dict[str, np.ndarray]:
  """Per-sample edges of every sample a (non-shuffling) `Loader` yields, padding removed:
  {'homo', 'hetero': (N, 3, 3), 'index': (N,), 'label': (N,), 'pred': (N,)}."""
  from dmd_jax import train as trainer  # pylint: disable=import-outside-toplevel
  steps = steps or trainer.Steps(cfg, trainer.make_mesh())
  _, preds = trainer.evaluate(steps, steps.replicate(params), loader)
  return preds


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
      entry['prior'] = prior_matrix(cfg, u).tolist()
      entry['weighted_mean'] = (m.mean(0) + prior_matrix(cfg, u)).tolist()
    out[u] = entry
  return out


def epoch_row(stats: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, float]:
  """Flatten {unit: {'mean': (6,), 'std': (6,)}} into 'homo/L->V/mean'-style scalars."""
  return {f'{u}/{e}/{k}': float(stats[u][k][i]) for u in UNITS for k in ('mean', 'std')
          for i, e in enumerate(EDGE_LABELS)}


def vector_stats(vectors: np.ndarray) -> dict[str, np.ndarray]:
  v = np.asarray(vectors, np.float64)
  return {'mean': v.mean(0), 'std': v.std(0)}


def moment_stats(total: np.ndarray, total_sq: np.ndarray, count: int) -> dict[str, np.ndarray]:
  """Mean and std from on-device running sums (train edges)."""
  mean = np.asarray(total, np.float64) / count
  var = np.maximum(np.asarray(total_sq, np.float64) / count - mean ** 2, 0.0)
  return {'mean': mean, 'std': np.sqrt(var)}


def write_history(rows: Sequence[Mapping[str, Any]], directory: str) -> None:
  """edges_history.{csv,json}: one row per epoch, split and unit with the six means and stds."""
  if jax.process_index() != 0:
    return
  head = ['epoch', 'split', 'unit'] + [f'{e} {k}' for k in ('mean', 'std') for e in EDGE_LABELS]
  table = []
  for r in rows:
    for split in ('train', 'valid', 'test'):
      for u in UNITS:
        table.append([r['epoch'], split, u] +
                     [r['edges'][split][f'{u}/{e}/{k}'] for k in ('mean', 'std')
                      for e in EDGE_LABELS])
  _write(os.path.join(directory, 'edges_history.csv'), _csv([head] + table))
  _write(os.path.join(directory, 'edges_history.json'),
          json.dumps([{'epoch': r['epoch'], **r['edges']} for r in rows], indent=1))


def _write(path: str, text: str) -> None:
  from dmd_jax.train import write_text  # pylint: disable=import-outside-toplevel
  write_text(path, text)


def _csv(rows) -> str:
  import io  # pylint: disable=import-outside-toplevel
  buf = io.StringIO()
  csv.writer(buf).writerows(rows)
  return buf.getvalue()


def write_export(directory: str, per_sample: Mapping[str, np.ndarray], ids: Sequence[str],
                 cfg: DMDConfig, split: str) -> dict[str, str]:
  """edges_<split>.npz (per sample), edges_<split>_summary.{json,csv}, heatmaps (PNG, SVG)."""
  os.makedirs(directory, exist_ok=True)
  base = os.path.join(directory, f'edges_{split}')
  np.savez(base + '.npz.tmp.npz', homo=per_sample['homo'], hetero=per_sample['hetero'],
           index=per_sample['index'], label=per_sample['label'], pred=per_sample['pred'],
           id=np.asarray(ids, dtype=str), modalities=np.asarray(MODALITIES))
  os.replace(base + '.npz.tmp.npz', base + '.npz')
  summary = summarize(per_sample, per_sample['label'], cfg)
  _write(base + '_summary.json', json.dumps({'split': split, 'order': 'matrix[source, target], '
                                              'modalities L, V, A', **summary}, indent=1))
  rows = [['unit', 'group', 'statistic', 'source'] + [f'to {t}' for t in MODALITIES]]
  for u in UNITS:
    parts = [('all', summary[u])] + list(summary[u].get('groups', {}).items())
    for group, entry in parts:
      for stat in ('mean', 'std'):
        if stat in entry:
          rows += [[u, group, stat, s] + [f'{v:.6f}' for v in entry[stat][i]]
                   for i, s in enumerate(MODALITIES)]
    rows += [[u, 'all', 'mean+prior', s] + [f'{v:.6f}' for v in summary[u]['weighted_mean'][i]]
             for i, s in enumerate(MODALITIES)]
  _write(base + '_summary.csv', _csv(rows))
  figs = plot_heatmaps(summary, base + '_heatmap', title=f'{split}: mean edge weight')
  result = {'npz': base + '.npz', 'summary': base + '_summary.json', 'figures': figs,
            'stats': summary}
  if 'dict_homo' in per_sample:    # DHMD: the dictionary activations beside the edges
    from dmd_jax.dictionary_export import write_activations  # pylint: disable=import-outside-toplevel
    result['dictionary'] = write_activations(directory, per_sample, ids, split)
  return result


def plot_heatmaps(summary: Mapping[str, Any], path_stem: str, title: str = '') -> list[str]:
  """One labelled 3x3 heatmap per unit (rows: source, columns: target), values in the cells."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.6), constrained_layout=True)
  for ax, u in zip(axes, UNITS):
    m = np.asarray(summary[u]['mean'])
    im = ax.imshow(m, cmap='viridis', vmin=0, vmax=max(float(m.max()), 1e-6))
    ax.set_xticks(range(3), [f'to {t}' for t in MODALITIES])
    ax.set_yticks(range(3), [f'from {s}' for s in MODALITIES])
    ax.set_title(f"{'HomoGD' if u == 'homo' else 'HeteroGD'}")
    for i in range(3):
      for j in range(3):
        ax.text(j, i, '-' if i == j else f'{m[i, j]:.3f}', ha='center', va='center',
                color='white' if m[i, j] < 0.6 * m.max() else 'black')
    fig.colorbar(im, ax=ax, shrink=0.8)
  if title:
    fig.suptitle(title)
  paths = [path_stem + '.png', path_stem + '.svg']
  for p in paths:
    fig.savefig(p, dpi=120)
  plt.close(fig)
  return paths


def plot_history(rows: Sequence[Mapping[str, Any]], path_stem: str, split: str = 'train'
                 ) -> list[str]:
  """Per-epoch curves of the six edges, one panel per unit (the reference README's layout)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  epochs = [r['epoch'] for r in rows]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True, constrained_layout=True)
  for ax, u in zip(axes, UNITS):
    for e in EDGE_LABELS:
      ax.plot(epochs, [r['edges'][split][f'{u}/{e}/mean'] for r in rows], marker='o', ms=3,
              label=e)
    ax.set_title(f"{'HomoGD' if u == 'homo' else 'HeteroGD'} ({split})")
    ax.set_xlabel('epoch')
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('mean edge weight')
  axes[1].legend(loc='center left', bbox_to_anchor=(1.0, 0.5))
  paths = [path_stem + '.png', path_stem + '.svg']
  for p in paths:
    fig.savefig(p, dpi=120)
  plt.close(fig)
  return paths
