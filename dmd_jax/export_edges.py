r"""Export what the GD-Units learned for one split of a trained run.

    python -m dmd_jax.export_edges --workdir=/tmp/dmd_demo --split=test
    python -m dmd_jax.export_edges --workdir=runs/mosi --split=valid --seed=1112
    python -m dmd_jax.export_edges --workdir=W --split=test --checkpoint=imported_ckpt_dir

Writes WORKDIR/edges/edges_<split>.npz (per-sample (N, 3, 3) matrices of both units, indexed
[source, target] over (l, v, a), with index, id, label, prediction), edges_<split>_summary.json /
.csv (mean and std overall and per sentiment group, the priors and edge + prior), and
edges_<split>_heatmap.png / .svg. The run's settings come from WORKDIR/config.json.
"""

from absl import app, flags

from dmd_jax import cli
from dmd_jax.training import experiment
from dmd_jax.training.run_config import load_run_config

_WORKDIR = flags.DEFINE_string('workdir', None, 'The --workdir of a training run.')
_SPLIT = flags.DEFINE_enum('split', 'test', ['train', 'valid', 'test'], 'Which split.')
_SEED = flags.DEFINE_integer('seed', None, "Whose best params (default: the run's first seed).")
_CHECKPOINT = flags.DEFINE_string('checkpoint', '', 'A params checkpoint dir instead.')
_DATA_DIR = flags.DEFINE_string('data_dir', None, "Override the run's data_dir.")
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  run = load_run_config(_WORKDIR.value)
  if _DATA_DIR.value:
    run.data_dir = _DATA_DIR.value
  experiment.export_edges(run, _WORKDIR.value, _SPLIT.value, _SEED.value, _CHECKPOINT.value)


if __name__ == '__main__':
  cli.run(main)
