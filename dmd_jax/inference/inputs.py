"""The files users hand to `python -m dmd_jax.predict`, read into `Samples` and checked against a
bundle's input contract. Errors name the file, the sample (id, else row) and the field.

- JSONL (`.jsonl`): one object per line with `id`, `text`, `audio`, `vision`; a feature is a path
  to a `.npy` file, `file.npz:key`, or an inline list of frames. Relative paths are taken from the
  input file's folder.
- CSV (`.csv`): columns `id`, `text`, `audio`, `vision`, features as paths as above.
- npz (`.npz`): `text` (N,) strings, `audio` (N, T, D) and `vision` (N, T, D) arrays, optional
  `id` (N,), `audio_lengths` / `vision_lengths` (N,) and `label` (N,). Read without pickle.
- MMSA pickle (`.pkl`): one split (`split`, default test) of an MMSA feature file, read with the
  restricted unpickler (`dmd_jax.fileio.load_pickle`); its token ids (`text_bert`) are used as they
  are, as data prep does, and audio -inf becomes 0 (the reference's rule).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import warnings
import zipfile
from typing import Any, Optional, Sequence

import numpy as np

from dmd_jax import fileio

FORMATS = {'.jsonl': 'jsonl', '.csv': 'csv', '.npz': 'npz', '.pkl': 'pickle', '.pickle': 'pickle'}


class InputError(ValueError):
  """Input that does not fit the model; the message names the file, sample and field."""


class TruncationWarning(UserWarning):
  """A sequence longer than the bundle's contract lost its tail."""


@dataclasses.dataclass
class Samples:
  """Raw samples: per sample an id, a transcript (or ready token ids) and two (T, D) arrays."""
  ids: list[str]
  audio: list[np.ndarray]
  vision: list[np.ndarray]
  texts: Optional[list[str]] = None
  text_bert: Optional[np.ndarray] = None        # (N, 3, L) ids, mask, segments (MMSA pickles)
  labels: Optional[np.ndarray] = None
  source: str = 'input'

  def __len__(self) -> int:
    return len(self.ids)


# ---- reading ------------------------------------------------------------------------------------

def read_input(path: str, split: str = 'test') -> Samples:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'input file not found: {path}')
  kind = FORMATS.get(os.path.splitext(path)[1].lower())
  if kind is None:
    raise InputError(f'{path}: unknown input format; use one of {sorted(FORMATS)}')
  return {'jsonl': _read_jsonl, 'csv': _read_csv, 'npz': _read_npz,
          'pickle': lambda p: _read_pickle(p, split)}[kind](path)


def _rows_to_samples(rows: Sequence[tuple[str, dict]], path: str) -> Samples:
  base = os.path.dirname(os.path.abspath(path))
  ids, texts, audio, vision = [], [], [], []
  for where, row in rows:
    if not isinstance(row, dict):
      raise InputError(f'{where}: expected an object with id, text, audio and vision')
    sid = row.get('id')
    if sid is None or str(sid).strip() == '':
      raise InputError(f'{where}: missing id')
    sid = str(sid)
    where = f'{path}, sample {sid!r}'
    for field in ('text', 'audio', 'vision'):
      if row.get(field) is None or row.get(field) == '':
        raise InputError(f'{where}, field {field!r}: missing')
    ids.append(sid)
    texts.append(str(row['text']))
    audio.append(_array(row['audio'], base, where, 'audio'))
    vision.append(_array(row['vision'], base, where, 'vision'))
  if not ids:
    raise InputError(f'{path}: no samples')
  return Samples(ids, audio, vision, texts=texts, source=path)


def _text_of(path: str) -> str:
  """A text file's contents as UTF-8; an error names the line that is not."""
  with open(path, 'rb') as f:
    raw = f.read()
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    line = raw[:e.start].count(b'\n') + 1
    raise InputError(f'{path}, line {line}: not UTF-8 text (byte '
                     f'{raw[e.start]:#04x} at offset {e.start}); save the file as UTF-8') from None


def _read_jsonl(path: str) -> Samples:
  rows = []
  for n, line in enumerate(_text_of(path).splitlines(), 1):
    if not line.strip():
      continue
    try:
      rows.append((f'{path}, line {n}', json.loads(line)))
    except ValueError as e:
      raise InputError(f'{path}, line {n}: not valid JSON ({e})') from e
  return _rows_to_samples(rows, path)


def _read_csv(path: str) -> Samples:
  reader = csv.DictReader(io.StringIO(_text_of(path), newline=''))
  missing = [c for c in ('id', 'text', 'audio', 'vision') if c not in (reader.fieldnames or [])]
  if missing:
    raise InputError(f'{path}: missing column(s) {missing}; found {reader.fieldnames}')
  rows = [(f'{path}, row {n}', dict(r)) for n, r in enumerate(reader, 2)]
  return _rows_to_samples(rows, path)


