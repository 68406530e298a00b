r"""Training and inference speed, compile time and memory of DMD at the reference sizes.

    python -m dmd_jax.benchmark                                   # the whole table (CPU ~15 min)
    python -m dmd_jax.benchmark --settings=mosi_aligned --batch_sizes=16
    python -m dmd_jax.benchmark --dtype=bfloat16 --jsonl=bench.jsonl --markdown=bench.md
    python -m dmd_jax.benchmark --drift_dir=../shared/parity --dtype=bfloat16   # precision drift
    python -m dmd_jax.benchmark --drift_dir=../shared/parity --matmul_precision=default   # TPU's
    python -m dmd_jax.benchmark --settings=mosi_aligned --batch_sizes=16 --seeds=1,2,5

Every case is one setting (dataset x alignment, the released hyper-parameters and sequence
lengths) at one global batch size, with a bert-base-sized text encoder (768 wide, 12 layers) of
random weights and random inputs in the MMSA layout. The steps are the ones training uses
(`training.steps.Steps`: jit over a mesh of every device, batch split on 'data', state donated), with
an accumulation window of 2 so that steps alternate between the two kinds:
  - micro-step: forward, every loss, backward, clipped accumulation (the common step);
  - update step: the same plus the Adam update that closes a window (once per `update_epochs`).
Measured per case: train compile (lower + compile, before the first step), the median micro-step
and update step after WARMUP_STEPS untimed steps (micro, update, micro: on the 2-core CPU the
second and third steps of a process still run ~10% slower than later ones), eval compile and
eval throughput, and peak memory (host RSS of the process on CPU, the high-water mark of device
memory elsewhere). Achieved FLOP/s use XLA's count of the micro-step's FLOPs (traced with loops
unrolled, since XLA counts a loop body once; rematerialised work is not counted) and are printed
on accelerators or with --count_flops. With --seeds=K,..., per setting and batch size also K
seeds trained together (`seed_mode='together'`: one program, the step vmapped over the members,
members spread over the mesh's 'seed' axis) against K steps of one seed, and the memory per seed
('seeds' records, a second table).

Each setting runs in its own subprocess (a clean memory high-water mark and no shared caches);
batch sizes run in increasing order inside it. One JSON line per case goes to stdout (and
--jsonl); a Markdown table follows (and goes to --markdown).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
import jax

from dmd_jax import cli
from dmd_jax import fileio
from dmd_jax.dev import measure
from dmd_jax.dev.measure import SETTINGS

_SETTINGS = flags.DEFINE_list('settings', list(SETTINGS), f'Settings to run, from {SETTINGS}.')
_BATCH_SIZES = flags.DEFINE_list('batch_sizes', ['16', '32'],
                                 'Global batch sizes (16 is the reference\'s).')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'],
                           'Compute dtype (parameters and optimizer state stay float32).')
_REPEATS = flags.DEFINE_integer('repeats', 1, 'Timed micro-steps and update steps per case '
                                '(medians are reported, every time is in the JSON lines).')
_EVAL_BATCHES = flags.DEFINE_integer('eval_batches', 2, 'Timed eval batches per case.')
_SEEDS = flags.DEFINE_list('seeds', [], 'Member counts K (e.g. 1,2,5,10): per setting and batch '
                           'size, the step of K seeds trained together against K steps of one '
                           "seed, and memory per seed ('seeds' records).")
_COUNT_FLOPS = flags.DEFINE_boolean('count_flops', None, 'Count FLOPs and report achieved '
                                    'FLOP/s (default: on for accelerators, off on CPU).')
_JSONL = flags.DEFINE_string('jsonl', None, 'Also append the JSON lines to this file.')
_MARKDOWN = flags.DEFINE_string('markdown', None, 'Also write the Markdown table to this file.')
_DRIFT_DIR = flags.DEFINE_string('drift_dir', None, 'Instead of timing: report how far --dtype '
                                  'drifts from the float32 reference on the parity fixtures in '
                                  'this folder (shared/parity).')
_MATMUL = flags.DEFINE_enum('matmul_precision', 'float32', ['float32', 'default'],
                            'With --drift_dir: the precision of float32 products (default: one '
                            'bf16 pass per product as on TPU, emulated).')
_CHILD = flags.DEFINE_string('child', None, 'Internal: run one setting in this process.')
_HUGEPAGES = flags.DEFINE_boolean(
    'hugepages', True, 'On Linux, run each setting with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 '
    '(unless GLIBC_TUNABLES is set): glibc then asks for transparent huge pages for its large '
    'allocations, such as the train step\'s ~2 GB of XLA temporaries that are mapped afresh '
    'every step (512k page faults per MOSI-unaligned step with 4 KiB pages).')


def _batch_sizes() -> list[int]:
  try:
    return [int(b) for b in _BATCH_SIZES.value]
  except ValueError as e:
    raise app.UsageError(f'--batch_sizes must be integers, got {_BATCH_SIZES.value}') from e


def _seed_counts() -> list[int]:
  try:
    return [int(k) for k in _SEEDS.value]
  except ValueError as e:
    raise app.UsageError(f'--seeds must be integers, got {_SEEDS.value}') from e


def _child(setting: str) -> None:
  count = _COUNT_FLOPS.value
  if count is None:
    count = jax.devices()[0].platform != 'cpu'
  for rec in measure.run_setting(setting, _batch_sizes(), dtype=_DTYPE.value,
                               repeats=_REPEATS.value, eval_batches=_EVAL_BATCHES.value,
                               count_flops=count, seeds=_seed_counts()):
    print('BENCH ' + json.dumps(rec), flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  if _CHILD.value:
    _child(_CHILD.value)
    return
  if _DRIFT_DIR.value:
    table = measure.drift_table(_DRIFT_DIR.value, _DTYPE.value, _MATMUL.value)
    print(table)
    if _MARKDOWN.value:
      fileio.atomic_write(_MARKDOWN.value, table + '\n')
    return
  unknown = [s for s in _SETTINGS.value if s not in SETTINGS]
  if unknown:
    raise app.UsageError(f'--settings: unknown {unknown}; choose from {list(SETTINGS)}')
  _batch_sizes()
  _seed_counts()
  passthrough = [a for a in sys.argv[1:] if not a.startswith(('--settings', '--jsonl',
                                                              '--markdown'))]
  records = measure.run_in_subprocesses(_SETTINGS.value, passthrough, jsonl=_JSONL.value,
                                        hugepages=_HUGEPAGES.value)
  table = measure.markdown_table(records)
  print('\n' + table)
  if _MARKDOWN.value:
    fileio.atomic_write(_MARKDOWN.value, table + '\n')


if __name__ == '__main__':
  cli.run(main)
