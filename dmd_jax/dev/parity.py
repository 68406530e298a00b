"""The reference's parity fixtures (`shared/parity/<variant>/`) and how far a compute dtype
drifts from them.

A fixture folder holds the reference's weights (`dmd.npz`, `homo_gd.npz`, `hetero_gd.npz`), its
text-encoder config (`bert/config.json`), the variant (`variant.json`), inputs (`batch<i>.npz`)
and what the PyTorch code computed from them (`outputs.npz`, `losses.json`, ...).
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np

from dmd_jax.config import AttentionConfig, BertConfig, reference_config
from dmd_jax.objective import compute_loss
from dmd_jax.model.reference_weights import import_reference

FIXTURES = ('mosi_aligned_small', 'mosei_unaligned_small')


def fixture_config(path: str):
  """The `DMDConfig` a fixture was computed with (dropout off: the reference ran in eval mode)."""
  variant_file = os.path.join(path, 'variant.json')
  if not os.path.isfile(variant_file):
    raise FileNotFoundError(f'not a parity fixture folder (no variant.json): {path}')
  with open(variant_file) as f:
    v = json.load(f)
  bert = BertConfig.from_json_file(os.path.join(path, 'bert', 'config.json'))
  try:
    return reference_config(
        v['dataset'], v['aligned'], bert=bert, d=v['dst_feature_dim'], num_heads=v['nheads'],
        nlevels=v['nlevels'], attn_mask=v['attn_mask'],
        kernel_sizes=tuple(v['conv1d_kernel_sizes_lav']), feature_dims=tuple(v['feature_dims']),
        seq_lens=tuple(v['seq_lens_tav'])).without_dropout()
  except KeyError as e:
    raise KeyError(f'{variant_file} lacks key {e}') from e


def _npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path) as z:
    return {k: z[k] for k in z.files}


def drift(path: str, compute_dtype: str = 'bfloat16',
          matmul_precision: str = 'float32') -> dict[str, Any]:
  """Forward outputs and loss terms of the fixture's batch 0 under `compute_dtype` and
  `matmul_precision`, compared with the reference's float32 results. matmul_precision='default'
  is emulated as TPUs compute it at JAX's default precision (one bf16 pass per float32 product,
  float32 accumulation; `emulate_one_pass_bf16`), since a CPU computes float32 either way.

  Returns {'outputs': {name: max |ours - ref| / max |ref|}, 'losses': {name: |ours - ref| /
  max(|ref|, 1e-6)}} for every output and loss term the reference recorded.
  """
  cfg = fixture_config(path).replace(compute_dtype=compute_dtype)
  params = import_reference(cfg, *(os.path.join(path, f) for f in
                                   ('dmd.npz', 'homo_gd.npz', 'hetero_gd.npz')))
  batch = {k: jax.numpy.asarray(v) for k, v in _npz(os.path.join(path, 'batch0.npz')).items()}
  if matmul_precision == 'default':
    # the plain computation (no custom kernels or loops), every product through one bf16 pass
    cfg = cfg.replace(matmul_precision='default', attention=AttentionConfig(
        impl='plain', head_loop='off', native='off', layer_loop='unroll'))
    loss = emulate_one_pass_bf16(functools.partial(compute_loss, config=cfg))
  elif matmul_precision == 'float32':
    loss = functools.partial(compute_loss, config=cfg)
  else:
    raise ValueError(f"matmul_precision must be 'float32' or 'default', got {matmul_precision!r}")
  _, aux = jax.jit(loss)(params, batch)
  aux = jax.device_get(aux)
  ref_out = _npz(os.path.join(path, 'outputs.npz'))
  with open(os.path.join(path, 'losses.json')) as f:
    ref_loss = json.load(f)
  outputs = {}
  for k, want in ref_out.items():
    got = aux['outputs'].get(k)
    if got is None:
      continue
    want = np.asarray(want, np.float64)
    scale = max(float(np.abs(want).max()), 1e-12)
    outputs[k] = float(np.abs(np.asarray(got, np.float64) - want).max() / scale)
  losses = {k: float(abs(float(aux['losses'][k]) - v) / max(abs(v), 1e-6))
            for k, v in ref_loss.items()}
  return {'outputs': outputs, 'losses': losses}


# ---- one bf16 pass per product, on any backend -------------------------------------------------

_PRODUCTS = ('dot_general', 'conv_general_dilated')
_INLINE = {'pjit': 'jaxpr', 'jit': 'jaxpr', 'closed_call': 'call_jaxpr',
           'custom_jvp_call': 'call_jaxpr', 'custom_vjp_call': 'call_jaxpr',
           'custom_vjp_call_jaxpr': 'fun_jaxpr', 'remat': 'jaxpr', 'checkpoint': 'jaxpr'}


def _round_bf16(x):
  if x.dtype == jax.numpy.float32:
    return x.astype(jax.numpy.bfloat16).astype(jax.numpy.float32)
  return x


def _eval_rounded(jaxpr, consts, *args):
  env = {}
  read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
  for v, x in zip(jaxpr.constvars, consts):
    env[v] = x
  for v, x in zip(jaxpr.invars, args):
    env[v] = x
  for eqn in jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    if name in _PRODUCTS:
      outs = eqn.primitive.bind(*[_round_bf16(x) for x in ins], **eqn.params)
    elif name in _INLINE:
      inner = eqn.params[_INLINE[name]]
      closed = getattr(inner, 'jaxpr', None)
      outs = (_eval_rounded(inner.jaxpr, inner.consts, *ins) if closed is not None
              else _eval_rounded(inner, (), *ins))
    else:
      for value in eqn.params.values():
        for sub in (value if isinstance(value, (list, tuple)) else [value]):
          inner = getattr(getattr(sub, 'jaxpr', sub), 'eqns', None)
          if inner and any(e.primitive.name in _PRODUCTS for e in inner):
            raise NotImplementedError(f'products inside {name} are not emulated')
      outs = eqn.primitive.bind(*ins, **eqn.params)
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [read(v) for v in jaxpr.outvars]


def emulate_one_pass_bf16(fn):
  """`fn` with the operands of every float32 matmul and convolution rounded to bfloat16 (the
  products and sums stay float32): what a TPU computes at JAX's default precision, on any
  backend. Forward only; raises where products sit inside loops it does not open."""
  def wrapped(*args):
    closed, shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    flat = jax.tree.leaves(args)
    out = _eval_rounded(closed.jaxpr, closed.consts, *flat)
    return jax.tree.unflatten(jax.tree.structure(shape), out)
  return wrapped
