"""The run config (`configs/*.py`, an ml_collections ConfigDict) at the library's edge: its
validation, the text encoder it names, the model config it implies, and reading it back from a
run's workdir. Nothing past this module sees a ConfigDict's model fields.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import ml_collections

from dmd_jax.config import BertConfig, DMDConfig, from_run_config
from dmd_jax.model import init_params
from dmd_jax.model.bert import load_bert, resolve_bert_dir
from dmd_jax.objective import LOSS_WEIGHTS
from dmd_jax.training.steps import LAYOUTS

MODES = ('train', 'eval')
SEED_MODES = ('together', 'sequential')
SWEEPABLE = ('learning_rate',) + LOSS_WEIGHTS

PyTree = Any


def bert_config_of(run: Mapping[str, Any]) -> BertConfig:
  """The encoder's `BertConfig` alone (no weights are read)."""
  if run['text_encoder'] == 'random':
    return BertConfig.from_dict(dict(run['random_bert']))
  return BertConfig.from_json_file(os.path.join(resolve_bert_dir(run['text_encoder']),
                                                'config.json'))


def text_encoder(run: Mapping[str, Any]) -> tuple[BertConfig, Optional[PyTree]]:
  """(BertConfig, pretrained params or None) for `run.text_encoder`.

  'random' gives the sizes in `run.random_bert` and no weights (the caller keeps its random
  initialisation); anything else is a local Hugging Face directory or a hub id.
  """
  if run['text_encoder'] == 'random':
    return bert_config_of(run), None
  return load_bert(run['text_encoder'])


def with_text_encoder(params: PyTree, bert_params: Optional[PyTree]) -> PyTree:
  """Puts pretrained encoder weights into a DMD parameter tree (shapes must already agree)."""
  if bert_params is None:
    return params
  want = jax.tree.map(lambda x: x.shape, params['text_model'])
  got = jax.tree.map(lambda x: x.shape, bert_params)
  if want != got:
    raise ValueError('pretrained text encoder does not fit the model: parameter shapes differ')
  return dict(params, text_model=bert_params)


def model(run) -> tuple[DMDConfig, Any]:
  """The model config and a `seed -> initial params` function (pretrained encoder loaded once)."""
  bert_cfg, bert_params = text_encoder(run)
  cfg = from_run_config(run, bert_cfg)
  return cfg, lambda seed: with_text_encoder(init_params(cfg, jax.random.key(seed)),
                                             bert_params)


def validate_run(run: Mapping[str, Any]) -> None:
  """Impossible values in a run config, named."""
  def need(ok, key, what):
    if not ok:
      raise ValueError(f'config.{key}={run[key]!r}: {what}')
  need(run['dataset'] in ('mosi', 'mosei'), 'dataset', "must be 'mosi' or 'mosei'")
  need(run['batch_size'] >= 1, 'batch_size', 'must be >= 1')
  need(run['learning_rate'] > 0, 'learning_rate', 'must be > 0')
  need(run['update_epochs'] >= 1, 'update_epochs', 'must be >= 1')
  need(run['max_epochs'] >= 1, 'max_epochs', 'must be >= 1')
  need(run['early_stop'] >= 1, 'early_stop', 'must be >= 1')
  need(run['patience'] >= 0, 'patience', 'must be >= 0')
  need(run['log_every'] >= 1, 'log_every', 'must be >= 1')
  need(run['keep_checkpoints'] >= 1, 'keep_checkpoints', 'must be >= 1')
  need(len(run['seeds']) >= 1 and len(set(run['seeds'])) == len(run['seeds']), 'seeds',
       'must be a non-empty list of distinct integers')
  need(run['mode'] in MODES, 'mode', f'must be one of {MODES}')
  need(run['eval_split'] in ('train', 'valid', 'test'), 'eval_split',
       "must be 'train', 'valid' or 'test'")
  need(run['seed_mode'] in SEED_MODES, 'seed_mode', f'must be one of {SEED_MODES}')
  need(run['seeds_per_program'] >= 0, 'seeds_per_program', 'must be >= 0 (0: all together)')
  need(run.get('state_layout', 'auto') in LAYOUTS, 'state_layout', f'must be one of {LAYOUTS}')
  sweep = run.get('sweep') or {}
  for key, values in sweep.items():
    if key not in SWEEPABLE:
      raise ValueError(f'config.sweep.{key}: not sweepable; choose from {list(SWEEPABLE)}')
    if not isinstance(values, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
      raise ValueError(f'config.sweep.{key}={values!r}: must be a tuple of non-negative numbers')


def setup_compile_cache(run: Mapping[str, Any]) -> Optional[str]:
  """Turns on JAX's persistent compilation cache in `run.compile_cache` (if not empty), so that a
  second run, an eval or a resume of the same shapes loads the compiled steps instead of
  compiling them again. JAX_COMPILATION_CACHE_DIR, when set, takes precedence. Returns the
  directory in use."""
  path = run.get('compile_cache', '')
  if not path:
    return None
  env = os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if env:
    return env
  path = os.path.expanduser(path)
  jax.config.update('jax_compilation_cache_dir', path)
  return path


def load_run_config(workdir: str):
  """The run config a training run saved in its workdir (config.json)."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: is {workdir} the --workdir of a training run?')
  with open(path) as f:
    run = ml_collections.ConfigDict(json.load(f))
  run.model.kernel_sizes = tuple(run.model.kernel_sizes)
  return run
