r"""Entry point: predict sentiment scores (and edges) for new samples with a model bundle.

    python -m dmd_jax.predict --bundle=bundles/demo --input=samples.jsonl --output=preds.csv \
        [--edges=edges.npz] [--strict] [--batch_size=32] [--split=test]

Inputs: JSONL or CSV (id, text, audio, vision: paths to .npy, file.npz:key, or inline lists),
.npz (text, audio, vision arrays, optional id, *_lengths, label) or an MMSA pickle split. Output:
one CSV row per sample (id, score, class_2, class_7, and label when the input has labels),
written atomically; with --edges, the per-sample (N, 3, 3) edge matrices of both GD-Units.
Sequences longer than the bundle's contract are cut with a warning, or refused with --strict.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

from dmd_jax import cli
from dmd_jax.inference.predictor import predict_files

_BUNDLE = flags.DEFINE_string('bundle', None, 'Bundle folder (python -m dmd_jax.bundle).')
_INPUT = flags.DEFINE_string('input', None, 'Samples: .jsonl, .csv, .npz or an MMSA .pkl.')
_OUTPUT = flags.DEFINE_string('output', None, 'CSV of predictions to write.')
_EDGES = flags.DEFINE_string('edges', None, 'Also write per-sample edge matrices to this .npz.')
_STRICT = flags.DEFINE_bool('strict', False, 'Refuse sequences longer than the contract instead '
                            'of cutting them.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Samples per forward pass.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Split of an MMSA pickle input.')
_PROGRESS = flags.DEFINE_bool('progress', None, 'Progress bar (default: on a terminal).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name, flag in (('bundle', _BUNDLE), ('input', _INPUT), ('output', _OUTPUT)):
    if not flag.value:
      raise app.UsageError(f'--{name} is required')
  logging.set_verbosity(logging.WARNING)
  progress = sys.stderr.isatty() if _PROGRESS.value is None else _PROGRESS.value
  n = predict_files(_BUNDLE.value, _INPUT.value, _OUTPUT.value, edges=_EDGES.value,
                    strict=_STRICT.value, batch_size=_BATCH.value, split=_SPLIT.value,
                    progress=progress)
  print(f'{n} sample(s) -> {os.path.abspath(_OUTPUT.value)}'
        + (f' and {os.path.abspath(_EDGES.value)}' if _EDGES.value else ''))


if __name__ == '__main__':
  cli.run(main)
