"""Synthetic MMSA-format pickles with a known ground truth.

Every sample has three hidden polarities z_text, z_vision, z_audio in [-1, 1]. The transcript is real
English whose sentiment words follow z_text; the acoustic and visual frames carry their polarity
along a fixed random direction under unit Gaussian noise; the score is

    3 * (w_t z_text + w_v z_vision + w_a z_audio) / (w_t + w_v + w_a) + small noise,

clipped to [-3, 3] and put on MOSEI's 1/3 grid (mean of 3 annotators) or MOSI's 0.2 grid (mean of 5).
By default w = (1.0, 0.6, 0.3): text strongest, vision medium, audio weakest, so a model's learned
edges can be checked against a known answer. Keys, dtypes and shapes follow the real files (spec §5):
zero-padded tails, `-inf` audio entries as in MOSEI, `audio_lengths`/`vision_lengths` in unaligned
files. Deterministic for a seed.

The command: python -m data_prep.synthetic --dataset=mosi --aligned=false --out=PATH --sizes=64,16,16
"""

from __future__ import annotations

import os
import pickle
from typing import Sequence

import numpy as np

from dmd_jax.data import mmsa_format
from dmd_jax.data.text import default_vocab, tokenizer  # noqa: F401  (default_vocab: API)
from dmd_jax.fileio import atomic_open

TEXT_FEATURE_DIM = 768

_WORDS = {  # polarity level -> sentiment words (bert-base-uncased has each as one word piece)
    -2: ['awful', 'terrible', 'horrible', 'dreadful', 'painful', 'disgusting', 'pathetic'],
    -1: ['boring', 'dull', 'weak', 'messy', 'annoying', 'disappointing', 'bland'],
    0: ['okay', 'average', 'ordinary', 'normal', 'standard', 'typical', 'fair'],
    1: ['good', 'nice', 'pleasant', 'solid', 'enjoyable', 'fun', 'decent'],
    2: ['amazing', 'wonderful', 'brilliant', 'fantastic', 'excellent', 'beautiful', 'perfect'],
}
_NOUNS = ['movie', 'story', 'acting', 'ending', 'music', 'plot', 'cast', 'script', 'dialogue',
          'soundtrack', 'director', 'scene', 'characters', 'camera work', 'pacing']
_OPINION = ['the {n} was {w}', 'i thought the {n} was really {w}', 'honestly the {n} felt {w}',
            'overall it was {w}', 'the {n} and the {m} were both {w}', 'i found it {w}',
            'to be honest the {n} is {w}', 'my friends said the {n} was {w} and i agree']
_NEUTRAL = ['i saw it last {d}', 'we went to the theater on {d}', 'it is about two hours long',
            'i watched it with my family', 'the trailer came out in {mo}',
            'there is a sequel coming', 'it was based on a book', 'i had heard about it before']
_DAYS = ['monday', 'tuesday', 'friday', 'saturday', 'sunday', 'weekend', 'night']
_MONTHS = ['january', 'march', 'june', 'august', 'october', 'december']
_ID_CHARS = np.array(list('abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-'))


def _sentence(rs: np.random.Generator, z: float) -> str:
  level = int(np.clip(np.round(z * 2.5), -2, 2))
  parts = []
  for _ in range(rs.integers(1, 3)):
    parts.append(str(rs.choice(_NEUTRAL)).format(d=rs.choice(_DAYS), mo=rs.choice(_MONTHS)))
  for _ in range(rs.integers(1, 3)):
    n, m = rs.choice(_NOUNS, 2, replace=False)
    lv = level if rs.random() < 0.8 else int(np.clip(level + rs.choice([-1, 1]), -2, 2))
    parts.append(str(rs.choice(_OPINION)).format(n=n, m=m, w=rs.choice(_WORDS[lv])))
  rs.shuffle(parts)
  return ' '.join(p.capitalize() + '.' for p in parts)


def _scores(rs, z: np.ndarray, weights: Sequence[float], dataset: str) -> np.ndarray:
  w = np.asarray(weights, np.float64)
  clean = 3.0 * (z @ w) / w.sum()
  annotators = 3 if dataset == 'mosei' else 5
  votes = np.clip(np.round(clean[:, None] + rs.normal(0, 0.4, (len(z), annotators))), -3, 3)
  return (votes.sum(1) / annotators).astype(np.float32)   # MOSEI: k/3, MOSI: k/5


def _frames(rs, z: np.ndarray, lengths: np.ndarray, t: int, d: int, direction: np.ndarray,
            block: int = 256) -> np.ndarray:
  out = np.empty((len(z), t, d), np.float32)
  for s in range(0, len(z), block):
    e = min(len(z), s + block)
    x = rs.standard_normal((e - s, t, d), dtype=np.float32)
    x += (z[s:e, None, None] * 2.0).astype(np.float32) * direction[None, None]
    x *= np.arange(t)[None, :, None] < lengths[s:e, None, None]   # zero-padded tails
    out[s:e] = x
  return out


