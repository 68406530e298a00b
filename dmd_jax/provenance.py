"""Where a result came from: the code's commit, the text encoder and the data a run trained on.
Written into results tables and model bundles; reading them needs nothing of training."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import Any

from dmd_jax import schema
from dmd_jax.config import BertConfig
from dmd_jax.fileio import sha256_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> str:
  """The commit of this checkout ('-dirty' with uncommitted changes), or 'unknown' outside git."""
  try:
    out = subprocess.run(['git', 'describe', '--always', '--dirty', '--abbrev=12'], cwd=REPO,
                         check=True, capture_output=True, text=True, timeout=10)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'


def encoder_record(run, bert: BertConfig) -> dict[str, Any]:
  """The text encoder a run trained: its name and its real sizes."""
  name = ('a randomly initialised BERT (no pretrained weights)' if run.text_encoder == 'random'
          else os.path.basename(os.path.normpath(str(run.text_encoder))) or run.text_encoder)
  return {'name': name, 'path': run.text_encoder, 'hidden_size': bert.hidden_size,
          'layers': bert.num_hidden_layers, 'heads': bert.num_attention_heads,
          'vocab_size': bert.vocab_size}


def data_record(run) -> dict[str, Any]:
  """What a run trained on: the setting, whether the data is synthetic, the prepared dataset's
  path, sizes and SHA-256 of its data files (and of its source pickle where data prep checked
  it)."""
  path = schema.dataset_path(run.data_dir, run.dataset, run.aligned)
  record = {'dataset': run.dataset, 'aligned': bool(run.aligned), 'path': path,
            'synthetic': bool(run.get('synthetic'))}
  if record['synthetic']:
    syn = run.synthetic
    record['generator'] = (f'data_prep.synthetic (seed {syn.seed}, sizes '
                           f'{tuple(syn.sizes)}): random features in the {run.dataset.upper()} '
                           'format, not the real dataset')
  meta = os.path.join(path, 'metadata.json')
  if os.path.isfile(meta):
    with open(meta) as f:
      md = json.load(f)
    record.update(num_examples=md.get('num_examples'), source_file=md.get('source_file'),
                  source_sha256=md.get('source_sha256'))
  if os.path.isdir(path):
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
      if '.array_record' in name or '.tfrecord' in name:
        h.update(name.encode() + b'\0' + sha256_file(os.path.join(path, name)).encode())
    record['prepared_sha256'] = h.hexdigest()
  return record
