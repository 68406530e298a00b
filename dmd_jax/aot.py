r"""Compile every program of a run for a Cloud TPU slice, from any host (no TPU needed).

    pip install -e '.[tpu]'                  # libtpu: the TPU compiler
    python -m dmd_jax.aot --topology=v5e:2x4 --config=configs/mosi.py \
        --config.seeds='(1111,1112,1113,1114,1115)' [--json=rows.jsonl] [--fit]

Prints one table row per program (train, eval, predict) and, with --json, writes one JSON line
each: compiled or the compiler's message, bytes per chip against the chip's HBM, FLOPs and bytes
per chip, and a roofline lower bound on the step (dmd_jax/training/aot.py, docs/tpu.md).
--fit also finds the largest global batch and seed count whose train step fits.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')   # compile for the slice; run nothing here
# libtpu looks for a TPU VM's metadata at start-up; on any other host these stop it trying
os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')

from dmd_jax import cli  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from dmd_jax.training import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run configuration file (configs/*.py).',
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, "TPU slice, e.g. 'v5e:2x4', 'v4:2x2x1', "
                                "'v5p:2x2x1', 'v6e:2x4', 'v5e:4x4' (multi-host)")
_PROGRAMS = flags.DEFINE_list('programs', ['train', 'eval', 'predict'], 'Programs to compile.')
_LAYOUT = flags.DEFINE_enum('layout', None, ['auto', 'replicated', 'fsdp'],
                            'Member-state layout (default: config.state_layout).')
_JSON = flags.DEFINE_string('json', None, 'Append one JSON line per program to this file.')
_FIT = flags.DEFINE_bool('fit', False, 'Also find the largest global batch (doubling from the '
                         "config's) and seed count that fit, by compiling the train step.")
_FIT_MAX_BATCH = flags.DEFINE_integer('fit_max_batch', 1024, 'Largest global batch --fit tries.')
_FIT_MAX_SEEDS = flags.DEFINE_integer('fit_max_seeds', 16, 'Largest seed count --fit tries.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise app.UsageError('--config and --topology are required, e.g. --topology=v5e:2x4 '
                         '--config=configs/mosi.py')

  rows = []

  def show(row):                  # each program as soon as it is compiled (minutes each)
    if not rows:
      print(row['note'])
      print(aot.table_header())
    rows.append(row)
    print(aot.format_row(row), flush=True)
    if _JSON.value:
      with open(_JSON.value, 'a') as f:
        f.write(json.dumps(row) + '\n')

  try:
    aot.compile_programs(_CONFIG.value, _TOPOLOGY.value, programs=_PROGRAMS.value,
                         layout=_LAYOUT.value, on_row=show)
  except RuntimeError as e:      # no TPU compiler here (bad flags: ValueError, exit 2)
    cli.fail(e)
  if _FIT.value:
    found = aot.fit(_CONFIG.value, _TOPOLOGY.value, max_batch=_FIT_MAX_BATCH.value,
                    max_seeds=_FIT_MAX_SEEDS.value, layout=_LAYOUT.value)
    print(json.dumps(found))
    if _JSON.value:
      with open(_JSON.value, 'a') as f:
        f.write(json.dumps(found) + '\n')
  if not all(r.get('compiled') is True and r['fits'] for r in rows):
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
