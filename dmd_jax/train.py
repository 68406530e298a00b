"""Training and evaluation with the reference protocol (spec §4), data-parallel over a device mesh.

`train_seed(run, cfg, ...)` trains one seed in `workdir/seed_<s>/`: per epoch all training batches
(seeded shuffle, the partial accumulation window of the epoch dropped), then valid and test
metrics from the same parameters, ReduceLROnPlateau on the valid L1 loss, best-on-valid params
kept, early stop. The full state (params, optimizer and accumulation state, scheduler and
early-stop counters, loader position, history) is checkpointed with orbax after every epoch, so
running the same command again resumes where the last completed epoch left off and ends with the
same numbers. Test metrics are reported once, from the best-on-valid parameters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmd_jax import api, edges, optim
from dmd_jax.config import DMDConfig
from dmd_jax.input_pipeline import Loader, global_batch
from dmd_jax.metrics import regression_metrics

MODEL_KEYS = ('text', 'audio', 'vision', 'labels')
STATE_ITEM, META_ITEM = 'state', 'meta'


# ---- scheduler and early stop (host side, JSON-able) -----------------------------------------

@dataclasses.dataclass
class Plateau:
  """torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', threshold_mode='rel', cooldown=0)."""
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


# ---- the mesh and the jitted steps ------------------------------------------------------------

def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


class Steps:
  """The train and eval steps, each jitted once over `mesh` (params replicated, batch split)."""

  def __init__(self, cfg: DMDConfig, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.split = NamedSharding(mesh, P('data'))
    train = functools.partial(api.train_step, config=cfg, train=True)
    self.train = jax.jit(train, in_shardings=(self.replicated, self.split, self.replicated),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=(0,),
                         compiler_options=api.compiler_options())

    def evaluate(params, batch):
      out = api.forward(params, batch, cfg, train=False)
      res = {'pred': out['output_logit'].reshape(-1), 'label': batch['labels'].reshape(-1),
             'mask': batch['mask'], 'index': batch['index'],
             'homo': out['edges_homo'], 'hetero': out['edges_hetero']}
      if cfg.dhmd:       # dictionary activations (B, 3, K) per space
        res.update({f'dict_{u}': out[f'dict_act_{u}'] for u in ('homo', 'hetero')})
      return res

    self.eval = jax.jit(evaluate, in_shardings=(self.replicated, self.split),
                        out_shardings=self.replicated, compiler_options=api.compiler_options())

    def reset_window(state):
      return state.replace(opt_state=optim.reset_window(state.opt_state))

    def set_lr(state, lr):
      return state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr))

    # Host-side edits of the state as jitted functions with the step's shardings: no transfer,
    # no recompilation of the train step, and valid across processes.
    self.reset_window = jax.jit(reset_window, out_shardings=self.replicated, donate_argnums=(0,))
    self.set_lr = jax.jit(set_lr, out_shardings=self.replicated, donate_argnums=(0,))
    self.key = jax.jit(jax.random.key, out_shardings=self.replicated)

  def replicate(self, tree):
    """Host values (or single-device arrays, the same on every process) onto the mesh."""
    return jax.device_put(jax.device_get(tree), self.replicated)

  def put(self, batch: Mapping[str, np.ndarray], keys=MODEL_KEYS) -> dict[str, jax.Array]:
    return global_batch({k: batch[k] for k in keys}, self.mesh)


def evaluate(steps: Steps, params, loader: Loader) -> tuple[dict, dict]:
  """Metrics over every sample of a split (padding masked out) and the predictions; every
  process gets the same numbers (the eval outputs are replicated).

  'Loss' is the mean L1 over all samples; the reference averages per-batch means (its last,
  smaller batch weighs more) and rounds to 4 places."""
  outs = [steps.eval(params, steps.put(batch, MODEL_KEYS + ('mask', 'index')))
          for batch in loader.epoch(0)]
  host = jax.device_get(outs)
  cat = {k: np.concatenate([o[k] for o in host]) for k in host[0]}
  keep = cat.pop('mask') > 0
  preds = {k: v[keep] for k, v in cat.items()}
  metrics = regression_metrics(preds['pred'], preds['label'])
  metrics['Loss'] = float(np.mean(np.abs(preds['pred'] - preds['label']), dtype=np.float64))
  return metrics, preds


# ---- checkpoints ------------------------------------------------------------------------------

