r"""Write a synthetic MMSA-format pickle with a known ground truth (dmd_jax.data.synthetic says how
it is made).

    python -m data_prep.synthetic --dataset=mosi --aligned=false --out=/tmp/mosi_unaligned.pkl \
        --sizes=64,16,16
"""

from absl import app, flags

from dmd_jax import cli
from dmd_jax.data import mmsa_format
from dmd_jax.data.synthetic import generate, write_pickle


def _define_flags():
  flags.DEFINE_enum('dataset', None, list(mmsa_format.DATASETS), 'Dataset whose format to copy.')
  flags.DEFINE_bool('aligned', None, 'aligned_50.pkl (true) or unaligned_50.pkl (false) layout.')
  flags.DEFINE_string('out', None, 'Path of the pickle to write.')
  flags.DEFINE_list('sizes', None, 'train,valid,test sizes (default: the real split sizes).')
  flags.DEFINE_integer('seed', 0, 'Random seed; the same seed gives the same file.')
  flags.DEFINE_string('vocab', None, 'bert-base-uncased vocab.txt (default: the MiniLM one).')
  flags.DEFINE_list('weights', ['1.0', '0.6', '0.3'], 'Influence of text,vision,audio on scores.')
  flags.DEFINE_float('neg_inf_fraction', None, 'Fraction of -inf audio entries (default: MOSEI '
                     '0.01 in three columns, MOSI none).')
  flags.DEFINE_bool('text_features', True, "Include the (N, 50, 768) 'text' features key.")
  flags.mark_flags_as_required(['dataset', 'aligned', 'out'])


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  try:
    sizes = [int(s) for s in f.sizes] if f.sizes else None
    weights = [float(w) for w in f.weights]
  except ValueError as e:
    raise app.UsageError(f'--sizes and --weights take comma-separated numbers: {e}') from e
  data = generate(f.dataset, f.aligned, sizes, seed=f.seed, vocab=f.vocab, weights=weights,
                  neg_inf_fraction=f.neg_inf_fraction, text_features=f.text_features)
  print(write_pickle(data, f.out))


if __name__ == '__main__':
  _define_flags()
  cli.run(_main)
