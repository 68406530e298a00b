"""A run's data: the prepared dataset its config names (a synthetic config's is made first by the
command, `prepare_synthetic`), the loaders over it (a training loader per seed, the evaluation
loaders), and the constant-prediction baseline every results table reports.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np

from dmd_jax import schema
from dmd_jax.data import builder, synthetic
from dmd_jax.data.pipeline import Loader, is_prepared, open_dataset


@dataclasses.dataclass(frozen=True)
class Data:
  """A run's prepared dataset: where it is, its splits' sources, a training loader per seed of
  the run (its own shuffling per epoch) and the evaluation loaders (every sample of a split once,
  in file order). Loaders hold no position (an epoch's batches are a function of the seed and
  the epoch), so the runs of a config and their evaluations share one `Data`."""
  path: str
  sources: Mapping[str, Any]
  train: Mapping[int, Loader]
  valid: Loader
  test: Loader

  def ids(self, split: str, index: np.ndarray) -> list[str]:
    """The sample ids ('video$_$clip') of rows `index` of `split`."""
    source = self.sources[split]
    return [source[int(i)]['id'].decode() for i in index]

  def eval_loader(self, split: str) -> Loader:
    """Every sample of `split` once, in file order ('train' too)."""
    return Loader(self.sources[split], self.valid.global_batch_size, train=False)


def open_data(run) -> Data:
  """The run's prepared dataset (`run.data_dir`, `run.dataset`, `run.aligned`) and its loaders
  at the run's global batch size, else a named error with the command that prepares it."""
  try:
    path, sources = open_dataset(run.data_dir, run.dataset, run.aligned)
  except FileNotFoundError as e:
    if run.get('synthetic'):
      raise FileNotFoundError(
          f'no prepared synthetic {run.dataset} dataset at '
          f'{schema.dataset_path(run.data_dir, run.dataset, run.aligned)}: `python -m '
          'dmd_jax.main` makes it for this config (training.inputs.prepare_synthetic(run) from '
          'Python)') from None
    raise FileNotFoundError(f'{e}, or point --config.data_dir at the data dir that holds it'
                            ) from None
  size = run.batch_size
  return Data(path, sources,
              train={s: Loader(sources['train'], size, train=True, seed=s) for s in run.seeds},
              valid=Loader(sources['valid'], size, train=False),
              test=Loader(sources['test'], size, train=False))


def prepare_synthetic(run) -> None:
  """For a config with `synthetic` set (configs/smoke.py, configs/demo.py): its synthetic MMSA
  pickle generated and prepared in `run.data_dir`, unless there already; by process 0. The
  command does this before a run; the library's runs read a prepared dataset (`open_data`)."""
  syn = run.get('synthetic')
  path = schema.dataset_path(run.data_dir, run.dataset, run.aligned)
  if not syn or is_prepared(path) or jax.process_index() != 0:
    return
  pkl = os.path.join(os.path.expanduser(run.data_dir), 'synthetic',
                     f"{schema.setting_name(run.dataset, run.aligned)}.pkl")
  if not os.path.exists(pkl):
    synthetic.write_pickle(synthetic.generate(
        run.dataset, run.aligned, tuple(syn.sizes), seed=syn.seed,
        weights=tuple(syn.weights), text_features=False), pkl)
  try:
    builder.prepare(pkl, run.dataset, run.aligned, run.data_dir, check_sha256=False)
  except FileExistsError:   # prepared by another run while this one waited for it
    if not is_prepared(path):
      raise


def _labels(source) -> np.ndarray:
  out = []
  for s in range(0, len(source), 256):
    out += [r['label'] for r in source.__getitems__(list(range(s, min(len(source), s + 256))))]
  return np.asarray(out, np.float32)


def constant_baseline(data: Data) -> dict[str, float]:
  """Test MAE of always predicting the training mean: what a model must beat."""
  mean = float(np.mean(_labels(data.sources['train'])))
  test = _labels(data.sources['test'])
  return {'train_mean': mean, 'test_MAE': float(np.mean(np.abs(test - mean)))}
