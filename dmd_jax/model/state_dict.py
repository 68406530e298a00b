"""Reference (PyTorch) state dicts <-> this project's parameter trees.

Parameter paths mirror the reference's module names, so the mapping is mechanical:
  * path components join with '.'; `layer_3`, `layers_3`, `layer_norms_0` become `layer.3`,
    `layers.3`, `layer_norms.0`; the DMD text encoder `text_model/...` is `text_model.model....`;
  * leaves: `kernel` -> `weight` (transposed: Dense (in,out) <- (out,in); Conv (k,in,out) <-
    (out,in,k)), `scale`/`embedding` -> `weight`, `in_proj_kernel` -> `in_proj_weight` (transposed),
    `bias`/`in_proj_bias` unchanged.
The GD-Units (`homo_gd`, `hetero_gd`) map to the separate HomoGD/HeteroGD state dicts, whose
keys are `W_logit.*`, `W_repr.*`, `W_edge.*`. BERT weights from Hugging Face use the same mapping.
"""

from __future__ import annotations

import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file

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


# ---- reading reference files -------------------------------------------------------------------

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
