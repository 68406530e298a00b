"""Training with the reference protocol (spec §4), for a group of members trained together in one
compiled program (seeds, or the members of a hyper-parameter sweep; a group of one is a plain run).

`train_group(run, cfg, init_params, members, data, ...)` trains every member in its own
`member.workdir`, with the protocol it would follow alone (its steps equal up to float32
rounding, docs/training.md): per epoch all of its training batches (its own
seeded shuffle, the partial accumulation window of the epoch dropped), then valid and test
metrics from the same parameters, its own ReduceLROnPlateau on the valid L1 loss, its
best-on-valid parameters kept, its own early stop. A member that stops is frozen (its state no
longer changes) and finishes its outputs; the group ends when every member has. The full state of
each member (params, optimizer and accumulation state, scheduler and early-stop counters, loader
position, history) is checkpointed with orbax in its workdir after every epoch, so running the
same command again resumes where the last completed epoch left off and ends with the same
numbers. Test metrics are reported once per member, from its best-on-valid parameters.

Resume precedence, per member: a finished member (result.json) is not run again; else its latest
full-state checkpoint is restored (members of a group resume at their common epoch); else it
starts from `init_params(seed)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from dmd_jax.config import DMDConfig
from dmd_jax.data.pipeline import Loader
from dmd_jax.training import checkpoints, optim
from dmd_jax.training.outputs import SeedOutputs, epoch_edge_stats
from dmd_jax.training.state import create_train_state
from dmd_jax.training.steps import (Steps, choose_layout, device_memory, evaluate, group_mesh,
                                    stack, state_bytes)


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
class Member:
  """One run of a group: its seed, its output folder, and the hyper-parameters it overrides
  (a sweep member's `learning_rate` and loss weights; empty for a plain seed)."""
  seed: int
  workdir: str
  hparams: dict = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    extra = ' '.join(f'{k}={v:g}' for k, v in sorted(self.hparams.items()))
    return f'seed {self.seed}' + (f' ({extra})' if extra else '')


@dataclasses.dataclass
class Data:
  """Per member its training loader; one valid and one test loader shared by all."""
  train: Sequence[Loader]
  valid: Loader
  test: Loader
  ids: Callable[[str, np.ndarray], list[str]] | None = None


@dataclasses.dataclass
class _Run:
  """Host-side state of one member during training."""
  member: Member
  out: SeedOutputs
  plateau: Plateau
  meta: dict
  latest: Any
  best: Any
  active: bool = True
  result: Optional[dict] = None


def train_group(run, cfg: DMDConfig, init_params: Callable[[int], Any], members: Sequence[Member],
                data: Data, *, devices=None, progress: bool = False,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Train every member to its early stop (or `run.max_epochs`) in one compiled program; return
  each member's result (test metrics at its best valid epoch)."""
  k = len(members)
  if len(data.train) != k:
    raise ValueError(f'{k} members but {len(data.train)} training loaders')
  mesh = group_mesh(devices if devices is not None else jax.devices(), k)
  # one optimizer for the group (a static part of the stacked state); each member's learning
  # rate lives in its optimizer state
  tx = cached_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  states, runs = [], []
  for m, loader in zip(members, data.train):
    out = SeedOutputs(m.workdir, m.seed, epochs=run.max_epochs,
                      steps_per_epoch=loader.num_batches, progress=progress and k == 1,
                      figures=run.get('figures', True), log=log)
    lr = m.hparams.get('learning_rate', run.learning_rate)
    weights = {n: v for n, v in m.hparams.items() if n != 'learning_rate'}
    state = create_train_state(init_params(m.seed), tx, weights)
    state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr))
    done = out.finished()
    r = _Run(m, out, Plateau(lr, patience=run.patience),
             {'epoch': 0, 'best_valid': math.inf, 'best_epoch': 0, 'history': [], 'seed': m.seed},
             None, None, active=done is None, result=done)
    if r.active:
      r.latest = checkpoints.checkpoint_manager(os.path.join(m.workdir, 'checkpoints'),
                                                run.keep_checkpoints)
      r.best = checkpoints.checkpoint_manager(os.path.join(m.workdir, 'best'), 1)
    states.append(state)
    runs.append(r)
  if not any(r.active for r in runs):
    return [r.result for r in runs]
  layout = choose_layout(run.get('state_layout', 'auto'), mesh, state_bytes(states[0]), k,
                         device_memory(mesh.devices.flat[0]))
  steps = cached_steps(Steps, cfg, mesh, layout)
  compiled_before = _compiled(steps)
  states = _resume(runs, states, data)
  state = steps.put_members(stack(states))
  best = steps.put_members(stack([s.params for s in states]))
  rngs = steps.keys(np.asarray([m.seed for m in members], np.uint32))
  epoch = max(r.meta['epoch'] for r in runs if r.active)
  for r in runs:
    if r.active:
      r.out.start(epoch)
  bar = runs[0].out if k == 1 else None

  while any(r.active for r in runs):
    epoch += 1
    t0 = time.time()
    last_good = ', '.join(sorted({os.fspath(r.latest.directory) for r in runs if r.active}))
    where = (f'epoch {epoch}; the last good state is epoch {epoch - 1}\'s checkpoint in '
             f'{last_good} (its digests verified at resume)' if epoch > 1 else
             f'epoch {epoch}; no checkpoint was saved yet')
    active = np.asarray([r.active for r in runs])
    state, sums, count = train_epoch(steps, state, data.train, rngs, active, run.log_every,
                                     bar.step if bar else (lambda: None), where)
    valid = evaluate(steps, state.params, data.valid, active)
    test = evaluate(steps, state.params, data.test, active)
    lrs = np.asarray(jax.device_get(state.opt_state.inner.hyperparams['learning_rate']), np.float64)
    new_lrs, improved = lrs.copy(), np.zeros(k, bool)
    for i, r in enumerate(runs):
      if not r.active:
        continue
      v_metrics = valid[i][0]
      if not np.isfinite(v_metrics['Loss']):
        raise FloatingPointError(f'non-finite validation loss of {r.member.name} in {where} '
                                 '(before this epoch)')
      new_lrs[i] = r.plateau.step(v_metrics['Loss'])
      improved[i] = v_metrics['Loss'] <= r.meta['best_valid'] - 1e-6
    if (new_lrs != lrs).any():
      state = steps.set_lr(state, np.asarray(new_lrs, np.float32))
    if improved.any():
      best = steps.keep_best(best, state.params, improved)
    for i, r in enumerate(runs):
      if not r.active:
        continue
      (v_metrics, v_out), (t_metrics, t_out) = valid[i], test[i]
      member_sums = {key: value[i] for key, value in sums.items()}
      train_metrics = {key: float(v) / count for key, v in member_sums.items()
                       if np.ndim(v) == 0}
      if improved[i]:
        r.meta['best_valid'], r.meta['best_epoch'] = v_metrics['Loss'], epoch
        checkpoints.save_state(r.best, epoch, steps.host_member(state.params, i),
                               {'epoch': epoch, 'valid': v_metrics, 'seed': r.member.seed})
      record = {'epoch': epoch, 'lr': float(lrs[i]), 'train': train_metrics, 'valid': v_metrics,
                'test': t_metrics,
                'edges': epoch_edge_stats(member_sums, data.train[i].global_batch_size, count,
                                          v_out, t_out),
                'seconds': round(time.time() - t0, 2), 'best_epoch': r.meta['best_epoch']}
      r.meta['history'].append(record)
      r.meta.update(epoch=epoch, plateau=dataclasses.asdict(r.plateau),
                    loader=data.train[i].get_state())
      checkpoints.save_state(r.latest, epoch, steps.host_member(state, i), r.meta)
      r.out.epoch(record, r.meta['history'], improved[i])
      if epoch >= run.max_epochs or epoch - r.meta['best_epoch'] >= run.early_stop:
        r.active = False                       # frozen from the next step on
    finishing = [i for i, r in enumerate(runs) if not r.active and r.result is None]
    if finishing:
      _finish(steps, cfg, runs, finishing, best, data, compiled_before)
  return [r.result for r in runs]


