"""`Predictor`: a bundle's model applied to new samples.

    p = Predictor.from_bundle('bundles/mosi')   # a training run: training.export.predictor_for_run
    out = p.predict(texts, audio, vision)               # lists of str and (T, D) arrays
    out['score'], out['class_2'], out['class_7'], out['edges_homo'], out['edges_hetero']

Texts go through the bundle's tokenizer exactly as data prep tokenized the training data; audio and
vision are checked and padded to the bundle's contract (`inputs.fit_features`). Batches have one
fixed size (the last is zero-padded and its padding dropped), so the forward pass is compiled once.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from dmd_jax import schema
from dmd_jax.analysis.metrics import class_2, class_7
from dmd_jax.fileio import atomic_write, savez
from dmd_jax.inference import inputs
from dmd_jax.inference.bundle import Bundle, load_bundle
from dmd_jax.model import predict_step
from dmd_jax.schema import EDGE_NAMES, MODALITIES


class Predictor:
  """Scores and edge matrices of a bundled model for new samples."""

  def __init__(self, bundle: Bundle, batch_size: int = 32):
    if batch_size < 1:
      raise ValueError(f'batch_size={batch_size}: must be >= 1')
    self.bundle, self.batch_size = bundle, int(batch_size)
    self.config, self.contract = bundle.config, bundle.contract
    self.params = jax.device_put(bundle.params)
    self._forward = predict_step(self.config, jax.devices()[0].platform)   # the default device

  @classmethod
  def from_bundle(cls, path: str, batch_size: int = 32) -> 'Predictor':
    return cls(load_bundle(path), batch_size)

  @property
  def compiles(self) -> int:
    return self._forward._cache_size()  # pylint: disable=protected-access

  def predict(self, texts: Sequence[str], audio: Sequence[np.ndarray],
              vision: Sequence[np.ndarray], *, ids: Optional[Sequence[str]] = None,
              strict: bool = False, progress: bool = False) -> dict[str, Any]:
    """Per sample: 'score' (N,) in [-3, 3], 'class_2', 'class_7' and, per GD-Unit, 'edges_homo'
    / 'edges_hetero' (N, 3, 3) indexed [source, target] over (L, V, A)."""
    if not len(texts) == len(audio) == len(vision):
      raise inputs.InputError(f'{len(texts)} texts, {len(audio)} audio and {len(vision)} vision '
                              'arrays: one of each per sample')
    ids = [str(i) for i in (ids if ids is not None else range(len(texts)))]
    return self.predict_samples(inputs.Samples(ids, list(audio), list(vision),
                                               texts=list(texts), source='predict()'),
                                strict=strict, progress=progress)

  def predict_samples(self, samples: inputs.Samples, *, strict: bool = False,
                      progress: bool = False) -> dict[str, Any]:
    if len(samples) == 0:
      raise inputs.InputError(f'{samples.source}: no samples')
    feats = inputs.fit_features(samples, self.contract, strict=strict)
    if samples.text_bert is not None:
      text = np.asarray(samples.text_bert, np.float32)
      want = (len(samples), 3, self.contract['text']['max_tokens'])
      if text.shape != want:
        raise inputs.InputError(f"{samples.source}: 'text_bert' has shape {text.shape}, "
                                f'expected {want}')
      problem = schema.text_bert_problem(text, self.config.bert.vocab_size)
      if problem:
        (i, row, pos), what = problem
        raise inputs.InputError(f"{samples.source}: sample {samples.ids[i]!r}, field 'text_bert'"
                                f" (row {row}, position {pos}): {what} (the bundle's encoder)")
    else:
      text = inputs.tokenize(samples.texts, self.bundle.tokenizer,
                             self.contract['text']['max_tokens'], ids=samples.ids,
                             source=samples.source, strict=strict)
    n, b = len(samples), self.batch_size
    outs = []
    starts = range(0, n, b)
    for s in tqdm(starts, total=len(starts), unit='batch', disable=not progress):
      batch = {'text': text[s:s + b], 'audio': feats['audio'][s:s + b],
               'vision': feats['vision'][s:s + b]}
      real = len(batch['text'])
      batch = {k: np.concatenate([v, np.zeros((b - real,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}             # one shape: one compile
      batch['labels'] = np.zeros((b, 1), np.float32)
      outs.append((real, self._forward(self.params, batch)))
    host = jax.device_get([o for _, o in outs])
    result = {k: np.concatenate([h[k][:real] for (real, _), h in zip(outs, host)])
              for k in host[0]}
    bad = ~np.isfinite(result['score'])
    if bad.any():
      which = [samples.ids[i] for i in np.flatnonzero(bad)[:5]]
      raise FloatingPointError(f'{samples.source}: the model gave no finite score for '
                               f'{int(bad.sum())} sample(s) ({which}); nothing was written')
    result['class_2'], result['class_7'] = class_2(result['score']), class_7(result['score'])
    result['id'] = list(samples.ids)
    if samples.labels is not None:
      result['label'] = np.asarray(samples.labels, np.float32)
    return result


def predict_files(bundle: str, input_path: str, output: str, *, edges: Optional[str] = None,
                  strict: bool = False, batch_size: int = 32, split: str = 'test',
                  progress: bool = False) -> int:
  """`python -m dmd_jax.predict`: the samples of `input_path` scored with the bundle, written to
  the CSV `output` (and their edge matrices to the .npz `edges`); returns the sample count."""
  predictor = Predictor.from_bundle(bundle, batch_size)
  samples = inputs.read_input(input_path, split)
  result = predictor.predict_samples(samples, strict=strict, progress=progress)
  write_outputs(result, output, edges)
  return len(samples)


def write_outputs(result, output: str, edges: str | None = None) -> None:
  """The predictions CSV (id, score, class_2, class_7[, label]) and the edges .npz, atomically."""
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
