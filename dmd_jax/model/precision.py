"""Mixed precision: bfloat16 compute over float32 parameters.

With `DMDConfig.compute_dtype = 'bfloat16'` the forward pass runs on a bfloat16 copy of the
parameters and of the acoustic/visual inputs, so every matmul, convolution and elementwise op of
the encoders works in bf16. Kept in float32:
  - the parameters themselves and the optimizer state (the cast happens inside the
    differentiated function, so gradients arrive in float32);
  - LayerNorm statistics and affine (`layers.LayerNorm`), every attention softmax
    (`attention.py`, `bert._SelfAttention`);
  - the GD-Units (`gd_unit.GDUnit` upcasts its inputs) and every loss (`dmd.forward` returns
    float32 outputs).
This is the usual policy on TPUs and recent GPUs; on a CPU without bf16 matrix units it is slower.

Separately, `DMDConfig.matmul_precision` says how float32 matmuls and convolutions are computed:
JAX's default precision runs them as one bf16 pass on TPU and in TF32 on recent NVIDIA GPUs,
which is not the reference's float32. 'float32' (the default) traces every product at HIGHEST
precision (true float32: six bf16 passes on TPU); 'default' leaves the platform's fast native
precision. CPUs compute float32 either way (the results there are identical). How far the fast
setting drifts from the reference: `dmd_jax.dev.parity.drift(..., matmul_precision='default')`
emulates one bf16 pass per product on the CPU (docs/tpu.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# DMDConfig.matmul_precision -> jax.default_matmul_precision's name (None: JAX's default)
MATMUL = {'float32': 'float32', 'default': None}


def matmul_precision(config):
  """A context under which the products traced for `config` get its matmul precision. Used
  around every traced forward and train step (dmd_jax.model.forward,
  dmd_jax.training.state.train_step), so the backward's products inherit it too."""
  return jax.default_matmul_precision(MATMUL[config.matmul_precision])


def compute_dtype(config) -> jnp.dtype:
  return DTYPES[config.compute_dtype]


def cast_floating(tree: Any, dtype) -> Any:
  """Every floating-point leaf of `tree` as `dtype`; integer and key leaves unchanged."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
  return jax.tree.map(cast, tree)
