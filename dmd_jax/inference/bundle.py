"""A model bundle: one folder with a trained model and everything needed to predict with it.

    bundle.json             format version, model config, input contract, provenance, metrics
    params.safetensors      the parameters ('/'-joined tree paths; no pickle anywhere)
    tokenizer/              the text tokenizer's files (Hugging Face, loaded offline)
    text_encoder_config.json  the text encoder's config (its weights are in params)
    README.md               the model card

`dmd_jax.training.export.write_bundle(workdir, out, seed)` makes one from a training run's best
parameters; `load_bundle(path)` reads it back as a `Bundle`, checking the format and every file.
Reading a bundle needs nothing of training or data preparation.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file
from transformers import BertTokenizerFast

from dmd_jax import __version__, schema
from dmd_jax.config import BertConfig, DMDConfig, from_run_config
from dmd_jax.fileio import file_digests
from dmd_jax.model import init_params

FORMAT = 'dmd_jax.bundle'
# 2: bundle.json lists every other file's SHA-256 ('files'), checked when the bundle is read.
FORMAT_VERSION = 2
FILES = ('bundle.json', 'params.safetensors', 'tokenizer', 'text_encoder_config.json',
         'README.md')

# How the public datasets' audio and vision features were made (MMSA release, from the
# CMU-MultimodalSDK): features of new data must come from the same extractors to be meaningful.
FEATURES = {
    'mosi': {'audio': 'COVAREP acoustic features (5 per frame in the MMSA release)',
             'vision': 'Facet facial action units and expressions (20 per frame)'},
    'mosei': {'audio': 'COVAREP acoustic features (74 per frame)',
              'vision': 'Facet facial action units and expressions (35 per frame)'},
}

PyTree = Any


class BundleError(ValueError):
  """A bundle folder that cannot be used: missing file, other format or version, wrong shapes."""


def contract(dataset: str, aligned: bool, text_len: int = schema.TEXT_LEN) -> dict[str, Any]:
  """What the model reads, as users must provide it."""
  (t_a, t_v), (d_a, d_v) = schema.AV_LENS[(dataset, aligned)], schema.AV_DIMS[dataset]
  return {
      'dataset': dataset, 'aligned': aligned,
      'text': {'max_tokens': text_len, 'tokenizer': 'tokenizer/ (BERT word pieces, lower-cased)',
               'truncation': 'word pieces past max_tokens (with [CLS] and [SEP]) are dropped'},
      'audio': {'dim': d_a, 'max_len': t_a, 'extractor': FEATURES[dataset]['audio']},
      'vision': {'dim': d_v, 'max_len': t_v, 'extractor': FEATURES[dataset]['vision']},
      'padding': 'frames are (T, dim) arrays; shorter sequences are zero-padded at the end to '
                 'max_len, longer ones keep their first max_len frames (a warning; refused '
                 'with strict). Frames past a given length are zeroed',
      'alignment': ('audio and vision are averaged per word piece of the transcript (MMSA '
                    'aligned_50)' if aligned else 'audio and vision at their own frame rates'),
      'label_range': list(schema.LABEL_RANGE),
  }


# ---- parameters ---------------------------------------------------------------------------------

def flatten_params(params: PyTree) -> dict[str, np.ndarray]:
  """A parameter tree as {'/'-joined tree path: contiguous array} (the safetensors layout)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    flat['/'.join(str(getattr(k, 'key', k)) for k in path)] = np.ascontiguousarray(
        np.asarray(leaf))
  return flat


def _unflatten(flat: Mapping[str, np.ndarray], shapes: PyTree, source: str) -> PyTree:
  def fill(path, want):
    key = '/'.join(str(getattr(k, 'key', k)) for k in path)
    if key not in flat:
      raise BundleError(f'{source}: parameter {key!r} is missing')
    got = flat[key]
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
      raise BundleError(f'{source}: parameter {key!r} is {got.dtype}{list(got.shape)}, the '
                        f'model needs {want.dtype}{list(want.shape)}')
    return got
  params = jax.tree_util.tree_map_with_path(fill, shapes)
  extra = set(flat) - set(flatten_params(shapes))
  if extra:
    raise BundleError(f'{source}: unexpected parameters {sorted(extra)[:5]}')
  return params