def _array(ref: Any, base: str, where: str, field: str) -> np.ndarray:
  """A feature given inline (a list of frames) or as `file.npy` / `file.npz:key`."""
  if isinstance(ref, list):
    try:
      return np.asarray(ref, np.float32)
    except (ValueError, TypeError) as e:
      raise InputError(f'{where}, field {field!r}: not a numeric array ({e})') from e
  ref = str(ref)
  file, key = ref, None
  if '.npz:' in ref:
    file, key = ref.rsplit(':', 1)
  full = file if os.path.isabs(file) else os.path.join(base, file)
  if not os.path.isfile(full):
    raise InputError(f'{where}, field {field!r}: file not found: {full}')
  where = f'{where}, field {field!r}: {full}'
  try:
    if key is None and not zipfile.is_zipfile(full):
      with open(full, 'rb') as f:
        return _read_npy(f, where)
    with zipfile.ZipFile(full) as z:
      names = [n[:-4] for n in z.namelist() if n.endswith('.npy')]
      if key not in names:
        raise InputError(f'{where} has no array {key!r} (name one as file.npz:key; it holds '
                         f'{names})')
      with z.open(f'{key}.npy') as f:
        return _read_npy(f, f'{where}:{key}')
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f'{where}: not a readable numpy array ({e})') from e


# Frames of one feature sequence that a file may declare (contracts allow at most 500; longer
# inputs keep their first frames): the header is checked before anything is allocated.
MAX_FRAMES = 100_000


