"""The run config (`configs/*.py`, an ml_collections ConfigDict) at the library's edge: its
validation, the text encoder it names, the model config it implies, and reading it back from a
run's workdir. Nothing past this module sees a ConfigDict's model fields.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Mapping, Optional

import jax
import ml_collections

from dmd_jax.config import BertConfig, DMDConfig, from_run_config, run_model_fields
from dmd_jax.model import init_params
from dmd_jax.model.bert import load_bert
from dmd_jax.model.target import devices_platform
from dmd_jax.objective import LOSS_WEIGHTS
from dmd_jax.training.steps import LAYOUTS

MODES = ('train', 'eval', 'smoke')   # the one list of modes (configs/mosi.py names it)
SEED_MODES = ('together', 'sequential')
SWEEPABLE = ('learning_rate',) + LOSS_WEIGHTS

PyTree = Any


def bert_config_of(run: Mapping[str, Any]) -> BertConfig:
  """The encoder's `BertConfig` alone (no weights are read)."""
  return text_encoder(run, weights=False)[0]


def text_encoder(run: Mapping[str, Any], weights: bool = True
                 ) -> tuple[BertConfig, Optional[PyTree]]:
  """(BertConfig, pretrained params or None) for `run.text_encoder`: a local Hugging Face
  directory or a hub id (its weights unless `weights` is off), or 'random': the sizes in
  `run.random_bert` and no weights (the caller keeps its random initialisation)."""
  if run['text_encoder'] != 'random':
    return load_bert(run['text_encoder'], weights=weights)
  return BertConfig.from_dict(dict(run['random_bert'])), None


def with_text_encoder(params: PyTree, bert_params: Optional[PyTree]) -> PyTree:
  """Puts pretrained encoder weights into a DMD parameter tree (shapes must already agree)."""
  if bert_params is None:
    return params
  want = jax.tree.map(lambda x: x.shape, params['text_model'])
  got = jax.tree.map(lambda x: x.shape, bert_params)
  if want != got:
    raise ValueError('pretrained text encoder does not fit the model: parameter shapes differ')
  return dict(params, text_model=bert_params)


def model(run, devices=None) -> tuple[DMDConfig, Any]:
  """The model config, its implementation choices made for `devices` (default: this process's
  devices, where the run trains), and a `seed -> initial params` function (pretrained encoder
  loaded once)."""
  platform = devices_platform(jax.devices() if devices is None else devices)
  bert_cfg, bert_params = text_encoder(run)
  cfg = from_run_config(run, bert_cfg, platform)
  return cfg, functools.partial(initial_params, cfg, bert_params)


def initial_params(cfg: DMDConfig, bert_params: Optional[PyTree], seed: int) -> PyTree:
  """A run's initial parameters for `seed`: the model's initialisers, the pretrained text
  encoder's weights over its own (when there are any)."""
  return with_text_encoder(init_params(cfg, jax.random.key(seed)), bert_params)


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
  seeds = run['seeds']
  need(isinstance(seeds, (list, tuple)) and len(seeds) >= 1 and len(set(seeds)) == len(seeds)
       and all(isinstance(s, int) and not isinstance(s, bool) for s in seeds), 'seeds',
       "must be a non-empty tuple of distinct integers, e.g. --config.seeds='(1111,1112)'")
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


# Fields that do not decide a run's results: commands into one workdir may differ in them.
# (max_epochs: a resumed run trains its unfinished members up to the new cap; members that
# finished keep their results.) Every other field must equal the stored config's.
NOT_RESULTS = ('mode', 'eval_split', 'checkpoint', 'progress', 'figures', 'bundle',
               'compile_cache', 'log_every', 'keep_checkpoints', 'data_dir', 'state_layout',
               'max_epochs', 'distributed', 'coordinator_address', 'num_processes', 'process_id',
               'smoke_steps')


class RunFolderMismatch(ValueError):
  """A command's config decides results differently from the run stored in its workdir."""


def _flat(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: tree}


def as_plain(run: Mapping[str, Any]) -> dict[str, Any]:
  """A run config as the JSON it is stored as (tuples as lists)."""
  if hasattr(run, 'to_json_best_effort'):
    return json.loads(run.to_json_best_effort())
  return json.loads(json.dumps(run))


def _with_model_defaults(plain: dict[str, Any]) -> dict[str, Any]:
  """A stored run config with the `model` fields it lacks at their released values (a run
  stored by an older version that listed fewer model fields decides the same model)."""
  if 'dataset' not in plain or 'aligned' not in plain or not isinstance(plain.get('model'), dict):
    return plain
  defaults = json.loads(json.dumps(
      {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
       for k, v in run_model_fields(plain['dataset'], bool(plain['aligned'])).items()}))
  return dict(plain, model={**defaults, **plain['model']})


def config_differences(stored: Mapping[str, Any], run: Mapping[str, Any]
                       ) -> tuple[list[str], list[str]]:
  """(fields deciding results, other fields) in which `run` differs from `stored`, each as
  'field stored -> now'."""
  a = _flat(_with_model_defaults(as_plain(stored)))
  b = _flat(_with_model_defaults(as_plain(run)))
  results, others = [], []
  for key in sorted(set(a) | set(b)):
    if a.get(key, '<absent>') == b.get(key, '<absent>'):
      continue
    line = f"{key} {json.dumps(a.get(key, '<absent>'))} -> {json.dumps(b.get(key, '<absent>'))}"
    (others if key.split('.')[0] in NOT_RESULTS else results).append(line)
  return results, others


def check_run_folder(run: Mapping[str, Any], workdir: str) -> list[str]:
  """Stops (`RunFolderMismatch`, one line) a command whose config differs from the run stored
  in `workdir` (config.json) in a field that decides results; returns the differences in other
  fields (to say). Nothing is stored in a workdir without a run."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    stored = json.load(f)
  results, others = config_differences(stored, run)
  if results:
    raise RunFolderMismatch(
        f"{workdir} holds a run trained with a different config ({'; '.join(results)}: stored "
        f'-> this command). Its results stay as they are: use a new --workdir, or --fresh to '
        f'move that run aside and train from scratch here.')
  return others


def move_run_aside(workdir: str) -> Optional[str]:
  """Moves everything in `workdir` (but its lock) into a new sibling folder
  WORKDIR.replaced-<time>; returns that folder (None if there was nothing)."""
  names = [n for n in os.listdir(workdir) if n != '.lock'] if os.path.isdir(workdir) else []
  if not names:
    return None
  stamp = time.strftime('%Y%m%d-%H%M%S')
  dest = f"{os.path.normpath(workdir)}.replaced-{stamp}"
  os.makedirs(dest)
  for name in names:
    os.replace(os.path.join(workdir, name), os.path.join(dest, name))
  return dest


def stored_for_eval(run, workdir: str):
  """(the config a trained run stored in `workdir` with this command's fields that do not
  decide results (eval_split, checkpoint, data_dir, ...), the command's result fields that it
  ignores); `run` itself where none is stored."""
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    return run, []
  stored = load_run_config(workdir)
  ignored, _ = config_differences(stored, run)
  for key in NOT_RESULTS:
    if key in run:
      stored[key] = run[key]
  return stored, ignored
