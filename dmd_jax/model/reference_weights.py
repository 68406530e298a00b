"""The reference's PyTorch weights in and out: `import_reference` reads its state dicts (`.pth`
through torch when installed, or `.npz`) into parameters of `dmd_jax.model.DMD`, and
`export_reference` writes parameters back as reference-style numpy state dicts. The name mapping
is dmd_jax.model.state_dict.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax

from dmd_jax.model.dmd import init_params
from dmd_jax.model.state_dict import load_state_dict, params_to_state_dict, state_dict_to_params

PyTree = Any


def import_reference(config, dmd: Any, homo_gd: Any = None, hetero_gd: Any = None, *,
                     rng: Optional[jax.Array] = None) -> PyTree:
  """Reference checkpoints -> parameters of `dmd_jax.model.DMD(config)`.

  Args:
    config: the `DMDConfig` the reference model was built with.
    dmd: `dmd.pth` as saved by the reference trainer (`model[0].state_dict()`): a path or mapping.
    homo_gd, hetero_gd: optional HomoGD/HeteroGD state dicts. The reference trainer does not save
      them; when absent the GD-Units keep a fresh initialisation from `rng` (they only matter for
      training, not for prediction).
  """
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