def cached_steps(cls, cfg: DMDConfig, mesh, layout: str = 'replicated') -> Steps:
  """One `Steps` per (model config, mesh, layout) in a process: groups run one after another
  (the sequential seed mode, several programs of a sweep) and evaluations of a trained run (eval
  mode, edge export) reuse the traced and compiled steps."""
  return _cached_steps(cls, cfg, mesh, layout)


@functools.lru_cache(maxsize=4)
def _cached_steps(cls, cfg: DMDConfig, mesh, layout: str) -> Steps:
  return cls(cfg, mesh, layout)


@functools.lru_cache(maxsize=4)
def cached_optimizer(learning_rate: float, update_epochs: int, grad_clip: float):
  """The same optimizer object for groups of one process: it is a static part of the train state,
  so a new one would trace and compile the train step again."""
  return optim.reference_optimizer(learning_rate, update_epochs, grad_clip)


def train_epoch(steps: Steps, state, loaders: Sequence[Loader], rngs, active: np.ndarray,
                log_every: int, on_step, where: str):
  """One pass over every active member's training loader (a frozen member gets zeros). Metrics
  stay on the device and are fetched every `log_every` steps (no host sync per step). Returns
  (state, summed metrics with a leading member axis, step count)."""
  state = steps.reset_window(state)     # the reference drops an epoch's partial window
  iters = [iter(l) if a else None for l, a in zip(loaders, active)]
  n = next(l for l, a in zip(loaders, active) if a).num_batches
  zeros = None
  on_device = steps.put_members(active)
  sums, count, pending = None, 0, []
  for _ in range(n):
    parts = []
    for it in iters:
      if it is None:
        parts.append(None)
      else:
        parts.append(next(it))
        zeros = zeros or {key: np.zeros_like(v) for key, v in parts[-1].items()}
    batch = {key: np.stack([(p if p is not None else zeros)[key] for p in parts])
             for key in zeros}
    state, metrics = steps.train(state, steps.put(batch), rngs, on_device)
    pending.append(metrics)
    if len(pending) >= log_every:
      sums, count = _fold(sums, count, pending)
      pending = []
      _check_finite(sums, active, where)
    on_step()
  for it in iters:                      # the loaders move on to their next epoch
    if it is not None:
      for _ in it:
        pass
  sums, count = _fold(sums, count, pending)
  _check_finite(sums, active, where)
  return state, sums, count


