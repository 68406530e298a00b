"""Mixed precision: bfloat16 compute over float32 parameters.

With `DMDConfig.compute_dtype = 'bfloat16'` the forward pass runs on a bfloat16 copy of the
parameters and of the acoustic/visual inputs, so every matmul, convolution and elementwise op of
the encoders works in bf16. Kept in float32:
  - the parameters themselves and the optimizer state (the cast happens inside the
    differentiated function, so gradients arrive in float32);
  - LayerNorm statistics and affine (`layers.LayerNorm`), every attention softmax
    (`layers.attention`, `bert._SelfAttention`);
  - the GD-Units (`distill.GDUnit` upcasts its inputs) and every loss (`api.forward` returns
    float32 outputs).
This is the usual policy on TPUs and recent GPUs; on a CPU without bf16 matrix units it is slower.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def compute_dtype(config) -> jnp.dtype:
  return DTYPES[config.compute_dtype]


def cast_floating(tree: Any, dtype) -> Any:
  """Every floating-point leaf of `tree` as `dtype`; integer and key leaves unchanged."""
  def cast(x):
    return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x
  return jax.tree.map(cast, tree)
