r"""Entry point: a trained run's best parameters as a self-contained model bundle.

    python -m dmd_jax.bundle --run=/tmp/dmd_demo --out=bundles/demo [--seed=1111] [--vocab=PATH]

Default seed: the run's seed with the lowest validation L1. The bundle holds the parameters, the
model and text encoder configs, the tokenizer's files, the input contract and a model card
(README.md); `python -m dmd_jax.predict --bundle=DIR` needs nothing else. See docs/predict.md.
"""

from __future__ import annotations

from absl import app, flags, logging

from dmd_jax import cli
from dmd_jax.training.export import write_bundle

_RUN = flags.DEFINE_string('run', None, 'Workdir of a training run (python -m dmd_jax.main).')
_OUT = flags.DEFINE_string('out', None, 'Folder to write the bundle to (must not exist).')
_SEED = flags.DEFINE_integer('seed', None, 'Seed whose best parameters to bundle (default: the '
                             'one with the lowest validation L1).')
_VOCAB = flags.DEFINE_string('vocab', None, "vocab.txt the run's text was tokenized with "
                             "(default: the text encoder's; the embedded MiniLM's for a random "
                             'encoder).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing bundle folder.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not _RUN.value or not _OUT.value:
    raise app.UsageError('--run and --out are required')
  logging.set_verbosity(logging.WARNING)
  out = write_bundle(_RUN.value, _OUT.value, _SEED.value, vocab=_VOCAB.value,
                     overwrite=_OVERWRITE.value)
  print(f'wrote {out} (model card: {out}/README.md)')


if __name__ == '__main__':
  cli.run(main)
