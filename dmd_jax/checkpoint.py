"""Reference (PyTorch) state dicts <-> this project's parameter trees, and orbax checkpoints.

Parameter paths mirror the reference's module names, so the mapping is mechanical:
  * path components join with '.'; `layer_3`, `layers_3`, `layer_norms_0` become `layer.3`,
    `layers.3`, `layer_norms.0`; the DMD text encoder `text_model/...` is `text_model.model....`;
  * leaves: `kernel` -> `weight` (transposed: Dense (in,out) <- (out,in); Conv (k,in,out) <-
    (out,in,k)), `scale`/`embedding` -> `weight`, `in_proj_kernel` -> `in_proj_weight` (transposed),
    `bias`/`in_proj_bias` unchanged.
The GD-Units (`homo_gd`, `hetero_gd`) map to the separate HomoGD/HeteroGD state dicts, whose
keys are `W_logit.*`, `W_repr.*`, `W_edge.*`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
StateDict = Mapping[str, np.ndarray]

# Buffers carry no weights: MulT's version / dummy tensors and HF's position_ids.
_BUFFER = re.compile(r'(\.version|\._float_tensor|position_ids)$')
_INDEXED = re.compile(r'^(layer|layers|layer_norms)_(\d+)$')
_TOP_PREFIX = {'text_model': 'text_model.model'}


def is_buffer(key: str) -> bool:
  return bool(_BUFFER.search(key))


def torch_key(path: tuple[str, ...]) -> str:
  """Flax parameter path -> reference state-dict key."""
  *mods, leaf = path
  parts = []
  for i, m in enumerate(mods):
    if i == 0 and m in _TOP_PREFIX:
      parts.append(_TOP_PREFIX[m])
      continue
    hit = _INDEXED.match(m)
    parts.append(f'{hit.group(1)}.{hit.group(2)}' if hit else m)
  name = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight',
          'in_proj_kernel': 'in_proj_weight'}.get(leaf, leaf)
  return '.'.join(parts + [name])


def to_flax_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  if leaf in ('kernel', 'in_proj_kernel'):
    return value.T if value.ndim == 2 else np.transpose(value, (2, 1, 0))
  return value


def to_torch_layout(leaf: str, value: np.ndarray) -> np.ndarray:
  # Both transposes are involutions.
  return to_flax_layout(leaf, value)


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(p, 'key', str(p)) for p in path)


def state_dict_to_params(sd: StateDict, shapes: PyTree, *, source: str = 'state dict',
                         prefix: str = '') -> PyTree:
  """Fills a parameter tree shaped like `shapes` (arrays or ShapeDtypeStructs) from `sd`.

  Every parameter must be present with the right shape, and every non-buffer key of `sd` must be
  used; otherwise a ValueError names the source, the key(s) and the shapes.
  """
  used, missing, errors = set(), [], []

  def fill(path, leaf):
    names = _path_names(path)
    key = prefix + torch_key(names)
    if key not in sd:
      missing.append(key)
      return None
    used.add(key)
    value = to_flax_layout(names[-1], np.asarray(sd[key], dtype=np.float32))
    if tuple(value.shape) != tuple(leaf.shape):
      errors.append(f'{key}: expected {tuple(to_torch_layout(names[-1], np.zeros(leaf.shape)).shape)}'
                    f' (as saved by PyTorch), found {tuple(np.asarray(sd[key]).shape)}')
      return None
    return jnp.asarray(value)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  unexpected = sorted(k for k in sd if k.startswith(prefix) and k not in used and not is_buffer(k))
  problems = []
  if missing:
    problems.append(f'missing key(s): {_short(missing)}')
  if unexpected:
    problems.append(f'unexpected key(s): {_short(unexpected)}')
  if errors:
    problems.append('shape mismatch: ' + '; '.join(errors[:10]))
  if problems:
    raise ValueError(f'{source}: ' + ' | '.join(problems))
  return params


def params_to_state_dict(params: PyTree, prefix: str = '') -> dict[str, np.ndarray]:
  """The inverse mapping: a parameter tree as reference-style numpy state dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = _path_names(path)
    out[prefix + torch_key(names)] = to_torch_layout(names[-1], np.asarray(leaf))
  return out


def _short(keys, n=8):
  keys = list(keys)
  return ', '.join(keys[:n]) + (f' (+{len(keys) - n} more)' if len(keys) > n else '')


# ------------------------------------------------------------------------------------------------
# Reading reference files.

