"""The MMSA pickle format of CMU-MOSI / CMU-MOSEI (spec §5): shapes, hashes, loading, validation.

A pickle holds `{'train': {...}, 'valid': {...}, 'test': {...}}`; each split maps keys to arrays
with one row per sample. `load_source` reads one, checks it completely (shapes, dtypes, row counts,
non-finite values) before anything is written, and returns an `MmsaSource` whose `example(split, i)`
yields one cleaned sample. Arrays are never copied as a whole: checks run over blocks of rows and
the float32 cast and the `-inf` fix are applied per sample, so memory stays at one copy of the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pickle
import warnings
from typing import Any, Mapping

import numpy as np

# The dataset facts (splits, lengths, widths, file names, MMSA's hashes) live in dmd_jax.schema.
from dmd_jax import fileio
from dmd_jax import schema
from dmd_jax.schema import (AV_DIMS, AV_LENS, DATASETS, FILE_NAMES, MMSA_SHA256,  # noqa: F401
                            SPLIT_SIZES, SPLITS, TEXT_LEN, check_setting, setting_name)

NONFINITE_MODES = ('error', 'zero')
_BLOCK = 512                       # rows per block when scanning large arrays

log = logging.getLogger('data_prep')


class MmsaFormatError(ValueError):
  """The pickle does not have the MMSA layout; the message names file, split, key and values."""


class HashMismatchWarning(UserWarning):
  """The pickle is not byte-identical to the MMSA release (custom features are allowed)."""


def expected_shapes(dataset: str, aligned: bool) -> dict[str, tuple[int, ...]]:
  """Per-sample shapes of the keys DMD reads."""
  t_a, t_v = AV_LENS[check_setting(dataset, aligned)]
  d_a, d_v = AV_DIMS[dataset]
  return {'text_bert': (3, TEXT_LEN), 'audio': (t_a, d_a), 'vision': (t_v, d_v)}


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while block := f.read(chunk):
      h.update(block)
  return h.hexdigest()


def check_hash(path: str | os.PathLike, dataset: str, aligned: bool) -> tuple[str, bool]:
  """SHA-256 of `path` against MMSA's published sum: logged on a match, a `HashMismatchWarning`
  naming the file otherwise. Returns (hex digest, matched)."""
  digest = sha256_of(path)
  want = MMSA_SHA256[(dataset, aligned)]
  if digest == want:
    log.info('%s: SHA-256 matches the MMSA release of %s', path, setting_name(dataset, aligned))
    return digest, True
  warnings.warn(
      f'{path}: SHA-256 {digest} differs from the MMSA release of '
      f'{setting_name(dataset, aligned)} ({want}); continuing, as custom features are allowed, '
      f'but results will not be comparable with published numbers', HashMismatchWarning,
      stacklevel=2)
  return digest, False


def load_pickle(path: str | os.PathLike) -> dict:
  """Unpickle `path`; a missing, truncated or corrupt file is an `MmsaFormatError` naming it."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'MMSA pickle not found: {path}')
  try:
    data = fileio.load_pickle(path)
  except fileio.UnsafePickleError as e:
    raise MmsaFormatError(str(e)) from e
  except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
          ImportError, IndexError, MemoryError, UnicodeDecodeError) as e:
    raise MmsaFormatError(f'{path}: not a readable pickle (truncated or corrupt?): '
                          f'{type(e).__name__}: {e}') from e
  if not isinstance(data, Mapping):
    raise MmsaFormatError(f'{path}: top level is a {type(data).__name__}, expected a dict with '
                          f'keys {list(SPLITS)}')
  missing = [s for s in SPLITS if s not in data]
  if missing:
    raise MmsaFormatError(f'{path}: missing split(s) {missing}; found keys {sorted(map(str, data))}')
  return data


@dataclasses.dataclass
class SplitArrays:
  """Validated views of one split (the pickle's own arrays, never copied)."""
  text_bert: np.ndarray
  audio: np.ndarray
  vision: np.ndarray
  label: np.ndarray
  id: np.ndarray
  raw_text: np.ndarray
  audio_length: np.ndarray | None = None
  vision_length: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.label)


