"""Everything one seed's training writes besides checkpoints, in one place: the per-epoch metrics
(JSON lines and TensorBoard), the edge history table, the progress bar and log line, and at the
end the predictions, the edge export of the best parameters, the history curves (unless
`figures` is off) and result.json. Only process 0 writes; every file is written atomically
(dmd_jax.fileio)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from dmd_jax import fileio
from dmd_jax.analysis import edges
from dmd_jax.config import DMDConfig
from dmd_jax.training.metric_writer import MetricWriter

RESULT = 'result.json'


def on_main_process() -> bool:
  return jax.process_index() == 0


def write_text(path: str, text: str) -> None:
  """A whole file, atomically, from process 0 only."""
  if on_main_process():
    fileio.atomic_write(path, text)


def write_json(path: str, obj: Any) -> None:
  if on_main_process():
    fileio.write_json(path, obj)


def write_predictions(path: str, preds: Mapping[str, np.ndarray],
                      ids: Optional[Sequence[str]] = None) -> None:
  rows = ['index,id,label,prediction'] + [
      f"{int(i)},{ids[j] if ids is not None else ''},{float(y):.6g},{float(p):.6g}"
      for j, (i, y, p) in enumerate(zip(preds['index'], preds['label'], preds['pred']))]
  write_text(path, '\n'.join(rows) + '\n')


def epoch_edge_stats(sums: Mapping[str, np.ndarray], batch_size: int, batches: int,
                     valid_out: Mapping[str, np.ndarray],
                     test_out: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Per split, the mean and std of each edge over samples (train from the step's batch
  moments, summed over the epoch; valid and test from the per-sample edges of the eval step)."""
  vec = lambda u, name: edges.edge_vector(sums[f'edges_{u}_{name}'])
  return {
      'train': edges.epoch_row({u: edges.moment_stats(
          vec(u, 'sum'), vec(u, 'm2'), vec(u, 'sum_sq'), batch_size, batches)
          for u in edges.UNITS}),
      'valid': edges.epoch_row({u: edges.vector_stats(edges.edge_vector(valid_out[u]))
                                for u in edges.UNITS}),
      'test': edges.epoch_row({u: edges.vector_stats(edges.edge_vector(test_out[u]))
                               for u in edges.UNITS})}


class SeedOutputs:
  """The files and messages of one seed's run in `workdir`."""

  def __init__(self, workdir: str, seed: int, *, epochs: int, steps_per_epoch: int,
               progress: bool = False, figures: bool = True,
               log: Callable[[str], None] = print):
    self.workdir, self.seed, self.figures = workdir, seed, figures
    if on_main_process():
      os.makedirs(workdir, exist_ok=True)
    self.result_path = os.path.join(workdir, RESULT)
    self.bar = _Progress(progress and on_main_process(), epochs, steps_per_epoch)
    self.log = self.bar.wrap(log)
    self.writer: Optional[MetricWriter] = None

  def finished(self) -> Optional[dict[str, Any]]:
    """The result of an earlier, completed run of this seed, if any."""
    if not os.path.exists(self.result_path):
      return None
    with open(self.result_path) as f:
      self.log(f'seed {self.seed}: finished earlier, reusing {self.result_path}')
      return json.load(f)

  def start(self, epochs_done: int) -> None:
    self.writer = MetricWriter(self.workdir)
    self.bar.set_epoch(epochs_done)

  def step(self) -> None:
    self.bar.update()

  def epoch(self, record: Mapping[str, Any], history: Sequence[Mapping[str, Any]],
            improved: bool) -> None:
    """After an epoch: the edge history table, the metrics, the log line."""
    if on_main_process():
      edges.write_history(history, self.workdir)
    train, valid, test = record['train'], record['valid'], record['test']
    self.writer.write(record['epoch'], {f'train/{k}': v for k, v in train.items()}
                      | {f'valid/{k}': v for k, v in valid.items()}
                      | {f'test/{k}': v for k, v in test.items()} | {'lr': record['lr']}
                      | {f'edges/{split}/{k}': v for split, row in record['edges'].items()
                         for k, v in row.items()})
    self.log(f"seed {self.seed} epoch {record['epoch']}: train loss {train['total']:.4f} | "
             f"valid L1 {valid['Loss']:.4f} Acc2 {valid['Non0_acc_2']:.4f} | test L1 "
             f"{test['Loss']:.4f} Acc2 {test['Non0_acc_2']:.4f} Acc7 {test['Mult_acc_7']:.4f} | "
             f"lr {record['lr']:.2e} | {record['seconds']:.1f}s{' *' if improved else ''}")
    self.bar.set_epoch(record['epoch'])

  def finish(self, result: Mapping[str, Any], preds: Mapping[str, np.ndarray],
             ids: Sequence[str], history: Sequence[Mapping[str, Any]], cfg: DMDConfig) -> None:
    """Test predictions and edges of the best parameters, the history curves, result.json."""
    self.bar.close()
    if self.writer is not None:
      self.writer.close()
    write_predictions(os.path.join(self.workdir, 'predictions_test.csv'), preds, ids)
    if not on_main_process():
      return
    best = result.get('best_epoch')
    edges.write_export(self.workdir, preds, ids, cfg, 'test', figures=self.figures,
                       title=f'seed {self.seed}, best epoch {best}')
    for split in ('train', 'valid') if self.figures else ():
      edges.plot_history(history, os.path.join(self.workdir, f'edges_history_{split}'), split,
                         best_epoch=best, seed=self.seed)
    fileio.write_json(self.result_path, dict(result))    # last: it marks the run finished


class _Progress:
  """tqdm over training steps with epochs in the description (a no-op when disabled or when
  stderr is not a terminal)."""

  def __init__(self, enabled: bool, epochs: int, per_epoch: int):
    self.bar = None
    self.epochs, self.per_epoch = epochs, per_epoch
    if enabled and sys.stderr.isatty():   # in a redirected log, the epoch lines say enough
      self.bar = tqdm(total=epochs * per_epoch, unit='step', dynamic_ncols=True)

  def set_epoch(self, done: int):
    if self.bar is not None:
      self.bar.n = done * self.per_epoch
      self.bar.set_description(f'epoch {min(done + 1, self.epochs)}/{self.epochs}')
      self.bar.refresh()

  def wrap(self, log):
    """`log` that prints above the bar instead of through it."""
    if self.bar is None:
      return log
    return lambda msg: self.bar.write(msg) if log is print else log(msg)

  def update(self):
    if self.bar is not None:
      self.bar.update()

  def close(self):
    if self.bar is not None:
      self.bar.close()