def load_state_dict(source: Any) -> dict[str, np.ndarray]:
  """A reference state dict from a `.pth` (needs torch), `.npz` or `.safetensors` file, or any
  mapping of array-likes."""
  if isinstance(source, Mapping):
    return {k: np.asarray(v) for k, v in source.items()}
  path = os.fspath(source)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file not found: {path}')
  if path.endswith('.npz'):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file
    return load_file(path)
  try:
    import torch
  except ImportError as e:
    raise ImportError(f'{path}: reading a PyTorch .pth file needs torch; install the torch extra '
                      f"(pip install 'dmd_jax[torch]') or pass an .npz of the same state dict"
                      ) from e
  try:
    sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:
    raise ValueError(f'{path}: not a readable PyTorch state dict ({e})') from e
  if not isinstance(sd, Mapping):
    raise ValueError(f'{path}: expected a state_dict (mapping of tensors), found {type(sd).__name__}')
  return {k: v.detach().float().numpy() for k, v in sd.items()}


def import_reference(config, dmd: Any, homo_gd: Any = None, hetero_gd: Any = None, *,
                     rng: Optional[jax.Array] = None) -> PyTree:
  """Reference checkpoints -> parameters of `dmd_jax.models.DMD(config)`.

  Args:
    config: the `DMDConfig` the reference model was built with.
    dmd: `dmd.pth` as saved by the reference trainer (`model[0].state_dict()`): a path or mapping.
    homo_gd, hetero_gd: optional HomoGD/HeteroGD state dicts. The reference trainer does not save
      them; when absent the GD-Units keep a fresh initialisation from `rng` (they only matter for
      training, not for prediction).
  """
  from dmd_jax.api import init_params  # local import: api -> models -> bert -> checkpoint
  shapes = jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))
  sources = {'homo_gd': homo_gd, 'hetero_gd': hetero_gd}
  need_init = any(v is None for v in sources.values())
  fresh = init_params(config, rng if rng is not None else jax.random.key(0)) if need_init else None
  dmd_shapes = {k: v for k, v in shapes.items() if k not in sources}
  name = dmd if isinstance(dmd, (str, os.PathLike)) else 'dmd state dict'
  params = dict(state_dict_to_params(load_state_dict(dmd), dmd_shapes, source=str(name)))
  for key, src in sources.items():
    if src is None:
      params[key] = fresh[key]
    else:
      name = src if isinstance(src, (str, os.PathLike)) else f'{key} state dict'
      params[key] = state_dict_to_params(load_state_dict(src), shapes[key], source=str(name))
  return params


def export_reference(params: PyTree) -> tuple[dict, dict, dict]:
  """Parameters -> (dmd, homo_gd, hetero_gd) reference-style numpy state dicts."""
  dmd = params_to_state_dict({k: v for k, v in params.items() if not k.endswith('_gd')})
  return dmd, params_to_state_dict(params['homo_gd']), params_to_state_dict(params['hetero_gd'])


# ------------------------------------------------------------------------------------------------
# Orbax checkpoints of parameters (the training entry point keeps whole TrainStates).

PARAMS_ITEM, META_ITEM = 'params', 'meta'


def save_params(directory: str, params: PyTree, meta: Mapping[str, Any], step: int = 0) -> str:
  """Writes `params` and JSON metadata as an orbax checkpoint at `directory`/<step>.

  The checkpoint is written to a temporary sibling directory and moved into place, so a failure
  leaves nothing half-written at `directory`.
  """
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, str(step))):
    raise FileExistsError(f'{directory} already holds a checkpoint at step {step}')
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.import-', dir=parent)
  try:
    with ocp.CheckpointManager(tmp) as mngr:
      mngr.save(step, args=ocp.args.Composite(**{
          PARAMS_ITEM: ocp.args.StandardSave(params),
          META_ITEM: ocp.args.JsonSave(dict(meta))}))
      mngr.wait_until_finished()
    os.makedirs(directory, exist_ok=True)
    os.replace(os.path.join(tmp, str(step)), os.path.join(directory, str(step)))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return os.path.join(directory, str(step))


def restore_params(directory: str, step: Optional[int] = None) -> tuple[PyTree, dict]:
  """Reads (params, meta) written by `save_params` (latest step unless given)."""
  import orbax.checkpoint as ocp
  directory = os.path.abspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'checkpoint directory not found: {directory}')
  with ocp.CheckpointManager(directory) as mngr:
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
  from dmd_jax.config import BertConfig, from_run_config
  from dmd_jax.text_encoder import bert_config_of

  bert = BertConfig.from_json_file(bert_config) if bert_config else bert_config_of(run)
  cfg = from_run_config(run, bert)
  params = import_reference(cfg, dmd, homo_gd, hetero_gd, rng=jax.random.key(seed))
  meta = {'run_config': json.loads(run.to_json()), 'model_config': dataclasses.asdict(cfg),
          'imported_from': {'dmd': os.path.abspath(dmd),
                            'homo_gd': homo_gd and os.path.abspath(homo_gd),
                            'hetero_gd': hetero_gd and os.path.abspath(hetero_gd)}}
  return save_params(out, params, meta)