@dataclasses.dataclass
class MmsaSource:
  """A loaded, validated MMSA pickle."""
  path: str
  dataset: str
  aligned: bool
  splits: dict[str, SplitArrays]
  nonfinite: str
  nonfinite_counts: dict[str, dict[str, dict[str, int]]]   # split -> modality -> kind -> count
  sha256: str | None = None
  hash_matches: bool | None = None

  @property
  def name(self) -> str:
    return setting_name(self.dataset, self.aligned)

  @property
  def has_lengths(self) -> bool:
    return self.splits['train'].audio_length is not None

  def num_examples(self) -> dict[str, int]:
    return {s: len(a) for s, a in self.splits.items()}

  def example(self, split: str, i: int) -> dict[str, Any]:
    """Sample `i` of `split` as the dataset stores it, with the reference's load-time rules."""
    a = self.splits[split]
    ex = {'text_bert': np.asarray(a.text_bert[i], np.int32),
          'audio': _clean(a.audio[i], self.nonfinite, neg_inf_to_zero=True),
          'vision': _clean(a.vision[i], self.nonfinite, neg_inf_to_zero=False),
          'label': np.float32(a.label[i]),
          'id': _as_str(a.id[i]),
          'raw_text': _as_str(a.raw_text[i])}
    if a.audio_length is not None:
      ex['audio_length'] = np.int32(a.audio_length[i])
      ex['vision_length'] = np.int32(a.vision_length[i])
    return ex

  def release(self, split: str) -> None:
    """Drop this object's references to a split's big arrays once it has been written."""
    a = self.splits[split]
    empty = lambda x: np.empty((0,) + x.shape[1:], x.dtype)
    self.splits[split] = dataclasses.replace(a, text_bert=empty(a.text_bert),
                                             audio=empty(a.audio), vision=empty(a.vision))


def _clean(x: np.ndarray, nonfinite: str, neg_inf_to_zero: bool) -> np.ndarray:
  x = np.array(x, np.float32)            # a per-sample copy
  if neg_inf_to_zero:
    x[np.isneginf(x)] = 0.0
  if nonfinite == 'zero':
    x[~np.isfinite(x)] = 0.0
  return x


def _as_str(v: Any) -> str:
  if isinstance(v, bytes):
    return v.decode('utf-8')
  if isinstance(v, np.ndarray) and v.shape == (1,):   # ids stored as 1-element arrays
    return _as_str(v[0])
  return str(v)


def _fail(path: str, split: str, key: str, what: str, expected: Any, found: Any):
  raise MmsaFormatError(f"{path}: split '{split}', key '{key}': {what}: expected {expected}, "
                        f'found {found}')


def _blocks(n: int):
  for s in range(0, n, _BLOCK):
    yield slice(s, min(n, s + _BLOCK))


def _numeric(path, split, key, arr) -> np.ndarray:
  if not isinstance(arr, np.ndarray):
    try:
      arr = np.asarray(arr)
    except Exception as e:  # ragged lists and the like
      _fail(path, split, key, 'not convertible to an array', 'a numeric array', repr(e))
  if arr.dtype.kind not in 'fiub':
    _fail(path, split, key, 'wrong dtype', 'a float or integer array', f'dtype {arr.dtype}')
  return arr


