"""One training run: one seed of a run config, in the shape of flax's lm1b example.

    train_and_evaluate(run, workdir)

One train state, built and placed on the device mesh (parameters replicated, each batch split
over the mesh's 'data' axis); one pure step (`dmd_jax.training.state.train_step`) jitted once; and
the reference's protocol on the host (`Protocol`: plateau scheduler, best-on-valid, early stop).
Per epoch: every training batch (the epoch's partial accumulation window dropped, as the
reference does), valid and test metrics from the same parameters, the protocol's decisions, a
full-state checkpoint (so the same command resumes after the last completed epoch and ends with
the same numbers). Test metrics are reported from the best-on-valid parameters.

Seeds trained together and sweeps wrap the same step and protocol (dmd_jax.training.group: the
step vmapped over a member axis, one `Protocol` per member); `experiment.run_training` runs a
config's seeds through one or the other.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmd_jax.analysis.metrics import regression_metrics
from dmd_jax.config import DMDConfig
from dmd_jax.data.pipeline import Loader
from dmd_jax.model import compiler_options, forward
from dmd_jax.model.batch import random_batch
from dmd_jax.model.target import devices_platform
from dmd_jax.schema import BATCH_KEYS, EVAL_KEYS, UNITS
from dmd_jax.training import checkpoints, inputs, optim, run_config
from dmd_jax.training.inputs import Data
from dmd_jax.training.outputs import SeedOutputs, epoch_edge_stats
from dmd_jax.training.protocol import Plateau, Protocol
from dmd_jax.training.steps import check_platform
from dmd_jax.training.state import create_train_state, train_step

PyTree = Any


@dataclasses.dataclass
class Member:
  """One run: its seed, its output folder, and the hyper-parameters it overrides (a sweep
  member's `learning_rate` and loss weights; empty for a plain seed)."""
  seed: int
  workdir: str
  hparams: dict = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    extra = ' '.join(f'{k}={v:g}' for k, v in sorted(self.hparams.items()))
    return f'seed {self.seed}' + (f' ({extra})' if extra else '')


@functools.lru_cache(maxsize=4)
def cached_optimizer(learning_rate: float, update_epochs: int, grad_clip: float):
  """The same optimizer object for the runs of one process: it is a static part of the train
  state, so a new one would trace and compile the train step again."""
  return optim.reference_optimizer(learning_rate, update_epochs, grad_clip)


def _unit(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x[None], tree)


def _drop_unit(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: x[0], tree)


class RunSteps:
  """The jitted functions of one run over `mesh` (axis 'data'), for a model config made for the
  mesh's platform (`steps.check_platform`): the train step, the eval step, and the two edits of
  the optimizer state the protocol makes between epochs. Each is compiled once per input shape
  (`traces` counts them).

  The steps compute a run as the member of a group of one (the pure step vmapped over a leading
  axis of size one, added and removed inside the jitted function): XLA compiles that axis
  into the arithmetic (first smoke step's loss 11.564888 plain vs 11.564889 with the axis), and
  this way a one-seed run gives bit for bit the numbers of earlier versions, which trained every
  run as a group."""

  def __init__(self, cfg: DMDConfig, mesh: Mesh):
    self.mesh = mesh
    self.platform = devices_platform(mesh.devices.flat)
    cfg = self.config = check_platform(cfg, self.platform)
    options = compiler_options(self.platform)
    self.replicated = NamedSharding(mesh, P())
    self.batches = NamedSharding(mesh, P('data'))
    self.traces = {'train': 0, 'eval': 0}
    one = functools.partial(train_step, config=cfg, train=True)

    def train(state, batch, rng):
      self.traces['train'] += 1
      return _drop_unit(jax.vmap(one)(*_unit((state, batch, rng))))

    def evaluate(params, batch):
      self.traces['eval'] += 1
      out = _drop_unit(jax.vmap(lambda p: forward(p, batch, cfg, train=False))(_unit(params)))
      res = {'pred': out['output_logit'].reshape(-1), 'label': batch['labels'].reshape(-1),
             'mask': batch['mask'], 'index': batch['index'],
             **{u: out[f'edges_{u}'] for u in UNITS}}
      if cfg.dhmd:       # dictionary activations (B, 3, K) per space
        res.update({f'dict_{u}': out[f'dict_act_{u}'] for u in UNITS})
      return res

    rep = self.replicated
    self.train = jax.jit(train, in_shardings=(rep, self.batches, rep),
                         out_shardings=(rep, rep), donate_argnums=(0,), compiler_options=options)
    self.eval = jax.jit(evaluate, in_shardings=(rep, self.batches), out_shardings=rep,
                        compiler_options=options)
    self.reset_window = jax.jit(
        lambda s: s.replace(opt_state=optim.reset_window(s.opt_state)), out_shardings=rep,
        donate_argnums=(0,))
    self.set_lr = jax.jit(
        lambda s, lr: s.replace(opt_state=optim.set_learning_rate(s.opt_state, lr)),
        out_shardings=rep, donate_argnums=(0,))
    # a run's dropout key, made on the mesh (a key made on one device cannot be put on a mesh
    # that spans other processes' devices)
    self.key = jax.jit(jax.random.key, out_shardings=rep)

  def put(self, batch: Mapping[str, np.ndarray], keys=BATCH_KEYS) -> dict[str, jax.Array]:
    """This process's block of a batch (its `keys`) as global arrays split over the mesh."""
    return {k: jax.make_array_from_process_local_data(self.batches, batch[k]) for k in keys}


def evaluate(steps: RunSteps, params, loader: Loader) -> tuple[dict, dict]:
  """(metrics, predictions) over every sample of a split, padding masked out; every process
  gets the same numbers. 'Loss' is the mean L1 over all samples (the reference averages
  per-batch means and rounds to 4 places)."""
  outs = [steps.eval(params, steps.put(batch, EVAL_KEYS)) for batch in loader.epoch(0)]
  host = jax.device_get(outs)
  keep = np.concatenate([o['mask'] for o in host]) > 0
  preds = {k: np.concatenate([o[k] for o in host])[keep] for k in host[0] if k != 'mask'}
  return split_metrics(preds), preds


def split_metrics(preds: Mapping[str, np.ndarray]) -> dict[str, float]:
  metrics = regression_metrics(preds['pred'], preds['label'])
  metrics['Loss'] = float(np.mean(np.abs(preds['pred'] - preds['label']), dtype=np.float64))
  return metrics


def train_and_evaluate(run, workdir: str, *, progress: bool = True,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains the first seed of `run` in `workdir` (resuming an interrupted run there) and
  returns its result: test metrics at its best validation epoch."""
  run_config.validate_run(run)
  run_config.setup_compile_cache(run)
  cfg, init = run_config.model(run)
  data = inputs.open_data(run)
  return train_run(run, cfg, init, Member(run.seeds[0], workdir), data, progress=progress,
                   log=log)


def train_run(run, cfg: DMDConfig, init_params: Callable[[int], Any], member: Member,
              data: Data, *, devices=None, progress: bool = False,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """`member` trained to its early stop (or `run.max_epochs`) on `devices` (default: all)."""
  loader = data.train[member.seed]
  out = SeedOutputs(member.workdir, member.seed, epochs=run.max_epochs,
                    steps_per_epoch=loader.num_batches, progress=progress,
                    figures=run.get('figures', True), log=log)
  done = out.finished()
  if done is not None:
    return done
  mesh = Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))
  steps = cached_run_steps(cfg, mesh)
  compiled_before = dict(steps.traces)
  tx = cached_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  lr = member.hparams.get('learning_rate', run.learning_rate)
  weights = {n: v for n, v in member.hparams.items() if n != 'learning_rate'}
  state = create_train_state(init_params(member.seed), tx, weights)
  state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr))
  protocol = Protocol(Plateau(lr, patience=run.patience), run.early_stop, run.max_epochs)
  latest = checkpoints.checkpoint_manager(os.path.join(member.workdir, 'checkpoints'),
                                          run.keep_checkpoints)
  best_mngr = checkpoints.checkpoint_manager(os.path.join(member.workdir, 'best'), 1)
  meta = {'epoch': 0, 'history': [], 'seed': member.seed, **protocol.meta()}
  epoch = newest_intact(latest, member.name, out.log)
  if epoch:
    state, meta = resume(latest, epoch, state, protocol, loader, member.name, out.log)
  state = jax.device_put(jax.device_get(state), steps.replicated)
  best = None                                   # host copy of the best parameters so far
  rng = steps.key(np.uint32(member.seed))
  out.start(epoch)

  stop = False
  while not stop:
    epoch += 1
    t0 = time.time()
    where = (f'epoch {epoch}; the last good state is epoch {epoch - 1}\'s checkpoint in '
             f'{latest.directory} (its digests verified at resume)' if epoch > 1 else
             f'epoch {epoch}; no checkpoint was saved yet')
    state = steps.reset_window(state)   # the reference drops an epoch's partial window
    # the loader counts epochs from 0: training epoch `epoch` reads its epoch `epoch` - 1
    state, sums, count = train_epoch(steps, state, loader.epoch(epoch - 1), rng, run.log_every,
                                     out.step, where)
    (v_metrics, v_out), (t_metrics, t_out) = (evaluate(steps, state.params, data.valid),
                                              evaluate(steps, state.params, data.test))
    if not np.isfinite(v_metrics['Loss']):
      raise FloatingPointError(f'non-finite validation loss of {member.name} in {where} '
                               '(before this epoch)')
    old_lr = float(jax.device_get(state.opt_state.inner.hyperparams['learning_rate']))
    new_lr, improved, stop = protocol.update(epoch, v_metrics['Loss'])
    if new_lr != old_lr:
      state = steps.set_lr(state, np.float32(new_lr))
    if improved:
      best = jax.device_get(state.params)
      checkpoints.save_state(best_mngr, epoch, best,
                             {'epoch': epoch, 'valid': v_metrics, 'seed': member.seed})
    record = epoch_record(epoch, old_lr, sums, count, v_metrics, t_metrics, v_out, t_out,
                          loader.global_batch_size, protocol.best_epoch, t0)
    meta['history'].append(record)
    meta.update(epoch=epoch, loader=data_order(loader, epoch), **protocol.meta())
    checkpoints.save_state(latest, epoch, jax.device_get(state), meta)
    out.epoch(record, meta['history'], improved)

  if best is None:        # resumed after the best epoch: its parameters are in best/
    best = best_params(best_mngr, jax.device_get(state.params))
  metrics, preds = evaluate(steps, jax.device_put(best, steps.replicated), data.test)
  ids = data.ids('test', preds['index'])
  result = finish_record(member, best_mngr, meta['epoch'], metrics, 1, mesh,
                         {k: v - compiled_before[k] for k, v in steps.traces.items()})
  out.finish(result, preds, ids, meta['history'], cfg)
  latest.close()
  best_mngr.close()
  return result


@functools.lru_cache(maxsize=4)
def cached_run_steps(cfg: DMDConfig, mesh: Mesh) -> RunSteps:
  """One `RunSteps` per (model config, mesh) in a process: runs one after another (the
  sequential seed mode) and evaluations of a trained run reuse the compiled steps."""
  return RunSteps(cfg, mesh)


def smoke(run, log: Callable[[str], None] = print) -> dict[str, float]:
  """A few train steps of the run's shapes on random inputs, through the run's own jitted step:
  the compile time and the time per micro-step (`python -m dmd_jax.main --config.mode=smoke`)."""
  cfg, init = run_config.model(run)
  steps = cached_run_steps(cfg, Mesh(np.asarray(jax.devices()), ('data',)))
  tx = cached_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  state = jax.device_put(create_train_state(init(0), tx), steps.replicated)
  batch = steps.put({k: np.asarray(v) for k, v in random_batch(cfg, run.batch_size).items()})
  key = steps.key(np.uint32(0))
  t0 = time.perf_counter()
  state, metrics = steps.train(state, batch, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(run.smoke_steps - 1):
    state, metrics = steps.train(state, batch, key)
  metrics = jax.device_get(metrics)
  per_step = (time.perf_counter() - t0) / max(run.smoke_steps - 1, 1)
  losses = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
  if not all(np.isfinite(v) for v in losses.values()):
    raise FloatingPointError(f'non-finite loss in smoke run: {losses}')
  log(f'first step (compile + run) {compile_s:.1f}s; then {per_step:.3f}s per micro-step at '
      f'batch {run.batch_size}; {int(jax.device_get(state.step))} micro-steps, window '
      f'{run.update_epochs}')
  log('losses: ' + ', '.join(f'{k}={v:.4f}' for k, v in losses.items()))
  return losses


def train_epoch(steps: RunSteps, state, batches: Iterable[Mapping[str, np.ndarray]], rng,
                log_every: int, on_step, where: str):
  """One pass over an epoch's training `batches`. Metrics stay on the device and are fetched
  every `log_every` steps (no host sync per step). Returns (state, summed metrics, step count)."""
  sums, count, pending = None, 0, []
  for batch in batches:
    state, metrics = steps.train(state, steps.put(batch), rng)
    pending.append(metrics)
    if len(pending) >= log_every:
      sums, count = fold(sums, count, pending)
      pending = []
      check_finite(sums, where)
    on_step()
  sums, count = fold(sums, count, pending)
  check_finite(sums, where)
  return state, sums, count


# ---- the host-side pieces a run and a group of runs share ----------------------------------------

def newest_intact(latest, name: str, log) -> int:
  """The newest epoch with an intact full-state checkpoint in `latest` (0: none saved). A
  damaged one (checkpoints.damaged) is passed over with a warning; none intact is an error."""
  saved = sorted(latest.all_steps())
  good = []
  for step in saved:
    problem = checkpoints.damaged(latest, step)
    if problem:
      log(f'warning: {name}: checkpoint of epoch {step} is damaged ({problem}); '
          'not resuming from it')
    else:
      good.append(step)
  if saved and not good:
    raise ValueError(f'{name}: no intact checkpoint in {latest.directory} (every '
                     'saved epoch is damaged, see the warnings); train it again with --fresh')
  return max(good) if good else 0


def resume(latest, epoch: int, like, protocol: Protocol, loader: Loader, name: str, log):
  """(host state, meta) of `epoch`'s checkpoint, with the protocol restored to where it was;
  later checkpoints (a run killed while saving) are deleted. The checkpoint's training data must
  be `loader`'s (the same order of every epoch)."""
  for later in [s for s in latest.all_steps() if s > epoch]:
    latest.delete(later)
  state, meta = checkpoints.restore_state(latest, epoch, like)
  check_data_order(meta['loader'], loader, f'{name}: the checkpoint of epoch {epoch} in '
                   f'{latest.directory}')
  protocol.restore(meta)
  log(f'{name}: resumed after epoch {epoch} from {latest.directory}')
  return state, meta


def data_order(loader: Loader, epochs_done: int) -> dict[str, int]:
  """What a checkpoint after `epochs_done` epochs records of its training data: the loader epoch
  a resumed run reads next and what fixes every epoch's order (seed, split size, batch)."""
  return {'epoch': epochs_done, 'seed': loader.seed, 'num_examples': loader.num_examples,
          'global_batch_size': loader.global_batch_size}


def check_data_order(saved: Mapping[str, int], loader: Loader, what: str) -> None:
  """A named error unless `loader` orders every epoch as the data `saved` (a checkpoint's
  `data_order`) did."""
  for key in ('seed', 'num_examples', 'global_batch_size'):
    if int(saved[key]) != getattr(loader, key):
      raise ValueError(f'{what} was trained on data with {key}={saved[key]}, this run has '
                       f'{getattr(loader, key)}; train it again with --fresh')


def best_params(best_mngr, like):
  """The parameters of a run's best epoch so far (its best/ checkpoint), as host arrays."""
  params, _ = checkpoints.restore_state(best_mngr, best_mngr.latest_step(), like)
  return params


def epoch_record(epoch: int, lr: float, sums: Mapping[str, Any], count: int, valid: dict,
                 test: dict, valid_out: Mapping, test_out: Mapping, batch_size: int,
                 best_epoch: int, t0: float) -> dict[str, Any]:
  """One line of a run's history (metrics.jsonl and the checkpoints' meta)."""
  train = {key: float(v) / count for key, v in sums.items() if np.ndim(v) == 0}
  return {'epoch': epoch, 'lr': lr, 'train': train, 'valid': valid, 'test': test,
          'edges': epoch_edge_stats(sums, batch_size, count, valid_out, test_out),
          'seconds': round(time.time() - t0, 2), 'best_epoch': best_epoch}


def finish_record(member: Member, best_mngr, epochs: int, test: dict, members: int, mesh: Mesh,
                  compiles: Mapping[str, int]) -> dict[str, Any]:
  """A finished run's result.json: test metrics of its best-on-valid parameters."""
  best_meta = checkpoints.restore_meta(best_mngr, best_mngr.latest_step())
  return {'seed': member.seed, 'best_epoch': best_meta['epoch'], 'epochs': epochs,
          'valid': best_meta['valid'], 'test': test, 'hparams': dict(member.hparams),
          'program': {'members': members, 'mesh': dict(mesh.shape)},
          # compilations of each jitted step by this run (1 each when shapes are stable; 0 when
          # an earlier run of this process compiled the same program)
          'compiles': dict(compiles)}


def fold(sums, count: int, pending: Sequence):
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


def check_finite(sums: Optional[Mapping[str, Any]], where: str,
                 active: Optional[np.ndarray] = None) -> None:
  """Stops on a non-finite summed loss (of an active member, for a group's sums)."""
  if sums is None:
    return
  losses = {k: np.asarray(v) for k, v in sums.items() if np.ndim(v) == (active is not None)}
  if active is None:
    bad = {k: float(v) for k, v in losses.items() if not np.isfinite(v)}
  else:
    bad = {k: float(v[i]) for k, v in losses.items() for i in np.flatnonzero(active)
           if not np.isfinite(v[i])}
  if bad:
    raise FloatingPointError(f'non-finite training loss in {where} ({bad}); stopping. '
                             'Lower config.learning_rate or check the data')
