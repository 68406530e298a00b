"""A trained run as a model bundle (the format: dmd_jax.inference.bundle): the best seed's
parameters, the tokenizer, the encoder's config, provenance and a model card.

    write_bundle(workdir, out)            # what `python -m dmd_jax.bundle` and training run
    predictor_for_run(workdir)            # a Predictor through a temporary bundle
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import tempfile
from typing import Any, Mapping, Optional

import jax
from safetensors.numpy import save_file

from dmd_jax import __version__
from dmd_jax.config import from_run_config
from dmd_jax.data import text
from dmd_jax.fileio import atomic_directory, atomic_write
from dmd_jax.inference.bundle import (FORMAT, FORMAT_VERSION, contract, flatten_params, jsonable,
                                      load_bundle, manifest)
from dmd_jax.inference.predictor import Predictor
from dmd_jax.model import init_params
from dmd_jax.model.bert import resolve_bert_dir
from dmd_jax.provenance import data_record, encoder_record, git_commit
from dmd_jax.training import checkpoints, run_config


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
      'model_config': jsonable(dataclasses.asdict(cfg)),
      'run_config': json.loads(run.to_json_best_effort()),
      'metrics': {str(s): {'best_epoch': r['best_epoch'], 'valid': r['valid'],
                           'test': r['test']} for s, r in results.items()},
      'source': {'workdir': os.path.abspath(workdir),
                 'text_encoder': encoder_record(run, bert), 'data': data_record(run)},
  }
  with atomic_directory(out, overwrite=overwrite) as tmp:
    save_file(flatten_params(params), os.path.join(tmp, 'params.safetensors'))
    tok.save_pretrained(os.path.join(tmp, 'tokenizer'))
    atomic_write(os.path.join(tmp, 'text_encoder_config.json'),
                 json.dumps(dataclasses.asdict(bert), indent=1))
    atomic_write(os.path.join(tmp, 'README.md'), _card(meta, results))
    meta['files'] = manifest(tmp)
    atomic_write(os.path.join(tmp, 'bundle.json'), json.dumps(meta, indent=1))
  return out


def predictor_for_run(workdir: str, seed: Optional[int] = None, *, vocab: Optional[str] = None,
                      batch_size: int = 32) -> Predictor:
  """The best parameters of `seed` (default: the run's best seed) of a training run as a
  `Predictor`, through a temporary bundle: the same code path as `Predictor.from_bundle`."""
  with tempfile.TemporaryDirectory() as tmp:
    path = write_bundle(workdir, os.path.join(tmp, 'bundle'), seed, vocab=vocab)
    return Predictor(load_bundle(path), batch_size)