def generate_split(rs: np.random.Generator, tok, n: int, dataset: str, aligned: bool,
                   weights: Sequence[float], neg_inf_fraction: float, text_features: bool,
                   directions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  shapes = mmsa_format.expected_shapes(dataset, aligned)
  (t_a, d_a), (t_v, d_v) = shapes['audio'], shapes['vision']
  z = rs.uniform(-1, 1, (n, 3))                   # text, vision, audio
  texts = [_sentence(rs, zt) for zt in z[:, 0]]
  enc = tok(texts, padding='max_length', truncation=True, max_length=mmsa_format.TEXT_LEN,
            return_tensors='np')
  text_bert = np.stack([enc['input_ids'], enc['attention_mask'], enc['token_type_ids']],
                       axis=1).astype(np.float32)
  n_tok = enc['attention_mask'].sum(1)
  if aligned:   # word-aligned features cover the transcript, zero after it
    len_a = len_v = np.minimum(n_tok, t_a)
  else:
    len_a = rs.integers(t_a // 4, t_a + 1, n)
    len_v = rs.integers(t_v // 4, t_v + 1, n)
  audio = _frames(rs, z[:, 2], len_a, t_a, d_a, directions['audio'])
  vision = _frames(rs, z[:, 1], len_v, t_v, d_v, directions['vision'])
  if neg_inf_fraction > 0:   # like MOSEI's COVAREP features: -inf in a few columns of real frames
    cols = directions['inf_cols']
    for s in range(0, n, 256):
      blk = audio[s:s + 256][:, :, cols]
      hit = (rs.random(blk.shape) < neg_inf_fraction) & (blk != 0)
      blk[hit] = -np.inf
      audio[s:s + 256][:, :, cols] = blk
  labels = _scores(rs, z[:, [0, 1, 2]], weights, dataset)
  vids = [''.join(rs.choice(_ID_CHARS, 11)) for _ in range(n)]
  out = {
      'id': np.array([f'{v}$_${rs.integers(1, 40)}' for v in vids], dtype=object),
      'raw_text': np.array(texts, dtype=object),
      'audio': audio, 'vision': vision,
      'text_bert': text_bert,
      'regression_labels': labels,
      'classification_labels': (np.sign(labels) + 1).astype(np.float32),
      'annotations': np.array([('Negative', 'Neutral', 'Positive')[int(np.sign(y)) + 1]
                               for y in labels], dtype=object),
  }
  if text_features:   # stand-ins for MMSA's pre-extracted BERT features (unused by DMD)
    table = directions['text_table']
    ids = enc['input_ids'] % len(table)
    out['text'] = (table[ids] * enc['attention_mask'][..., None]).astype(np.float32)
  if not aligned:
    out['audio_lengths'] = len_a.astype(np.int64)
    out['vision_lengths'] = len_v.astype(np.int64)
  return out


def generate(dataset: str, aligned: bool, sizes: Sequence[int] | None = None, *, seed: int = 0,
             vocab: str | None = None, weights: Sequence[float] = (1.0, 0.6, 0.3),
             neg_inf_fraction: float | None = None, text_features: bool = True) -> dict:
  """A synthetic MMSA pickle's contents. `sizes` = (train, valid, test), default the real sizes;
  `weights` = influence of (text, vision, audio) on the score; `neg_inf_fraction` of audio
  entries in three columns become -inf (default: 0.01 for MOSEI, none for MOSI)."""
  dataset, aligned = mmsa_format.check_setting(dataset, aligned)
  sizes = tuple(sizes or mmsa_format.SPLIT_SIZES[dataset])
  if len(sizes) != 3 or min(sizes) < 1:
    raise ValueError(f'sizes must be three positive split sizes (train, valid, test), got {sizes}')
  if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
    raise ValueError(f'weights must be three non-negative (text, vision, audio) values, '
                     f'not all zero; got {tuple(weights)}')
  if neg_inf_fraction is None:
    neg_inf_fraction = 0.01 if dataset == 'mosei' else 0.0
  tok = tokenizer(vocab)
  rs = np.random.default_rng(seed)
  d_a, d_v = mmsa_format.AV_DIMS[dataset]
  unit = lambda v: (v / np.linalg.norm(v)).astype(np.float32)
  directions = {'audio': unit(rs.normal(size=d_a)), 'vision': unit(rs.normal(size=d_v)),
                'inf_cols': np.sort(rs.choice(d_a, min(3, d_a), replace=False)),
                'text_table': rs.normal(0, 0.5, (1024, TEXT_FEATURE_DIM)).astype(np.float32)}
  return {split: generate_split(np.random.default_rng([seed, i]), tok, n, dataset, aligned,
                                weights, neg_inf_fraction, text_features, directions)
          for i, (split, n) in enumerate(zip(mmsa_format.SPLITS, sizes))}


def write_pickle(data: dict, path: str | os.PathLike) -> str:
  """Write atomically (temp file in the same folder, then rename)."""
  path = os.path.abspath(os.fspath(path))
  with atomic_open(path) as f:
    pickle.dump(data, f, protocol=4)
  return path