def _validate_split(path: str, split: str, d: Any, dataset: str, aligned: bool,
                    nonfinite: str) -> tuple[SplitArrays, dict[str, dict[str, int]]]:
  if not isinstance(d, Mapping):
    raise MmsaFormatError(f"{path}: split '{split}' is a {type(d).__name__}, expected a dict")
  required = ('text_bert', 'audio', 'vision', 'regression_labels', 'id', 'raw_text')
  missing = [k for k in required if k not in d]
  if missing:
    raise MmsaFormatError(f"{path}: split '{split}' lacks key(s) {missing}; found "
                          f'{sorted(map(str, d))}')
  labels = _numeric(path, split, 'regression_labels', d['regression_labels'])
  n = labels.shape[0] if labels.ndim else 0
  if labels.shape not in ((n,), (n, 1)) or n == 0:
    _fail(path, split, 'regression_labels', 'wrong shape', '(N,) or (N, 1) with N > 0',
          labels.shape)
  labels = labels.reshape(n)

  shapes = expected_shapes(dataset, aligned)
  arrays = {}
  for key, per_sample in shapes.items():
    arr = _numeric(path, split, key, d[key])
    if arr.shape[:1] != (n,):
      _fail(path, split, key, "row count disagrees with 'regression_labels'", n,
            arr.shape[0] if arr.ndim else 'a scalar')
    if arr.shape[1:] != per_sample:
      _fail(path, split, key, f'wrong shape for {setting_name(dataset, aligned)}',
            (n,) + per_sample, arr.shape)
    arrays[key] = arr
  strings = {}
  for key in ('id', 'raw_text'):
    arr = np.asarray(d[key])
    if arr.shape not in ((n,), (n, 1)):
      _fail(path, split, key, "shape disagrees with 'regression_labels'", (n,), arr.shape)
    if arr.dtype.kind not in 'OUS':
      _fail(path, split, key, 'wrong dtype', 'strings', f'dtype {arr.dtype}')
    strings[key] = arr.reshape(n)

  lengths = {}
  present = [k for k in ('audio_lengths', 'vision_lengths') if k in d]
  if len(present) == 1:
    raise MmsaFormatError(f"{path}: split '{split}' has '{present[0]}' but not its partner; "
                          "unaligned files carry both 'audio_lengths' and 'vision_lengths'")
  for key, limit in (('audio_lengths', shapes['audio'][0]), ('vision_lengths',
                                                             shapes['vision'][0])):
    if not present:
      break
    arr = _numeric(path, split, key, d[key])
    if arr.shape not in ((n,), (n, 1)):
      _fail(path, split, key, "shape disagrees with 'regression_labels'", (n,), arr.shape)
    arr = arr.reshape(n)
    bad = ~np.isfinite(arr) | (arr != np.round(arr)) | (arr < 0) | (arr > limit)
    if bad.any():
      i = int(np.argmax(bad))
      _fail(path, split, key, f'sample {i} is not an integer length in [0, {limit}]',
            f'0..{limit}', arr[i])
    lengths[key] = arr

  # Text rows must be integral word-piece ids / mask / segment values.
  tb = arrays['text_bert']
  for sl in _blocks(n):
    problem = schema.text_bert_problem(tb[sl])
    if problem:
      (i, row, pos), what = problem
      _fail(path, split, 'text_bert', f'sample {sl.start + i}, row {row}, position {pos}: {what}',
            f'word-piece ids of bert-base-uncased (< {schema.TEXT_VOCAB_SIZE}), mask and segment '
            'ids 0/1', tb[sl][i, row, pos])
  if not np.isfinite(labels).all():
    i = int(np.argmax(~np.isfinite(labels)))
    _fail(path, split, 'regression_labels', f'sample {i} is not finite', 'a finite score',
          labels[i])

  counts = {}
  for key in ('audio', 'vision'):
    arr = arrays[key]
    c = {'neg_inf': 0, 'pos_inf': 0, 'nan': 0}
    if arr.dtype.kind == 'f':
      for sl in _blocks(n):
        blk = arr[sl]
        c['neg_inf'] += int(np.count_nonzero(np.isneginf(blk)))
        c['pos_inf'] += int(np.count_nonzero(np.isposinf(blk)))
        c['nan'] += int(np.count_nonzero(np.isnan(blk)))
    # The reference zeroes audio -inf at load time; everything else is left to `nonfinite`.
    remaining = c['pos_inf'] + c['nan'] + (c['neg_inf'] if key == 'vision' else 0)
    if remaining and nonfinite != 'zero':
      _fail(path, split, key, 'non-finite values (NaN/inf) beyond the reference rule '
            '(audio -inf -> 0); pass --nonfinite=zero to zero them', 'finite values',
            f"{c['nan']} NaN, {c['pos_inf']} +inf, {c['neg_inf']} -inf")
    counts[key] = c
  split_arrays = SplitArrays(text_bert=tb, audio=arrays['audio'], vision=arrays['vision'],
                             label=labels, id=strings['id'], raw_text=strings['raw_text'],
                             audio_length=lengths.get('audio_lengths'),
                             vision_length=lengths.get('vision_lengths'))
  return split_arrays, counts


def load_source(path: str | os.PathLike, dataset: str, aligned: bool, *,
                nonfinite: str = 'error', check_sha256: bool = True) -> MmsaSource:
  """Read and fully validate an MMSA pickle; raises before anything is written."""
  dataset, aligned = check_setting(dataset, aligned)
  if nonfinite not in NONFINITE_MODES:
    raise ValueError(f'nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}')
  path = os.fspath(path)
  digest = matched = None
  if check_sha256 and os.path.isfile(path):
    digest, matched = check_hash(path, dataset, aligned)
  data = load_pickle(path)
  splits, counts = {}, {}
  for split in SPLITS:
    splits[split], counts[split] = _validate_split(path, split, data[split], dataset, aligned,
                                                   nonfinite)
  if len({s.audio_length is None for s in splits.values()}) > 1:
    raise MmsaFormatError(f"{path}: 'audio_lengths'/'vision_lengths' present in some splits "
                          'but not in others')
  del data  # the unused keys ('text' features, annotations, ...) go with it
  for split, c in counts.items():
    for key, kinds in c.items():
      if any(kinds.values()):
        fixed = ('zeroed (reference rule)' if key == 'audio' else '') if kinds['neg_inf'] else ''
        log.info('%s %s %s: %d -inf %s, %d +inf, %d NaN%s', path, split, key, kinds['neg_inf'],
                 fixed, kinds['pos_inf'], kinds['nan'],
                 ' (zeroed: --nonfinite=zero)' if nonfinite == 'zero' else '')
  return MmsaSource(path=path, dataset=dataset, aligned=aligned, splits=splits,
                    nonfinite=nonfinite, nonfinite_counts=counts, sha256=digest,
                    hash_matches=matched)