def manifest(folder: str) -> dict[str, str]:
  """SHA-256 of every file below `folder` but bundle.json, by '/'-joined relative path."""
  return file_digests(folder, skip=('bundle.json',))


def check_files(path: str, listed: Any) -> None:
  """Every file `listed` in bundle.json is there with its SHA-256; nothing else is."""
  if not isinstance(listed, dict) or not listed:
    raise BundleError(f"{path}/bundle.json: no 'files' manifest (bundle the run again)")
  found = manifest(path)
  for rel, digest in listed.items():
    if rel not in found:
      raise BundleError(f'{path}/{rel}: missing (listed in bundle.json); the bundle is '
                        'incomplete: copy it again or bundle the run again')
    if found[rel] != digest:
      raise BundleError(f'{path}/{rel}: changed since the bundle was made (SHA-256 {found[rel]}, '
                        f'bundle.json says {digest}); copy it again or bundle the run again')
  extra = sorted(set(found) - set(listed))
  if extra:
    raise BundleError(f'{path}: files not in the bundle\'s manifest: {extra[:5]}')


def jsonable(x):
  """Tuples as lists, recursively: a config as bundle.json stores it."""
  if isinstance(x, dict):
    return {k: jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  return x


# ---- reading -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Bundle:
  path: str
  config: DMDConfig
  params: PyTree
  tokenizer: Any
  contract: dict
  meta: dict


def load_bundle(path: str) -> Bundle:
  """Reads and checks a bundle folder; errors name the folder and the file or key at fault."""
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f'bundle folder not found: {path}')
  missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
  if missing:
    raise BundleError(f'{path}: incomplete bundle, missing {missing} (make it again with '
                      'python -m dmd_jax.bundle)')
  try:
    with open(os.path.join(path, 'bundle.json')) as f:
      meta = json.load(f)
  except ValueError as e:
    raise BundleError(f'{path}/bundle.json: not valid JSON ({e})') from e
  if not isinstance(meta, dict) or meta.get('format') != FORMAT:
    raise BundleError(f"{path}/bundle.json: not a dmd_jax bundle (format "
                      f"{meta.get('format') if isinstance(meta, dict) else None!r})")
  version = meta.get('format_version')
  if version != FORMAT_VERSION:
    raise BundleError(f'{path}: bundle format version {version!r} (written by dmd_jax '
                      f"{meta.get('dmd_jax_version')}); this dmd_jax {__version__} reads version "
                      f'{FORMAT_VERSION}: use the dmd_jax that wrote it, or bundle the run again')
  check_files(path, meta.get('files'))
  with open(os.path.join(path, 'text_encoder_config.json')) as f:
    bert = BertConfig.from_dict(json.load(f))
  run = ml_collections.ConfigDict(meta['run_config'])
  run.model.kernel_sizes = tuple(run.model.kernel_sizes)
  cfg = from_run_config(run, bert)
  if jsonable(dataclasses.asdict(cfg)) != meta['model_config']:
    raise BundleError(f'{path}: the model config this dmd_jax builds from the bundle differs from '
                      'the one stored in bundle.json (made by another version); bundle the run '
                      'again with this version')
  source = os.path.join(path, 'params.safetensors')
  try:
    flat = load_file(source)
  except (SafetensorError, OSError, ValueError) as e:
    raise BundleError(f'{source}: unreadable ({e})') from e
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  params = _unflatten(flat, shapes, source)
  for key, value in flat.items():
    if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
      raise BundleError(f'{source}: parameter {key!r} holds {int((~np.isfinite(value)).sum())} '
                        'non-finite values (NaN or inf); a model with them predicts nothing')
  tok = BertTokenizerFast.from_pretrained(os.path.join(path, 'tokenizer'), local_files_only=True)
  return Bundle(path, cfg, params, tok, meta['contract'], meta)
