"""Runs trained together in one compiled program: the seeds of a config, or the members of a
hyper-parameter sweep. It wraps the single run of dmd_jax.training.train: the same pure step,
vmapped over a leading member axis (`steps.Steps`), one stacked state, and one `Protocol` per
member on the host.

`train_group(run, cfg, init_params, members, data)` trains every member in its own
`member.workdir` with the protocol it would follow alone (its steps equal up to float32 rounding,
docs/training.md). A member that stops is frozen (its state no longer changes) and finishes its
outputs; the group ends when every member has. Each member's full state is checkpointed in its
workdir after every epoch, in the single run's format.

Resume precedence, per member: a finished member (result.json) is not run again; else its latest
intact full-state checkpoint is restored (members of a group resume at their common epoch); else
it starts from `init_params(seed)`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

from dmd_jax.config import DMDConfig
from dmd_jax.data.pipeline import Loader
from dmd_jax.training import checkpoints, optim
from dmd_jax.training.inputs import Data
from dmd_jax.training.outputs import SeedOutputs
from dmd_jax.training.protocol import Plateau, Protocol
from dmd_jax.training.state import create_train_state
from dmd_jax.training.steps import (Steps, choose_layout, device_memory, evaluate, group_mesh,
                                    stack, state_bytes)
from dmd_jax.training.train import (Member, best_params, cached_optimizer, check_finite,
                                    data_order, epoch_record, finish_record, fold, newest_intact,
                                    resume)


@dataclasses.dataclass
class _Member:
  """Host-side state of one member during training."""
  member: Member
  out: SeedOutputs
  protocol: Protocol
  meta: dict
  latest: Any = None
  best: Any = None
  active: bool = True
  result: Optional[dict] = None


def train_group(run, cfg: DMDConfig, init_params: Callable[[int], Any], members: Sequence[Member],
                data: Data, *, devices=None, progress: bool = False,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Train every member to its early stop (or `run.max_epochs`) in one compiled program; return
  each member's result (test metrics at its best valid epoch)."""
  k = len(members)
  loaders = [data.train[m.seed] for m in members]
  mesh = group_mesh(devices if devices is not None else jax.devices(), k)
  # one optimizer for the group (a static part of the stacked state); each member's learning
  # rate lives in its optimizer state
  tx = cached_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  states, runs = [], []
  for m, loader in zip(members, loaders):
    out = SeedOutputs(m.workdir, m.seed, epochs=run.max_epochs,
                      steps_per_epoch=loader.num_batches, progress=progress and k == 1,
                      figures=run.get('figures', True), log=log)
    lr = m.hparams.get('learning_rate', run.learning_rate)
    weights = {n: v for n, v in m.hparams.items() if n != 'learning_rate'}
    state = create_train_state(init_params(m.seed), tx, weights)
    state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr))
    protocol = Protocol(Plateau(lr, patience=run.patience), run.early_stop, run.max_epochs)
    done = out.finished()
    r = _Member(m, out, protocol, {'epoch': 0, 'history': [], 'seed': m.seed, **protocol.meta()},
                active=done is None, result=done)
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
  compiled_before = dict(steps.traces)
  states, bests = _resume(runs, states, loaders)
  state = steps.put_members(stack(states))
  best = steps.put_members(stack(bests))
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
    state, sums, count = train_epoch(steps, state, loaders, epoch, rngs, active, run.log_every,
                                     bar.step if bar else (lambda: None), where)
    v_results = evaluate(steps, state.params, data.valid, active)
    t_results = evaluate(steps, state.params, data.test, active)
    lrs = np.asarray(jax.device_get(state.opt_state.inner.hyperparams['learning_rate']), np.float64)
    new_lrs, improved, stops = lrs.copy(), np.zeros(k, bool), np.zeros(k, bool)
    for i, r in enumerate(runs):
      if not r.active:
        continue
      v_metrics = v_results[i][0]
      if not np.isfinite(v_metrics['Loss']):
        raise FloatingPointError(f'non-finite validation loss of {r.member.name} in {where} '
                                 '(before this epoch)')
      new_lrs[i], improved[i], stops[i] = r.protocol.update(epoch, v_metrics['Loss'])
    if (new_lrs != lrs).any():
      state = steps.set_lr(state, np.asarray(new_lrs, np.float32))
    if improved.any():
      best = steps.keep_best(best, state.params, improved)
    for i, r in enumerate(runs):
      if not r.active:
        continue
      (v_metrics, v_out), (t_metrics, t_out) = v_results[i], t_results[i]
      if improved[i]:
        checkpoints.save_state(r.best, epoch, steps.host_member(state.params, i),
                               {'epoch': epoch, 'valid': v_metrics, 'seed': r.member.seed})
      record = epoch_record(epoch, float(lrs[i]), {key: v[i] for key, v in sums.items()}, count,
                            v_metrics, t_metrics, v_out, t_out, loaders[i].global_batch_size,
                            r.protocol.best_epoch, t0)
      r.meta['history'].append(record)
      r.meta.update(epoch=epoch, loader=data_order(loaders[i], epoch), **r.protocol.meta())
      checkpoints.save_state(r.latest, epoch, steps.host_member(state, i), r.meta)
      r.out.epoch(record, r.meta['history'], improved[i])
      if stops[i]:
        r.active = False                       # frozen from the next step on
    finishing = [i for i, r in enumerate(runs) if not r.active and r.result is None]
    if finishing:
      _finish(steps, cfg, runs, finishing, best, data, compiled_before)
  return [r.result for r in runs]


