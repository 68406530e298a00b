"""Training one seed with the reference protocol (spec §4), data-parallel over a device mesh.

`train_seed(run, cfg, ...)` trains in `workdir/seed_<s>/`: per epoch all training batches (seeded
shuffle, the partial accumulation window of the epoch dropped), then valid and test metrics from
the same parameters, ReduceLROnPlateau on the valid L1 loss, best-on-valid params kept, early
stop. The full state (params, optimizer and accumulation state, scheduler and early-stop
counters, loader position, history) is checkpointed with orbax after every epoch, so running the
same command again resumes where the last completed epoch left off and ends with the same
numbers. Test metrics are reported once, from the best-on-valid parameters.

Resume precedence: a finished seed (result.json) is not run again; else the latest full-state
checkpoint is restored; else the seed starts from `init_params(seed)`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dmd_jax.config import DMDConfig
from dmd_jax.data.pipeline import Loader
from dmd_jax.training import checkpoints, optim
from dmd_jax.training.outputs import SeedOutputs, epoch_edge_stats
from dmd_jax.training.state import create_train_state
from dmd_jax.training.steps import Steps, evaluate, make_mesh


@dataclasses.dataclass
class Plateau:
  """torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', threshold_mode='rel', cooldown=0),
  written out because optax's reduce_on_plateau counts and scales differently."""
  lr: float
  factor: float = 0.5
  patience: int = 5
  threshold: float = 1e-4
  best: float = math.inf
  num_bad_epochs: int = 0

  def step(self, value: float) -> float:
    if value < self.best * (1.0 - self.threshold):
      self.best, self.num_bad_epochs = value, 0
    else:
      self.num_bad_epochs += 1
    if self.num_bad_epochs > self.patience:
      new = self.lr * self.factor
      if self.lr - new > 1e-8:                      # torch's eps
        self.lr = new
      self.num_bad_epochs = 0
    return self.lr


@dataclasses.dataclass
class Data:
  train: Loader
  valid: Loader
  test: Loader
  ids: Callable[[str, np.ndarray], list[str]] | None = None


def train_epoch(steps: Steps, state, loader: Loader, rng, log_every: int, on_step, where: str):
  """One pass over the training loader. Metrics stay on the device and are fetched every
  `log_every` steps (no host sync per step). Returns (state, summed metrics, step count)."""
  state = steps.reset_window(state)     # the reference drops an epoch's partial window
  sums, count, pending = None, 0, []
  for batch in loader:
    state, metrics = steps.train(state, steps.put(batch), rng)
    pending.append(metrics)
    if len(pending) >= log_every:
      sums, count = _fold(sums, count, pending)
      pending = []
      _check_finite(sums, where)
    on_step()
  sums, count = _fold(sums, count, pending)
  _check_finite(sums, where)
  return state, sums, count


def train_seed(run, cfg: DMDConfig, init_params: Callable[[int], Any], data: Data, seed: int,
               workdir: str, *, mesh=None, steps: Steps | None = None, progress: bool = False,
               log: Callable[[str], None] = print) -> dict[str, Any]:
  """Train one seed to early stop (or `run.max_epochs`) and report test metrics at the best
  valid epoch. Resumes from `workdir` if an earlier run of the same seed left checkpoints."""
  out = SeedOutputs(workdir, seed, epochs=run.max_epochs, steps_per_epoch=data.train.num_batches,
                    progress=progress, log=log)
  done = out.finished()
  if done is not None:
    return done
  steps = steps or Steps(cfg, mesh or make_mesh())
  tx = optim.reference_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  state = steps.replicate(create_train_state(init_params(seed), tx))
  rng = steps.key(seed)
  plateau = Plateau(run.learning_rate, patience=run.patience)
  meta = {'epoch': 0, 'best_valid': math.inf, 'best_epoch': 0, 'history': [], 'seed': seed}
  latest = checkpoints.checkpoint_manager(os.path.join(workdir, 'checkpoints'),
                                          run.keep_checkpoints)
  best = checkpoints.checkpoint_manager(os.path.join(workdir, 'best'), 1)
  if latest.latest_step() is not None:
    state, meta = checkpoints.restore_state(latest, latest.latest_step(), state)
    plateau = Plateau(**meta['plateau'])
    data.train.set_state(meta['loader'])
    out.log(f"seed {seed}: resumed after epoch {meta['epoch']} from {latest.directory}")

  out.start(meta['epoch'])
  last_good = os.path.join(workdir, 'checkpoints')
  while meta['epoch'] < run.max_epochs and meta['epoch'] - meta['best_epoch'] < run.early_stop:
    epoch = meta['epoch'] + 1
    t0 = time.time()
    where = f'epoch {epoch}; the last good state is the latest checkpoint in {last_good}'
    state, sums, count = train_epoch(steps, state, data.train, rng, run.log_every, out.step,
                                     where)
    train_metrics = {k: float(v) / count for k, v in sums.items() if np.ndim(v) == 0}
    valid, valid_out = evaluate(steps, state.params, data.valid)
    if not np.isfinite(valid['Loss']):
      raise FloatingPointError(f'non-finite validation loss in {where} (before this epoch)')
    test, test_out = evaluate(steps, state.params, data.test)
    lr = optim.get_learning_rate(state.opt_state)
    new_lr = plateau.step(valid['Loss'])
    if new_lr != lr:
      state = steps.set_lr(state, new_lr)
    improved = valid['Loss'] <= meta['best_valid'] - 1e-6
    if improved:
      meta['best_valid'], meta['best_epoch'] = valid['Loss'], epoch
      checkpoints.save_state(best, epoch, state.params,
                             {'epoch': epoch, 'valid': valid, 'seed': seed})
    record = {'epoch': epoch, 'lr': lr, 'train': train_metrics, 'valid': valid, 'test': test,
              'edges': epoch_edge_stats(sums, count * data.train.global_batch_size, valid_out,
                                        test_out),
              'seconds': round(time.time() - t0, 2), 'best_epoch': meta['best_epoch']}
    meta['history'].append(record)
    meta.update(epoch=epoch, plateau=dataclasses.asdict(plateau), loader=data.train.get_state())
    checkpoints.save_state(latest, epoch, state, meta)
    out.epoch(record, meta['history'], improved)

  best_params, best_meta = checkpoints.restore_state(best, best.latest_step(), state.params)
  test, preds = evaluate(steps, best_params, data.test)
  result = {'seed': seed, 'best_epoch': best_meta['epoch'], 'epochs': meta['epoch'],
            'valid': best_meta['valid'], 'test': test,
            # compilations of each jitted step in this process (1 each when shapes are stable)
            'compiles': {'train': steps.train._cache_size(),  # pylint: disable=protected-access
                         'eval': steps.eval._cache_size()}}  # pylint: disable=protected-access
  ids = data.ids('test', preds['index']) if data.ids else [''] * len(preds['index'])
  out.finish(result, preds, ids, meta['history'], cfg)
  latest.close()
  best.close()
  return result


def _fold(sums, count, pending):
  if not pending:
    return sums, count
  host = jax.device_get(pending)         # the only device -> host transfer of train metrics
  for m in host:
    sums = m if sums is None else jax.tree.map(np.add, sums, m)
  return sums, count + len(host)


def _check_finite(sums: Mapping[str, Any] | None, where: str) -> None:
  if sums is None:
    return
  bad = {k: float(v) for k, v in sums.items() if np.ndim(v) == 0 and not np.isfinite(v)}
  if bad:
    raise FloatingPointError(f'non-finite training loss in {where} ({bad}); stopping. '
                             'Lower config.learning_rate or check the data')
