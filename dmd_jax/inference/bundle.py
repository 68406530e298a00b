"""A model bundle: one folder with a trained model and everything needed to predict with it.

    bundle.json             format version, model config, input contract, provenance, metrics
    params.safetensors      the parameters ('/'-joined tree paths; no pickle anywhere)
    tokenizer/              the text tokenizer's files (Hugging Face, loaded offline)
    text_encoder_config.json  the text encoder's config (its weights are in params)
    README.md               the model card

`write_bundle(workdir, out, seed)` makes one from a training run's best parameters;
`load_bundle(path)` reads it back as a `Bundle`, checking the format and every file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from transformers import BertTokenizerFast

from dmd_jax import __version__, schema
from dmd_jax.config import BertConfig, DMDConfig, from_run_config
from dmd_jax.data import text
from dmd_jax.io import atomic_directory, atomic_write, file_digests, sha256_file
from dmd_jax.model import init_params
from dmd_jax.model.bert import resolve_bert_dir
from dmd_jax.training import checkpoints, run_config
from dmd_jax.training.experiment import git_commit

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

def _flatten(params: PyTree) -> dict[str, np.ndarray]:
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
  extra = set(flat) - set(_flatten(shapes))
  if extra:
    raise BundleError(f'{source}: unexpected parameters {sorted(extra)[:5]}')
  return params


# ---- tokenizer ---------------------------------------------------------------------------------

def run_vocab(run) -> str:
  """The vocabulary a run's text was tokenized with: its text encoder's, else the default."""
  if run.text_encoder != 'random':
    return os.path.join(resolve_bert_dir(run.text_encoder), 'vocab.txt')
  return text.default_vocab()


# ---- writing -----------------------------------------------------------------------------------

def _results(workdir: str, seeds) -> dict[int, dict]:
  out = {}
  for s in seeds:
    path = os.path.join(workdir, f'seed_{s}', 'result.json')
    if os.path.isfile(path):
      with open(path) as f:
        out[s] = json.load(f)
  return out


def best_seed(workdir: str, seeds) -> int:
  """The finished seed with the lowest validation L1 (the selection the protocol allows: test
  metrics are reported, never used to choose)."""
  results = _results(workdir, seeds)
  if not results:
    raise FileNotFoundError(f'no finished seed in {workdir} (no seed_*/result.json): train first')
  return min(results, key=lambda s: (results[s]['valid']['Loss'], s))


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


def _describe_data(d: Mapping[str, Any]) -> str:
  setting = f"{d['dataset'].upper()} {'aligned' if d['aligned'] else 'unaligned'}"
  if d.get('synthetic'):
    text = f"SYNTHETIC data in the {setting} format ({d['generator']})"
  else:
    text = f'{setting} ({d.get("source_file") or "prepared dataset"})'
  n = d.get('num_examples')
  if n:
    text += f", {n['train']}/{n['valid']}/{n['test']} train/valid/test samples"
  if d.get('prepared_sha256'):
    text += f"; prepared files SHA-256 {d['prepared_sha256'][:16]}…"
  return text


def _card(meta: Mapping[str, Any], results: Mapping[int, dict]) -> str:
  c, enc = meta['contract'], meta['source']['text_encoder']
  lines = [
      f"# DMD model: {c['dataset'].upper()} {'aligned' if c['aligned'] else 'unaligned'}", '',
      f"Made by dmd_jax {meta['dmd_jax_version']} (commit {meta['commit']}) on "
      f"{meta['created']} from the run in `{meta['source']['workdir']}`, seed "
      f"{meta['seed']} (lowest validation L1 of the run's seeds unless chosen).", '',
      f"Trained on: {_describe_data(meta['source']['data'])}.", '',
      f"Text encoder: {enc['name']} ({enc['hidden_size']} wide, {enc['layers']} layers, "
      f"{enc['vocab_size']} word pieces).",
      '', '## Test metrics per seed', '']
  if meta['source']['data'].get('synthetic'):
    lines += ['> Measured on the synthetic test split: they show that training works, not how '
              'well the model reads sentiment in real data.', '']
  lines += [
      '| seed | best epoch | Acc2 (non-0) | F1 (non-0) | Acc7 | MAE | Corr |',
      '|---|---|---|---|---|---|---|']
  for s, r in sorted(results.items()):
    t = r['test']
    lines.append(f"| {s}{' (this bundle)' if s == meta['seed'] else ''} | {r['best_epoch']} | "
                 f"{t['Non0_acc_2']:.4f} | {t['Non0_F1_score']:.4f} | {t['Mult_acc_7']:.4f} | "
                 f"{t['MAE']:.4f} | {t['Corr']:.4f} |")
  lines += ['', '## Input contract', '',
            f"- text: a transcript string, at most {c['text']['max_tokens']} word pieces "
            "(tokenizer/).",
            f"- audio: (T, {c['audio']['dim']}) float array, T <= {c['audio']['max_len']}; "
            f"{c['audio']['extractor']}.",
            f"- vision: (T, {c['vision']['dim']}) float array, T <= {c['vision']['max_len']}; "
            f"{c['vision']['extractor']}.",
            f"- {c['padding']}.", f"- alignment: {c['alignment']}.",
            f"- output: a sentiment score in [{c['label_range'][0]:g}, {c['label_range'][1]:g}].",
            '', '## Use', '', '```bash',
            'python -m dmd_jax.predict --bundle=THIS_FOLDER --input=samples.jsonl '
            '--output=preds.csv', '```', '']
  return '\n'.join(lines)


def write_bundle(workdir: str, out: str, seed: Optional[int] = None, *,
                 vocab: Optional[str] = None, overwrite: bool = False) -> str:
  """A bundle of `seed`'s best parameters (default: the best seed, see `best_seed`) of the
  training run in `workdir`, written atomically to `out`."""
  parent = os.path.dirname(os.path.abspath(workdir))
  own = os.path.isfile(os.path.join(workdir, 'config.json'))
  # a sweep member's folder has its seeds but the run's config.json is one level up
  run = run_config.load_run_config(workdir if own or not os.path.isfile(
      os.path.join(parent, 'config.json')) else parent)
  seed = best_seed(workdir, run.seeds) if seed is None else int(seed)
  ckpt = os.path.join(workdir, f'seed_{seed}', 'best')
  if not os.path.isdir(ckpt):
    raise FileNotFoundError(f'{ckpt} not found: seed {seed} of {workdir} has no best parameters '
                            f'(seeds of the run: {list(run.seeds)})')
  bert = run_config.bert_config_of(run)
  cfg = from_run_config(run, bert)
  shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
  params = jax.device_get(checkpoints.restore_any(ckpt, shapes, process_local=True))
  tok = text.tokenizer(vocab or run_vocab(run))
  results = _results(workdir, run.seeds)
  meta = {
      'format': FORMAT, 'format_version': FORMAT_VERSION, 'dmd_jax_version': __version__,
      'commit': git_commit(), 'created': datetime.datetime.now(datetime.timezone.utc)
      .strftime('%Y-%m-%d %H:%M UTC'),
      'seed': seed, 'contract': contract(run.dataset, run.aligned),
      'model_config': _jsonable(dataclasses.asdict(cfg)),
      'run_config': json.loads(run.to_json_best_effort()),
      'metrics': {str(s): {'best_epoch': r['best_epoch'], 'valid': r['valid'],
                           'test': r['test']} for s, r in results.items()},
      'source': {'workdir': os.path.abspath(workdir),
                 'text_encoder': encoder_record(run, bert), 'data': data_record(run)},
  }
  with atomic_directory(out, overwrite=overwrite) as tmp:
    save_file(_flatten(params), os.path.join(tmp, 'params.safetensors'))
    tok.save_pretrained(os.path.join(tmp, 'tokenizer'))
    atomic_write(os.path.join(tmp, 'text_encoder_config.json'),
                 json.dumps(dataclasses.asdict(bert), indent=1))
    atomic_write(os.path.join(tmp, 'README.md'), _card(meta, results))
    meta['files'] = manifest(tmp)
    atomic_write(os.path.join(tmp, 'bundle.json'), json.dumps(meta, indent=1))
  return out


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


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
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
  if _jsonable(dataclasses.asdict(cfg)) != meta['model_config']:
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
