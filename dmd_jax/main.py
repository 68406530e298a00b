r"""Entry point: train, evaluate or smoke-test DMD from a run config.

    python -m dmd_jax.main --config=configs/demo.py --workdir=/tmp/dmd_demo
    python -m dmd_jax.main --config=configs/mosi.py --workdir=runs/mosi \
        --config.text_encoder=/models/bert-base-uncased --config.data_dir=~/tensorflow_datasets
    python -m dmd_jax.main --config=configs/mosi.py --workdir=runs/mosi --config.mode=eval
    python -m dmd_jax.main --config=configs/smoke.py --config.mode=smoke

`train` runs every seed in `config.seeds` (resuming whatever an interrupted run left in the
workdir) and writes results.{csv,json,md}; `eval` writes metrics and predictions of
`config.eval_split` from `config.checkpoint` (default: the first seed's best params); `smoke` times
a few train steps on random inputs. Multi-host (TPU pod slices, GPU clusters): set
`--config.distributed=true` and start the same command on every host; `jax.distributed` picks up
the coordinator from the environment (TPU VMs, SLURM) or from `config.coordinator_address`,
`config.num_processes` and `config.process_id`.
"""

from __future__ import annotations

import contextlib
import os

from absl import app, flags, logging
import jax
from ml_collections import config_flags

from dmd_jax import cli, lock
from dmd_jax.training.export import write_bundle
from dmd_jax.training import experiment
from dmd_jax.training.train import smoke
from dmd_jax.training.run_config import move_run_aside, stored_for_eval, validate_run

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run configuration file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_FRESH = flags.DEFINE_bool('fresh', False, 'Move a run already in --workdir aside (into '
                           'WORKDIR.replaced-<time>) and train from scratch.')


def start_distributed(run) -> None:
  if not run.distributed:
    return
  kw = {}
  if run.coordinator_address:
    kw = dict(coordinator_address=run.coordinator_address, num_processes=run.num_processes,
              process_id=run.process_id)
  jax.distributed.initialize(**kw)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run = _CONFIG.value
  if run is None:
    raise app.UsageError('--config is required, e.g. --config=configs/demo.py')
  if run.mode == 'smoke':
    smoke(run)
    return
  if not _WORKDIR.value:
    raise app.UsageError('--workdir is required for training and evaluation')
  validate_run(run)
  start_distributed(run)
  if jax.process_index() != 0 or not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)     # orbax/TFDS chatter; --verbosity=0 shows it
  logging.info('config:\n%s', run)
  show = print if jax.process_index() == 0 else (lambda *_: None)
  workdir = _WORKDIR.value
  new = not os.path.exists(workdir)
  # One command at a time per run folder (process 0 holds the lock for a multi-host run).
  held = (lock.hold(os.path.join(workdir, '.lock'), f'the run folder {workdir}')
          if jax.process_index() == 0 else contextlib.nullcontext())
  try:
    with held:
      run_in(run, workdir, show)
  finally:
    if new:      # a command that failed before writing leaves no empty folder behind
      with contextlib.suppress(OSError):
        os.rmdir(workdir)


def run_in(run, workdir: str, show) -> None:
  """The command in `workdir`, holding its lock."""
  if run.mode == 'eval':
    stored, ignored = stored_for_eval(run, workdir)
    if ignored:
      show(f"eval uses the run's stored config; this command's {'; '.join(ignored)} "
           '(stored -> command) are ignored')
    experiment.run_eval(stored, workdir, log=show)
    return
  if _FRESH.value and jax.process_index() == 0:
    moved = move_run_aside(workdir)
    if moved:
      show(f'--fresh: moved the earlier run in {workdir} to {moved}')
  train(run, workdir, show)


def train(run, workdir: str, show) -> None:
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


if __name__ == '__main__':
  cli.run(main)
