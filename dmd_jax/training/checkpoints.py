"""Checkpoints: orbax checkpoints of parameters (`save_params`, `restore_params`, and
`import_to_checkpoint` for the reference's PyTorch weights, read by
dmd_jax.model.reference_weights) and of whole training states (`checkpoint_manager`,
`save_state`, `restore_state`, with SHA-256 digests checked on resume).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from dmd_jax.config import BertConfig, from_run_config
from dmd_jax.fileio import atomic_directory, atomic_write, file_digests
from dmd_jax.training import run_config
from dmd_jax.model.reference_weights import import_reference

PyTree = Any


# ---- orbax checkpoints of parameters (training keeps whole states, below) ----------------------

PARAMS_ITEM, STATE_ITEM, META_ITEM = 'params', 'state', 'meta'


def save_params(directory: str, params: PyTree, meta: Mapping[str, Any], step: int = 0) -> str:
  """Writes `params` and JSON metadata as an orbax checkpoint at `directory`/<step>; a failure
  leaves nothing half-written there."""
  final = os.path.join(os.path.abspath(directory), str(step))
  if os.path.exists(final):
    raise FileExistsError(f'{directory} already holds a checkpoint at step {step}')
  with atomic_directory(final) as staging:
    with ocp.CheckpointManager(os.path.join(staging, 'manager')) as mngr:
      mngr.save(step, args=ocp.args.Composite(**{
          PARAMS_ITEM: ocp.args.StandardSave(params),
          META_ITEM: ocp.args.JsonSave(dict(meta))}))
      mngr.wait_until_finished()
    written = os.path.join(staging, 'manager', str(step))
    for name in os.listdir(written):
      os.replace(os.path.join(written, name), os.path.join(staging, name))
    os.rmdir(written)
    os.rmdir(os.path.join(staging, 'manager'))
  return final


def _reader(directory: str, process_local: bool = False) -> ocp.CheckpointManager:
  """A read-only manager of `directory`: for all processes together, or with `process_local`
  for this process alone (no barrier that waits for the others)."""
  options = {}
  if process_local:
    me = jax.process_index()
    options['multiprocessing_options'] = ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me})
  return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False, read_only=True, **options))


def restore_params(directory: str, step: Optional[int] = None, *,
                   process_local: bool = False) -> tuple[PyTree, dict]:
  """Reads (params, meta) written by `save_params` (latest step unless given)."""
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint directory not found: {directory}')
  with _reader(directory, process_local) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    got = mngr.restore(step, args=ocp.args.Composite(**{
        PARAMS_ITEM: ocp.args.StandardRestore(), META_ITEM: ocp.args.JsonRestore()}))
  return got[PARAMS_ITEM], dict(got[META_ITEM])


def import_to_checkpoint(run, dmd, out, homo_gd=None, hetero_gd=None, bert_config=None,
                         seed=0) -> str:
  """`import_reference` for a run config (`configs/*.py`), written with `save_params` to `out`.

  The text encoder's sizes come from `bert_config` (a config.json path), else from the run's
  `text_encoder` (a local directory or hub id, or 'random' with `random_bert`)."""
  bert = BertConfig.from_json_file(bert_config) if bert_config else run_config.bert_config_of(run)
  cfg = from_run_config(run, bert)
  params = import_reference(cfg, dmd, homo_gd, hetero_gd, rng=jax.random.key(seed))
  meta = {'run_config': json.loads(run.to_json()), 'model_config': dataclasses.asdict(cfg),
          'imported_from': {'dmd': os.path.abspath(dmd),
                            'homo_gd': homo_gd and os.path.abspath(homo_gd),
                            'hetero_gd': hetero_gd and os.path.abspath(hetero_gd)}}
  return save_params(out, params, meta)


# ---- whole training states ---------------------------------------------------------------------

def checkpoint_manager(directory: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.abspath(directory),
                               options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save_state(mngr: ocp.CheckpointManager, step: int, tree, meta: Mapping[str, Any]) -> None:
  """Saves a step and, once it is complete, the SHA-256 of its files (`digests-<step>.json`
  beside it, what `damaged` checks at resume)."""
  mngr.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(tree),
                                              META_ITEM: ocp.args.JsonSave(dict(meta))}))
  mngr.wait_until_finished()
  if jax.process_index() == 0:
    root = os.fspath(mngr.directory)
    atomic_write(_digest_path(root, step), json.dumps(file_digests(os.path.join(root, str(step)))))
    kept = {str(s) for s in mngr.all_steps()}
    for name in os.listdir(root):
      if name.startswith('digests-') and name[len('digests-'):-len('.json')] not in kept:
        os.remove(os.path.join(root, name))


def _digest_path(root: str, step: int) -> str:
  return os.path.join(root, f'digests-{step}.json')


def damaged(mngr: ocp.CheckpointManager, step: int) -> Optional[str]:
  """What is wrong with a saved step (a file missing, changed or added since it was saved, or
  no digests: it never finished saving), or None."""
  root = os.fspath(mngr.directory)
  path = _digest_path(root, step)
  if not os.path.isfile(path):
    return f'{root}/{step} has no digests (its save never finished)'
  with open(path) as f:
    want = json.load(f)
  got = file_digests(os.path.join(root, str(step)))
  for rel in sorted(set(want) | set(got)):
    if want.get(rel) != got.get(rel):
      what = 'missing' if rel not in got else 'added' if rel not in want else 'changed'
      return f'{root}/{step}/{rel} {what} since it was saved'
  return None


def restore_state(mngr: ocp.CheckpointManager, step: int, target):
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    got = mngr.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.StandardRestore(abstract), META_ITEM: ocp.args.JsonRestore()}))
  except ValueError as e:
    # e.g. a run started by a dmd_jax whose optimizer state was laid out differently
    raise ValueError(f'checkpoint {mngr.directory} step {step} does not match the state this '
                     f'version trains (another model config, or an older dmd_jax); resume it with '
                     f'the version that wrote it, or start a fresh workdir. Orbax: {e}') from e
  return got[STATE_ITEM], dict(got[META_ITEM])


def restore_meta(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The JSON metadata of a `save_state` checkpoint alone."""
  got = mngr.restore(step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
  return dict(got[META_ITEM])


def restore_any(ckpt: str, like: PyTree, *, process_local: bool = False) -> PyTree:
  """Params from a training `best/` dir (state item) or from `save_params` (params item);
  `like` gives the tree structure and shapes of the former. All processes read together, unless
  `process_local`: this process alone, as numpy arrays, with no barrier that waits for the others
  (process 0 writing a bundle after a multi-host run)."""
  if process_local:
    like = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), like)
  path = os.path.abspath(ckpt)
  with _reader(path, process_local) as mngr:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {ckpt}')
    items = set(os.listdir(os.path.join(path, str(step))))
    if STATE_ITEM in items:
      params, _ = restore_state(mngr, step, like)
      return params
  params, _ = restore_params(ckpt, step, process_local=process_local)
  return params