def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save_state(mngr: ocp.CheckpointManager, step: int, tree, meta: Mapping[str, Any]) -> None:
  mngr.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree),
                                              META_ITEM: ocp.args.JsonSave(dict(meta))}))
  mngr.wait_until_finished()


def restore_state(mngr: ocp.CheckpointManager, step: int, target):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    got = mngr.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract), META_ITEM: ocp.args.JsonRestore()}))
  except ValueError as e:
    # e.g. a run started by a dmd_jax whose optimizer state was laid out differently
    raise ValueError(f'checkpoint {mngr.directory} step {step} does not match the state this '
                     f'version trains (another model config, or an older dmd_jax); resume it with '
                     f'the version that wrote it, or start a fresh workdir. Orbax: {e}') from e
  return got[STATE_ITEM], dict(got[META_ITEM])


def write_text(path: str, text: str) -> None:
  """Write a whole file atomically (temp file, then rename), from process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
  write_text(path, json.dumps(obj, indent=1, sort_keys=True))


# ---- one seed ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
  train: Loader
  valid: Loader
  test: Loader
  ids: Callable[[str, np.ndarray], list[str]] | None = None


def train_seed(run, cfg: DMDConfig, init_params: Callable[[int], Any], data: Data, seed: int,
               workdir: str, *, writer=None, mesh: Mesh | None = None, steps: Steps | None = None,
               progress: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Train one seed to early stop (or `run.max_epochs`) and report test metrics at the best
  valid epoch. Resumes from `workdir` if an earlier run of the same seed left checkpoints."""
  os.makedirs(workdir, exist_ok=True)
  done_path = os.path.join(workdir, 'result.json')
  if os.path.exists(done_path):
    with open(done_path) as f:
      log(f'seed {seed}: finished earlier, reusing {done_path}')
      return json.load(f)
  steps = steps or Steps(cfg, mesh or make_mesh())
  tx = optim.reference_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  state = steps.replicate(api.create_train_state(init_params(seed), tx))
  rng = steps.key(seed)
  plateau = Plateau(run.learning_rate, patience=run.patience)
  meta = {'epoch': 0, 'best_valid': math.inf, 'best_epoch': 0, 'history': [], 'seed': seed}
  latest = checkpoint_manager(os.path.join(workdir, 'checkpoints'), run.keep_checkpoints)
  best = checkpoint_manager(os.path.join(workdir, 'best'), 1)
  if latest.latest_step() is not None:
    state, meta = restore_state(latest, latest.latest_step(), state)
    plateau = Plateau(**meta['plateau'])
    data.train.set_state(meta['loader'])
    log(f"seed {seed}: resumed after epoch {meta['epoch']} from {latest.directory}")

  max_epochs = run.max_epochs
  pbar = _progress(progress, max_epochs, data.train.num_batches)
  log = pbar.wrap(log)
  pbar.set_epoch(meta['epoch'])
  while meta['epoch'] < max_epochs and meta['epoch'] - meta['best_epoch'] < run.early_stop:
    epoch = meta['epoch'] + 1
    t0 = time.time()
    state = steps.reset_window(state)     # the reference drops an epoch's partial window
    sums, count, pending = None, 0, []
    for batch in data.train:
      state, metrics = steps.train(state, steps.put(batch), rng)
      pending.append(metrics)
      if len(pending) >= run.log_every:
        sums, count = _fold(sums, count, pending)
        pending = []
        _check_finite(sums, epoch, workdir)
      pbar.update()
    sums, count = _fold(sums, count, pending)
    _check_finite(sums, epoch, workdir)
    train_metrics = {k: float(v) / count for k, v in sums.items() if np.ndim(v) == 0}
    valid, valid_out = evaluate(steps, state.params, data.valid)
    if not np.isfinite(valid['Loss']):
      raise FloatingPointError(
          f"non-finite validation loss in epoch {epoch}; stopping. The last good state is the "
          f"latest checkpoint in {os.path.join(workdir, 'checkpoints')} (before this epoch)")
    test, test_out = evaluate(steps, state.params, data.test)
    lr = optim.get_learning_rate(state.opt_state)
    new_lr = plateau.step(valid['Loss'])
    if new_lr != lr:
      state = steps.set_lr(state, new_lr)
    improved = valid['Loss'] <= meta['best_valid'] - 1e-6
    if improved:
      meta['best_valid'], meta['best_epoch'] = valid['Loss'], epoch
      save_state(best, epoch, state.params, {'epoch': epoch, 'valid': valid, 'seed': seed})
    n_train = count * data.train.global_batch_size
    edge_stats = {
        'train': edges.epoch_row({u: edges.moment_stats(
            edges.edge_vector(sums[f'edges_{u}_sum']), edges.edge_vector(sums[f'edges_{u}_sqsum']),
            n_train) for u in edges.UNITS}),
        'valid': edges.epoch_row({u: edges.vector_stats(edges.edge_vector(valid_out[u]))
                                  for u in edges.UNITS}),
        'test': edges.epoch_row({u: edges.vector_stats(edges.edge_vector(test_out[u]))
                                 for u in edges.UNITS})}
    record = {'epoch': epoch, 'lr': lr, 'train': train_metrics, 'valid': valid, 'test': test,
              'edges': edge_stats, 'seconds': round(time.time() - t0, 2),
              'best_epoch': meta['best_epoch']}
    meta['history'].append(record)
    edges.write_history(meta['history'], workdir)
    meta.update(epoch=epoch, plateau=dataclasses.asdict(plateau), loader=data.train.get_state())
    save_state(latest, epoch, state, meta)
    if writer is not None:
      writer.write(epoch, {f'train/{k}': v for k, v in train_metrics.items()}
                   | {f'valid/{k}': v for k, v in valid.items()}
                   | {f'test/{k}': v for k, v in test.items()} | {'lr': lr}
                   | {f'edges/{split}/{k}': v for split, row in edge_stats.items()
                      for k, v in row.items()})
    log(f"seed {seed} epoch {epoch}: train loss {train_metrics['total']:.4f} | valid L1 "
        f"{valid['Loss']:.4f} Acc2 {valid['Non0_acc_2']:.4f} | test L1 {test['Loss']:.4f} "
        f"Acc2 {test['Non0_acc_2']:.4f} Acc7 {test['Mult_acc_7']:.4f} | lr {lr:.2e} | "
        f"{record['seconds']:.1f}s{' *' if improved else ''}")
    pbar.set_epoch(epoch)
  pbar.close()

  best_params, best_meta = restore_state(best, best.latest_step(), state.params)
  test, preds = evaluate(steps, best_params, data.test)
  result = {'seed': seed, 'best_epoch': best_meta['epoch'], 'epochs': meta['epoch'],
            'valid': best_meta['valid'], 'test': test,
            # compilations of each jitted step in this process (1 each when shapes are stable)
            'compiles': {'train': steps.train._cache_size(),  # pylint: disable=protected-access
                         'eval': steps.eval._cache_size()}}  # pylint: disable=protected-access
  ids = data.ids('test', preds['index']) if data.ids else [''] * len(preds['index'])
  write_predictions(os.path.join(workdir, 'predictions_test.csv'), preds, ids)
  if jax.process_index() == 0:     # edges of the best parameters, and their history
    edges.write_export(workdir, preds, ids, cfg, 'test')
    for split in ('train', 'valid'):
      edges.plot_history(meta['history'], os.path.join(workdir, f'edges_history_{split}'), split)
  write_json(done_path, result)
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


def _check_finite(sums, epoch, workdir):
  if sums is None:
    return
  bad = {k: float(v) for k, v in sums.items() if np.ndim(v) == 0 and not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f'non-finite training loss in epoch {epoch} ({bad}); stopping. The last good state is '
        f'the latest checkpoint in {os.path.join(workdir, "checkpoints")} (before this epoch); '
        'lower config.learning_rate or check the data')


def write_predictions(path: str, preds: Mapping[str, np.ndarray], ids=None) -> None:
  rows = ['index,id,label,prediction'] + [
      f"{int(i)},{ids[j] if ids is not None else ''},{float(y):.6g},{float(p):.6g}"
      for j, (i, y, p) in enumerate(zip(preds['index'], preds['label'], preds['pred']))]
  write_text(path, '\n'.join(rows) + '\n')


class _progress:
  """tqdm over training steps with epochs in the description (a no-op when disabled)."""

  def __init__(self, enabled: bool, epochs: int, per_epoch: int):
    self.bar = None
    self.epochs = epochs
    if enabled:
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      self.bar = tqdm(total=epochs * per_epoch, unit='step', dynamic_ncols=True)
      self.per_epoch = per_epoch

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
