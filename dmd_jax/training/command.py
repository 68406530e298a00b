"""The command `python -m dmd_jax.main`, as one library function: `run_command(run, workdir)`
trains (every seed, the results table, a model bundle), evaluates a trained run or smoke-tests
the step, holding the run folder's lock; multi-host runs start `jax.distributed` first.
"""

from __future__ import annotations

import contextlib
import os

from absl import logging
import jax

from dmd_jax import lock
from dmd_jax.training import experiment, inputs
from dmd_jax.training.export import write_bundle
from dmd_jax.training.run_config import move_run_aside, stored_for_eval, validate_run
from dmd_jax.training.train import smoke


def run_command(run, workdir: str | None, *, fresh: bool = False, verbose: bool = False) -> None:
  """What `python -m dmd_jax.main --config=... --workdir=...` does with the parsed run config:
  `run.mode` 'train', 'eval' or 'smoke' (no workdir). `fresh` moves a run already in `workdir`
  aside first; `verbose` keeps orbax's and TFDS's INFO logs."""
  if run.mode == 'smoke':
    smoke(run)
    return
  if not workdir:
    raise ValueError('--workdir is required for training and evaluation')
  validate_run(run)
  start_distributed(run)
  if jax.process_index() != 0 or not verbose:
    logging.set_verbosity(logging.WARNING)     # orbax/TFDS chatter; --verbosity=0 shows it
  logging.info('config:\n%s', run)
  show = print if jax.process_index() == 0 else (lambda *_: None)
  new = not os.path.exists(workdir)
  # One command at a time per run folder (process 0 holds the lock for a multi-host run).
  held = (lock.hold(os.path.join(workdir, '.lock'), f'the run folder {workdir}')
          if jax.process_index() == 0 else contextlib.nullcontext())
  try:
    with held:
      _run_in(run, workdir, fresh, show)
  finally:
    if new:      # a command that failed before writing leaves no empty folder behind
      with contextlib.suppress(OSError):
        os.rmdir(workdir)


def start_distributed(run) -> None:
  if not run.distributed:
    return
  kw = {}
  if run.coordinator_address:
    kw = dict(coordinator_address=run.coordinator_address, num_processes=run.num_processes,
              process_id=run.process_id)
  jax.distributed.initialize(**kw)


def _run_in(run, workdir: str, fresh: bool, show) -> None:
  """The command in `workdir`, holding its lock."""
  if run.mode == 'eval':
    stored, ignored = stored_for_eval(run, workdir)
    if ignored:
      show(f"eval uses the run's stored config; this command's {'; '.join(ignored)} "
           '(stored -> command) are ignored')
    inputs.prepare_synthetic(stored)
    experiment.run_eval(stored, workdir, log=show)
    return
  if fresh and jax.process_index() == 0:
    moved = move_run_aside(workdir)
    if moved:
      show(f'--fresh: moved the earlier run in {workdir} to {moved}')
  train(run, workdir, show)


def train(run, workdir: str, show) -> None:
  inputs.prepare_synthetic(run)     # a synthetic config's dataset, made once
  table = experiment.run_training(run, workdir, progress=run.progress and
                                  jax.process_index() == 0, log=show)
  m = table['mean_std']
  show(f"test over {len(table['seeds'])} seed(s): " + ', '.join(
      f"{k} {m[k]['mean']:.4f}±{m[k]['std']:.4f}" for k in ('Non0_acc_2', 'Non0_F1_score',
                                                           'Mult_acc_7', 'MAE', 'Corr')))
  show(f'results: {workdir}/results.md')
  if run.bundle and jax.process_index() == 0:
    make_bundle(run, workdir, show)


def make_bundle(run, workdir: str, show) -> None:
  """The best seed as a model bundle in WORKDIR/<run.bundle> (not for sweeps: choose a member
  and run python -m dmd_jax.bundle on its folder)."""
  if any(run.sweep.values()):
    show('sweep: no bundle made; bundle a member with python -m dmd_jax.bundle '
         '--run=WORKDIR/<member>')
    return
  out = os.path.join(workdir, run.bundle)
  try:
    write_bundle(workdir, out, overwrite=True)
  except FileNotFoundError as e:     # e.g. a random text encoder and no vocabulary installed
    show(f'no bundle made: {e}')
    return
  show(f'bundle: {out} (python -m dmd_jax.predict --bundle={out} --input=... --output=...)')
