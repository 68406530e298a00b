"""A run's data: the prepared dataset its config names (a synthetic config's is made first by the
command, `prepare_synthetic`), a training loader per run and the shared valid and test loaders,
and the constant-prediction baseline every results table reports.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Sequence

import jax
import numpy as np

from dmd_jax import schema
from dmd_jax.data import builder, synthetic
from dmd_jax.data.pipeline import Loader, open_split


@dataclasses.dataclass
class Data:
  """Per run its training loader; one valid and one test loader shared by all."""
  train: Sequence[Loader]
  valid: Loader
  test: Loader
  ids: Callable[[str, np.ndarray], list[str]] | None = None


def data_path(run) -> str:
  """The prepared dataset of the run, else a named error with the command that prepares it."""
  path = schema.dataset_path(run.data_dir, run.dataset, run.aligned)
  if _prepared(path):
    return path
  if run.get('synthetic'):
    raise FileNotFoundError(
        f'no prepared synthetic {run.dataset} dataset at {path}: `python -m dmd_jax.main` '
        'makes it for this config (training.inputs.prepare_synthetic(run) from Python)')
  pkl = schema.FILE_NAMES[bool(run.aligned)]
  raise FileNotFoundError(
      f'no prepared {run.dataset} dataset at {path}. Prepare it once with\n'
      f'  python -m data_prep.mmsa --dataset={run.dataset} --aligned={str(run.aligned).lower()} '
      f'--pickle=/path/to/{run.dataset.upper()}/Processed/{pkl} --data_dir={run.data_dir}\n'
      'or point --config.data_dir at the data dir that holds it')


def prepare_synthetic(run) -> None:
  """For a config with `synthetic` set (configs/smoke.py, configs/demo.py): its synthetic MMSA
  pickle generated and prepared in `run.data_dir`, unless there already; by process 0. The
  command does this before a run; the library's runs read a prepared dataset (`data_path`)."""
  syn = run.get('synthetic')
  path = schema.dataset_path(run.data_dir, run.dataset, run.aligned)
  if not syn or _prepared(path) or jax.process_index() != 0:
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
    if not _prepared(path):
      raise


def _prepared(path: str) -> bool:
  """Whether a prepared dataset (its TFDS dataset_info.json) is at `path`."""
  return os.path.isfile(os.path.join(path, 'dataset_info.json'))


def loaders(run, path: str, seeds: Sequence[int]) -> Data:
  """A training loader per seed (its own shuffling), one valid and one test loader."""
  sources = {s: open_split(path, s) for s in schema.SPLITS}

  def ids(split, index):
    src = sources[split]
    return [src[int(i)]['id'].decode() for i in index]

  return Data(
      train=[Loader(sources['train'], run.batch_size, train=True, seed=seed) for seed in seeds],
      valid=Loader(sources['valid'], run.batch_size, train=False),
      test=Loader(sources['test'], run.batch_size, train=False), ids=ids)


def _labels(source) -> np.ndarray:
  out = []
  for s in range(0, len(source), 256):
    out += [r['label'] for r in source.__getitems__(list(range(s, min(len(source), s + 256))))]
  return np.asarray(out, np.float32)


def constant_baseline(path: str) -> dict[str, float]:
  """Test MAE of always predicting the training mean: what a model must beat."""
  mean = float(np.mean(_labels(open_split(path, 'train'))))
  test = _labels(open_split(path, 'test'))
  return {'train_mean': mean, 'test_MAE': float(np.mean(np.abs(test - mean)))}
