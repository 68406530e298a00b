r"""Convert an MMSA pickle (CMU-MOSI / CMU-MOSEI) into a sharded TFDS dataset.

    python -m data_prep.mmsa --dataset=mosi --aligned=false \
        --pickle=MOSI/Processed/unaligned_50.pkl --data_dir=~/tensorflow_datasets
    # -> ~/tensorflow_datasets/mmsa/mosi_unaligned/1.0.0/

Options: --file_format=tfrecord (needs tensorflow-cpu), --num_shards=N (per split),
--nonfinite=zero (zero NaN/inf left after the reference's audio -inf -> 0 rule), --overwrite,
--nocheck_sha256.
"""

import sys

from absl import app, flags, logging
import tensorflow_datasets as tfds

from dmd_jax import cli
from dmd_jax.data import builder, mmsa_format


def _define_flags():
  flags.DEFINE_enum('dataset', None, list(mmsa_format.DATASETS), 'Which dataset the pickle holds.')
  flags.DEFINE_bool('aligned', None, 'aligned_50.pkl (true) or unaligned_50.pkl (false).')
  flags.DEFINE_string('pickle', None, 'Path of the MMSA pickle.')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir to write into.')
  flags.DEFINE_enum('file_format', 'array_record', list(builder.FILE_FORMATS), 'Shard format.')
  flags.DEFINE_integer('num_shards', None, 'Shards per split (default: by size).')
  flags.DEFINE_enum('nonfinite', 'error', list(mmsa_format.NONFINITE_MODES),
                    'What to do with NaN/inf beyond the reference rule (audio -inf -> 0).')
  flags.DEFINE_bool('check_sha256', True, "Compare the pickle's SHA-256 with MMSA's.")
  flags.DEFINE_bool('overwrite', False, 'Replace an existing prepared dataset.')
  flags.mark_flags_as_required(['dataset', 'aligned', 'pickle', 'data_dir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  logging.set_verbosity(logging.INFO)
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()     # progress bars only on a terminal
  out = builder.prepare(f.pickle, f.dataset, f.aligned, f.data_dir, file_format=f.file_format,
                        num_shards=f.num_shards, nonfinite=f.nonfinite,
                        check_sha256=f.check_sha256, overwrite=f.overwrite)
  print(out)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
