"""The facts every stage shares, defined once: the datasets (splits, sequence lengths, feature
widths, file names and hashes, where a prepared dataset lives), the modality and edge orders, and
the batch keys. Plain Python and numpy: data preparation imports it without JAX.

Two modality orders exist and both are the reference's, each defined here once and used by name
everywhere: MMSA files and `DMDConfig.feature_dims` / `seq_lens` / `kernel_sizes` list language
(text), audio, vision (`FEATURE_ORDER`); the GD-Units' nodes and every per-modality output list
language, vision, audio (`MODALITIES`). Language is 'l' in both.
"""

from __future__ import annotations

import os

import numpy as np

# ---- datasets (spec §5) --------------------------------------------------------------------------

DATASETS = ('mosi', 'mosei')
SPLITS = ('train', 'valid', 'test')
FEATURE_ORDER = ('l', 'a', 'v')          # MMSA files (text, audio, vision), feature_dims, seq_lens
TEXT_LEN = 50                            # BERT word pieces per utterance (rows of `text_bert`)
# MMSA's `text_bert` holds word pieces of bert-base-uncased (ids < 30522); rows: ids, attention
# mask, segment ids.
TEXT_VOCAB_SIZE = 30522


def text_bert_problem(text_bert: np.ndarray, vocab_size: int = TEXT_VOCAB_SIZE
                      ) -> tuple[tuple[int, ...], str] | None:
  """The first entry of `text_bert` rows (N, 3, T) that no encoder can read, as ((sample, row,
  position), what), or None: word-piece ids must be integers in [0, vocab_size), the mask and
  segment ids 0 or 1 (an id past the vocabulary reads another row of the embedding table or
  NaN, silently)."""
  tb = np.asarray(text_bert)
  whole = np.isfinite(tb) & (tb == np.round(tb)) & (tb >= 0)
  limit = np.array([vocab_size - 1, 1, 1]).reshape((1, 3) + (1,) * (tb.ndim - 2))
  bad = ~(whole & (tb <= limit))
  if not bad.any():
    return None
  j = tuple(int(x) for x in np.argwhere(bad)[0])
  value = tb[j]
  if j[1] == 0:
    what = f'word-piece id {value:g} is not an integer in [0, {vocab_size})'
  else:
    what = f"{('attention mask', 'segment id')[j[1] - 1]} {value:g} is not 0 or 1"
  return j, what
TEXT_WIDTH = 768                         # bert-base-uncased: the text width of the released code
# (audio, vision) feature widths per dataset.
AV_DIMS = {'mosi': (5, 20), 'mosei': (74, 35)}
# (audio, vision) sequence lengths per (dataset, aligned).
AV_LENS = {('mosi', True): (50, 50), ('mosi', False): (375, 500),
           ('mosei', True): (50, 50), ('mosei', False): (500, 500)}
SPLIT_SIZES = {'mosi': (1284, 229, 686), 'mosei': (16326, 1871, 4659)}
FILE_NAMES = {True: 'aligned_50.pkl', False: 'unaligned_50.pkl'}
# SHA-256 of the four files as published in the MMSA README (spec §5).
MMSA_SHA256 = {
    ('mosi', True): 'd3994fd25681f9c7ad6e9c6596a6fe9b4beb85ff7d478ba978b124139002e5f9',
    ('mosi', False): '78e0f8b5ef8ff71558e7307848fc1fa929ecb078203f565ab22b9daab2e02524',
    ('mosei', True): '45eccfb748a87c80ecab9bfac29582e7b1466bf6605ff29d3b338a75120bf791',
    ('mosei', False): 'ad8b23d50557045e7d47959ce6c5b955d8d983f2979c7d9b7b9226f6dd6fec1f',
}
DATASET_VERSION = '1.0.0'                # of the prepared TFDS datasets (data_prep)
LABEL_RANGE = (-3.0, 3.0)                # sentiment scores


def check_setting(dataset: str, aligned) -> tuple[str, bool]:
  if dataset not in DATASETS:
    raise ValueError(f'dataset must be one of {DATASETS}, got {dataset!r}')
  if not isinstance(aligned, (bool, np.bool_)):
    raise ValueError(f'aligned must be a bool, got {aligned!r}')
  return dataset, bool(aligned)


def setting_name(dataset: str, aligned: bool) -> str:
  return f"{dataset}_{'aligned' if aligned else 'unaligned'}"


def seq_lens(dataset: str, aligned: bool) -> tuple[int, int, int]:
  """(text, audio, vision) lengths of a setting."""
  return (TEXT_LEN,) + AV_LENS[check_setting(dataset, aligned)]


def feature_dims(dataset: str, text_width: int = TEXT_WIDTH) -> tuple[int, int, int]:
  """(text, audio, vision) widths; the text width is the text encoder's hidden size."""
  return (text_width,) + AV_DIMS[check_setting(dataset, True)[0]]


def dataset_path(data_dir: str | os.PathLike, dataset: str, aligned: bool) -> str:
  """Where `python -m data_prep.mmsa` puts a setting: DATA_DIR/mmsa/<dataset>_<alignment>/<v>."""
  return os.path.join(os.path.expanduser(os.fspath(data_dir)), 'mmsa',
                      setting_name(*check_setting(dataset, aligned)), DATASET_VERSION)


# ---- modalities and edges (spec §1.4, §2.7) ------------------------------------------------------

MODALITIES = ('l', 'v', 'a')             # GD-Unit node order (to_idx = from_idx = [0, 1, 2])
# Edge x = (STUDENT[x], TEACHER[x]) in node indices: the reference's loop order
# "for j in to_idx: for i in from_idx: if i != j" (priors and edge lists use it).
STUDENT = np.array([0, 0, 1, 1, 2, 2])
TEACHER = np.array([1, 2, 0, 2, 0, 1])
EDGE_NAMES = tuple(f'{MODALITIES[t].upper()}->{MODALITIES[s].upper()}'
                   for s, t in zip(STUDENT, TEACHER))          # 'V->L', 'A->L', 'L->V', ...
# The same edges source-major (L->V, L->A, V->L, V->A, A->L, A->V), as the paper and the reference
# README list them: the column order of edge tables and curves.
DISPLAY_ORDER = np.array(sorted(range(6), key=lambda x: (TEACHER[x], STUDENT[x])))
DISPLAY_EDGE_NAMES = tuple(EDGE_NAMES[x] for x in DISPLAY_ORDER)
UNITS = ('homo', 'hetero')               # the two GD-Units (decoupled spaces)

# ---- batches --------------------------------------------------------------------------------------

BATCH_KEYS = ('text', 'audio', 'vision', 'labels')    # what the model and objective read
EVAL_KEYS = BATCH_KEYS + ('mask', 'index')            # plus padding mask and sample index
RECORD_KEYS = ('text_bert', 'audio', 'vision', 'label')  # fields of a prepared dataset read back