def cached_steps(cls, cfg: DMDConfig, mesh, layout: str = 'replicated') -> Steps:
  """One `Steps` per (model config, mesh, layout) in a process: groups run one after another
  (several programs of a sweep) and evaluations of a trained run reuse the traced and compiled
  steps."""
  return _cached_steps(cls, cfg, mesh, layout)


@functools.lru_cache(maxsize=4)
def _cached_steps(cls, cfg: DMDConfig, mesh, layout: str) -> Steps:
  return cls(cfg, mesh, layout)


def train_epoch(steps: Steps, state, loaders: Sequence[Loader], epoch: int, rngs,
                active: np.ndarray, log_every: int, on_step, where: str):
  """Training epoch `epoch` (from 1) over every active member's loader (a frozen member gets
  zeros). Metrics stay on the device and are fetched every `log_every` steps (no host sync per
  step). Returns (state, summed metrics with a leading member axis, step count)."""
  state = steps.reset_window(state)     # the reference drops an epoch's partial window
  iters = [l.epoch(epoch - 1) if a else None for l, a in zip(loaders, active)]
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
      sums, count = fold(sums, count, pending)
      pending = []
      check_finite(sums, where, active)
    on_step()
  sums, count = fold(sums, count, pending)
  check_finite(sums, where, active)
  return state, sums, count


def _resume(runs: Sequence[_Member], states: list, loaders: Sequence[Loader]
            ) -> tuple[list, list]:
  """(states, best parameters) of every member, each active one restored from its latest
  intact checkpoint, all at their common epoch (a group killed while saving may have some
  members one epoch ahead: they redo it)."""
  intact = [newest_intact(r.latest, r.member.name, r.out.log) if r.active else 0 for r in runs]
  common = min(e for e, r in zip(intact, runs) if r.active)
  bests = [s.params for s in states]
  if common and any(r.active and (common not in r.latest.all_steps()
                                  or checkpoints.damaged(r.latest, common)) for r in runs):
    raise ValueError(f'the members of this group have no intact checkpoint of one common '
                     f'epoch ({common}); train them again with --fresh')
  for i, r in enumerate(runs):
    if not r.active or common == 0:
      continue
    states[i], r.meta = resume(r.latest, common, states[i], r.protocol, loaders[i],
                               r.member.name, r.out.log)
    bests[i] = best_params(r.best, states[i].params)
  return states, bests


def _finish(steps: Steps, cfg: DMDConfig, runs: Sequence[_Member], finishing: Sequence[int], best,
            data: Data, compiled_before) -> None:
  """Test metrics and outputs of members that just stopped, from their best parameters."""
  mask = [i in finishing for i in range(len(runs))]
  results = evaluate(steps, best, data.test, mask)
  for i in finishing:
    r = runs[i]
    test, preds = results[i]
    r.result = finish_record(r.member, r.best, r.meta['epoch'], test, len(runs), steps.mesh,
                             {k: v - compiled_before[k] for k, v in steps.traces.items()})
    r.out.finish(r.result, preds, data.ids('test', preds['index']), r.meta['history'], cfg)
    r.latest.close()
    r.best.close()