def _read_npy(f, where: str) -> np.ndarray:
  """One .npy array from an open file, its header checked first: no pickled objects, at most
  MAX_FRAMES frames."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise InputError(f'{where}: .npy format version {version} is not supported (1.0 or 2.0)')
  if dtype.hasobject:
    raise InputError(f'{where}: holds Python objects (dtype {dtype}), not numbers; refused '
                     'without reading it (objects are unpickled, which can run code)')
  if shape and shape[0] > MAX_FRAMES:
    raise InputError(f'{where}: declares {shape[0]} frames (shape {shape}), over the limit of '
                     f'{MAX_FRAMES}; cut it to the frames the model reads')
  count = int(np.prod(shape, dtype=np.int64))
  data = f.read(count * dtype.itemsize)
  if len(data) != count * dtype.itemsize:
    raise InputError(f'{where}: truncated (header says {shape}, the file holds less)')
  arr = np.frombuffer(data, dtype).reshape(shape, order='F' if fortran else 'C')
  return arr


def _read_npz(path: str) -> Samples:
  try:
    with np.load(path, allow_pickle=False) as z:
      data = {k: z[k] for k in z.files}
  except (ValueError, OSError) as e:
    raise InputError(f'{path}: not a readable .npz without pickled objects ({e})') from e
  missing = [k for k in ('text', 'audio', 'vision') if k not in data]
  if missing:
    raise InputError(f'{path}: missing key(s) {missing}; found {sorted(data)}')
  n = len(data['text'])
  for k in ('audio', 'vision'):
    if data[k].ndim != 3 or len(data[k]) != n:
      raise InputError(f'{path}: key {k!r} has shape {data[k].shape}; expected ({n}, T, D) '
                       f"for the {n} texts")
  ids = [str(i) for i in data['id']] if 'id' in data else [str(i) for i in range(n)]
  out = Samples(ids, list(data['audio']), list(data['vision']),
                texts=[str(t) for t in data['text']], source=path,
                labels=np.asarray(data['label'], np.float32).reshape(-1) if 'label' in data
                else None)
  for k in ('audio', 'vision'):
    if f'{k}_lengths' in data:
      lengths = np.asarray(data[f'{k}_lengths']).reshape(-1)
      if len(lengths) != n:
        raise InputError(f'{path}: key {k}_lengths has {len(lengths)} entries for {n} samples')
      getattr(out, k)[:] = [x[:int(l)] for x, l in zip(getattr(out, k), lengths)]
  return out


def _read_pickle(path: str, split: str) -> Samples:
  try:
    data = fileio.load_pickle(path)
  except fileio.UnsafePickleError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a corrupt file can raise anything)
    raise InputError(f'{path}: not a readable pickle ({type(e).__name__}: {e})') from e
  if not isinstance(data, dict) or split not in data:
    raise InputError(f'{path}: no split {split!r} (an MMSA pickle maps train/valid/test to '
                     f'arrays; found {sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__})')
  d = data[split]
  missing = [k for k in ('text_bert', 'audio', 'vision', 'id') if k not in d]
  if missing:
    raise InputError(f'{path}: split {split!r} lacks key(s) {missing}')
  audio = np.array(d['audio'], np.float32)
  audio[np.isneginf(audio)] = 0.0            # the reference's rule for COVAREP's -inf
  ids = [i.decode() if isinstance(i, bytes) else str(i) for i in d['id']]
  out = Samples(ids, list(audio), list(np.asarray(d['vision'], np.float32)),
                text_bert=np.asarray(d['text_bert'], np.float32), source=f'{path} [{split}]',
                labels=np.asarray(d['regression_labels'], np.float32).reshape(-1)
                if 'regression_labels' in d else None)
  for k in ('audio', 'vision'):
    if f'{k}_lengths' in d:
      getattr(out, k)[:] = [x[:int(l)] for x, l in zip(getattr(out, k),
                                                       np.asarray(d[f'{k}_lengths']))]
  return out


# ---- checking and padding -------------------------------------------------------------------------

def fit_features(samples: Samples, contract: dict, *, strict: bool = False) -> dict[str, np.ndarray]:
  """(N, max_len, dim) float32 audio and vision per the contract: every sample checked (rank,
  feature dim, finite values, at least one frame), zero-padded at the end, a longer one cut to
  max_len with a `TruncationWarning` (an `InputError` with `strict`)."""
  out, cuts = {}, []
  for field in ('audio', 'vision'):
    want = contract[field]
    dim, max_len = int(want['dim']), int(want['max_len'])
    arr = np.zeros((len(samples), max_len, dim), np.float32)
    cut = []
    for i, (sid, x) in enumerate(zip(samples.ids, getattr(samples, field))):
      where = f'{samples.source}, sample {sid!r}, field {field!r}'
      x = np.asarray(x)
      if x.ndim != 2:
        raise InputError(f'{where}: expected a (T, {dim}) array of frames, got rank {x.ndim} '
                         f'shape {x.shape}')
      if x.shape[1] != dim:
        raise InputError(f'{where}: feature dim {x.shape[1]}, the model was trained on {dim} '
                         f"({want['extractor']})")
      if x.shape[0] == 0:
        raise InputError(f'{where}: no frames')
      if not np.issubdtype(x.dtype, np.number):
        raise InputError(f'{where}: not numeric (dtype {x.dtype})')
      bad = ~np.isfinite(x)
      if bad.any():
        raise InputError(f'{where}: {int(bad.sum())} NaN/inf value(s), first at frame '
                         f'{int(np.argwhere(bad)[0][0])}')
      if x.shape[0] > max_len:
        if strict:
          raise InputError(f'{where}: {x.shape[0]} frames, the contract allows {max_len} '
                           '(--strict); cut it or drop --strict to keep the first frames')
        cut.append((sid, x.shape[0]))
        x = x[:max_len]
      arr[i, :x.shape[0]] = x
    if cut:
      cuts.append(f'{field}: {len(cut)} (first {cut[0][0]!r}, {cut[0][1]} > {max_len} frames)')
    out[field] = arr
  if cuts:
    warnings.warn(f'{samples.source}: sample(s) longer than the contract kept their first '
                  f"frames; {'; '.join(cuts)}", TruncationWarning, stacklevel=2)
  return out


def tokenize(texts: Sequence[str], tokenizer, max_tokens: int, *, ids: Sequence[str],
             source: str = 'input', strict: bool = False) -> np.ndarray:
  """(N, 3, max_tokens) float32 [ids, mask, segments] as data prep makes them (padding to
  max_length, truncation); empty texts are refused, longer ones cut (strict: refused)."""
  for sid, t in zip(ids, texts):
    if not isinstance(t, str) or not t.strip():
      raise InputError(f'{source}, sample {sid!r}, field \'text\': empty text')
  enc = tokenizer(list(texts), padding='max_length', truncation=True, max_length=max_tokens,
                  return_tensors='np', return_overflowing_tokens=False, return_length=False)
  full = tokenizer(list(texts), add_special_tokens=True, truncation=False)['input_ids']
  long = [(sid, len(f)) for sid, f in zip(ids, full) if len(f) > max_tokens]
  if long:
    if strict:
      raise InputError(f'{source}, sample {long[0][0]!r}, field \'text\': {long[0][1]} word '
                       f'pieces, the contract allows {max_tokens} (--strict)')
    warnings.warn(f'{source}: {len(long)} text(s) longer than {max_tokens} word pieces were cut '
                  f'(first: {long[0][0]!r}, {long[0][1]})', TruncationWarning, stacklevel=2)
  return np.stack([enc['input_ids'], enc['attention_mask'], enc['token_type_ids']],
                  axis=1).astype(np.float32)