def train_seed(run, cfg: DMDConfig, init_params: Callable[[int], Any], data: Data, seed: int,
               workdir: str, **kw) -> dict[str, Any]:
  """One member alone (a group of one)."""
  return train_group(run, cfg, init_params, [Member(seed, workdir)], data, **kw)[0]


def _resume(runs: Sequence[_Run], states: list, data: Data) -> list:
  """Restore each active member from its latest checkpoint, all at their common epoch (a group
  killed while saving may have some members one epoch ahead: they redo it)."""
  saved = [sorted(r.latest.all_steps()) if r.active else [] for r in runs]
  # Only checkpoints whose files are as they were saved (checkpoints.damaged) count: a damaged
  # latest one is passed over, with a warning, for the newest intact one.
  intact = []
  for r, steps_saved in zip(runs, saved):
    good = []
    for step in steps_saved:
      problem = checkpoints.damaged(r.latest, step)
      if problem:
        r.out.log(f'warning: {r.member.name}: checkpoint of epoch {step} is damaged ({problem}); '
                  'not resuming from it')
      else:
        good.append(step)
    if steps_saved and not good and r.active:
      raise ValueError(f'{r.member.name}: no intact checkpoint in {r.latest.directory} (every '
                       'saved epoch is damaged, see the warnings); train it again with --fresh')
    intact.append(good)
  common = min((max(s) if s else 0) for s, r in zip(intact, runs) if r.active)
  if any(common not in s for s, r in zip(intact, runs) if r.active and common):
    raise ValueError(f'the members of this group have no intact checkpoint of one common epoch '
                     f'({common}); train them again with --fresh')
  for i, (r, steps_saved) in enumerate(zip(runs, saved)):
    if not r.active or common == 0:
      continue
    for later in [s for s in steps_saved if s > common]:
      r.latest.delete(later)
    states[i], r.meta = checkpoints.restore_state(r.latest, common, states[i])
    r.plateau = Plateau(**r.meta['plateau'])
    data.train[i].set_state(r.meta['loader'])
    r.out.log(f"{r.member.name}: resumed after epoch {common} from {r.latest.directory}")
  return states


def _compiled(steps: Steps) -> dict[str, int]:
  return dict(steps.traces)


def _finish(steps: Steps, cfg: DMDConfig, runs: Sequence[_Run], finishing: Sequence[int], best,
            data: Data, compiled_before: Mapping[str, int]) -> None:
  """Test metrics and outputs of members that just stopped, from their best parameters."""
  mask = [i in finishing for i in range(len(runs))]
  results = evaluate(steps, best, data.test, mask)
  for i in finishing:
    r = runs[i]
    test, preds = results[i]
    best_meta = checkpoints.restore_meta(r.best, r.best.latest_step())
    r.result = {'seed': r.member.seed, 'best_epoch': best_meta['epoch'],
                'epochs': r.meta['epoch'], 'valid': best_meta['valid'], 'test': test,
                'hparams': dict(r.member.hparams),
                'program': {'members': len(runs), 'mesh': dict(steps.mesh.shape)},
                # compilations of each jitted step by this group (1 each when shapes are stable;
                # 0 when an earlier group of this process compiled the same program)
                'compiles': {k: v - compiled_before[k] for k, v in _compiled(steps).items()}}
    ids = data.ids('test', preds['index']) if data.ids else [''] * len(preds['index'])
    r.out.finish(r.result, preds, ids, r.meta['history'], cfg)
    r.latest.close()
    r.best.close()


def _fold(sums, count, pending):
  """Adds fetched step metrics to the epoch's sums, in float64, with the squares of the edge
  batch sums beside them (for the edges' std, see analysis.edges.moment_stats)."""
  if not pending:
    return sums, count
  host = jax.device_get(pending)         # the only device -> host transfer of train metrics
  for m in host:
    m = {k: np.asarray(v, np.float64) for k, v in m.items()}
    m.update({k[:-len('_sum')] + '_sum_sq': np.square(m[k]) for k in list(m)
              if k.startswith('edges_') and k.endswith('_sum')})
    sums = m if sums is None else jax.tree.map(np.add, sums, m)
  return sums, count + len(host)


def _check_finite(sums: Mapping[str, Any] | None, active: np.ndarray, where: str) -> None:
  if sums is None:
    return
  bad = {k: float(np.asarray(v)[i]) for k, v in sums.items() if np.ndim(v) == 1
         for i in np.flatnonzero(active) if not np.isfinite(np.asarray(v)[i])}
  if bad:
    raise FloatingPointError(f'non-finite training loss in {where} ({bad}); stopping. '
                             'Lower config.learning_rate or check the data')
