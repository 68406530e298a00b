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

from absl import app, flags
from ml_collections import config_flags

from dmd_jax import cli
from dmd_jax.training.command import run_command

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run configuration file (configs/*.py).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
_FRESH = flags.DEFINE_bool('fresh', False, 'Move a run already in --workdir aside (into '
                           'WORKDIR.replaced-<time>) and train from scratch.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/demo.py')
  if _CONFIG.value.mode != 'smoke' and not _WORKDIR.value:
    raise app.UsageError('--workdir is required for training and evaluation')
  run_command(_CONFIG.value, _WORKDIR.value, fresh=_FRESH.value,
              verbose=flags.FLAGS['verbosity'].present)


if __name__ == '__main__':
  cli.run(main)
