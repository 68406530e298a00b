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

import csv
import io
import os
import sys

from absl import app, flags, logging
import numpy as np

from dmd_jax import cli
from dmd_jax.fileio import atomic_write, savez
from dmd_jax.inference import inputs
from dmd_jax.inference.predictor import Predictor
from dmd_jax.schema import EDGE_NAMES, MODALITIES

_BUNDLE = flags.DEFINE_string('bundle', None, 'Bundle folder (python -m dmd_jax.bundle).')
_INPUT = flags.DEFINE_string('input', None, 'Samples: .jsonl, .csv, .npz or an MMSA .pkl.')
_OUTPUT = flags.DEFINE_string('output', None, 'CSV of predictions to write.')
_EDGES = flags.DEFINE_string('edges', None, 'Also write per-sample edge matrices to this .npz.')
_STRICT = flags.DEFINE_bool('strict', False, 'Refuse sequences longer than the contract instead '
                            'of cutting them.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Samples per forward pass.')
_SPLIT = flags.DEFINE_string('split', 'test', 'Split of an MMSA pickle input.')
_PROGRESS = flags.DEFINE_bool('progress', None, 'Progress bar (default: on a terminal).')


def write_outputs(result, output: str, edges: str | None = None) -> None:
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator='\n')
  has_label = 'label' in result
  w.writerow(['id', 'score', 'class_2', 'class_7'] + (['label'] if has_label else []))
  for i, sid in enumerate(result['id']):
    w.writerow([sid, f"{result['score'][i]:.6g}", result['class_2'][i],
                int(result['class_7'][i])] + ([f"{result['label'][i]:.6g}"] if has_label else []))
  if edges:   # first, so that a failure leaves no CSV that claims success
    savez(edges, id=np.asarray(result['id'], dtype=str), edges_homo=result['edges_homo'],
          edges_hetero=result['edges_hetero'], modalities=np.asarray(MODALITIES, dtype=str),
          edge_names=np.asarray(EDGE_NAMES, dtype=str))
  atomic_write(output, buf.getvalue())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name, flag in (('bundle', _BUNDLE), ('input', _INPUT), ('output', _OUTPUT)):
    if not flag.value:
      raise app.UsageError(f'--{name} is required')
  logging.set_verbosity(logging.WARNING)
  predictor = Predictor.from_bundle(_BUNDLE.value, _BATCH.value)
  samples = inputs.read_input(_INPUT.value, _SPLIT.value)
  progress = sys.stderr.isatty() if _PROGRESS.value is None else _PROGRESS.value
  result = predictor.predict_samples(samples, strict=_STRICT.value, progress=progress)
  write_outputs(result, _OUTPUT.value, _EDGES.value)
  print(f'{len(samples)} sample(s) -> {os.path.abspath(_OUTPUT.value)}'
        + (f' and {os.path.abspath(_EDGES.value)}' if _EDGES.value else ''))


if __name__ == '__main__':
  cli.run(main)
