"""The MulT transformer encoder as DMD uses it (spec §2.5-§2.6), batch-major (B, T, E), quirks
included:
  * inputs scaled by sqrt(E) plus a *data-dependent* sinusoidal position: step t gets position
    t+1 unless channel 0 of the unscaled input is exactly 0, in which case it gets none;
  * key and value inputs are embedded separately, each with its own embed-dropout mask;
  * one LayerNorm (pre-norm) shared by query, key and value inside a layer, a final LayerNorm;
  * an additive causal mask offset by |T_k - T_q| in every transformer.
A stack of identical layers runs as one `lax.scan` or unrolled (`AttentionConfig.layer_loop`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax.config import AttentionConfig
from dmd_jax.model.attention import DEFAULT, MultiheadAttention
from dmd_jax.model.layers import Linear, layer_norm, sinusoidal_positions
from dmd_jax.model.target import platform_of


# How a stack of identical MulT layers runs (AttentionConfig.layer_loop): 'scan' (one `lax.scan`
# over stacked parameters: one layer body to compile), 'unroll' (a plain loop), or 'auto': on CPU,
# unrolled where a layer's activations have at least UNROLL_MIN_ELEMENTS elements, else scanned;
# scanned on GPU/TPU. A scan stacks every layer's activations for the backward pass, a copy per
# layer each way that grows with the activations, while unrolling costs a fixed amount of compile
# time: MOSI unaligned batch 16 (16 x 496 x 50 per layer) 4.95-5.02 s -> 4.80 s per micro-step
# for +3-6 s of compile, MOSI aligned batch 16 (16 x 50 x 50) -1.8%, while the parity tests'
# small models (a few thousand elements per layer, compile-bound) took 185 s unrolled against
# 132 s scanned.
UNROLL_MIN_ELEMENTS = 2 ** 15


def scan_now(mode: str, x: jax.Array, platform: str) -> bool:
  """Whether a stack of layers applied to activations `x` runs as a scan under `mode` in a
  program compiled for `platform` ('cpu', 'gpu', 'tpu')."""
  if mode == 'unroll':
    return False
  return mode == 'scan' or platform != 'cpu' or x.size < UNROLL_MIN_ELEMENTS


def scan_layers(parent: nn.Module, make_layer: Callable[..., nn.Module], names: list[str],
                x: jax.Array, *args, deterministic: bool, mode: str,
                platform: str) -> jax.Array:
  """x -> layer_n(...layer_1(x, *args)...) over the identical layers `names` of `parent`.

  Parameters keep their per-layer names (`layers_0`, `layers_1`, ...; checkpoints and the
  reference mapping are unchanged). Where the layer loop is a scan (`mode`, see `scan_now`),
  the layers outside initialisation run as one `lax.scan` over their stacked
  parameters: the step compiles one layer body per stack instead of one per layer (about 4x less
  code for XLA). `make_layer(name=..., parent=...)` builds a layer module; it is called as
  layer(x, *args, deterministic). Dropout keys are split per layer in both forms, so they give
  the same values.
  """
  if parent.is_initializing() or len(names) < 2:
    for name in names:
      x = make_layer(name=name)(x, *args, deterministic)
    return x
  params = parent.variables['params']
  layer = make_layer(name=None, parent=None)                  # unbound: applied to each layer
  train = not deterministic and parent.has_rng('dropout')
  keys = (jax.random.split(parent.make_rng('dropout'), len(names)) if train
          else jnp.zeros((len(names),), jnp.uint32))

  def body(h, p_and_key):
    p, key = p_and_key
    rngs = {'dropout': key} if train else {}
    return layer.apply({'params': p}, h, *args, deterministic, rngs=rngs), None

  if not scan_now(mode, x, platform):
    for i, name in enumerate(names):
      x = body(x, (params[name], keys[i]))[0]
    return x
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *[params[n] for n in names])
  return jax.lax.scan(body, x, (stacked, keys))[0]


class TransformerEncoderLayer(nn.Module):
  """Pre-LN layer: x + Attn(LN0(x), LN0(k), LN0(v)); then x + FFN(LN1(x)).

  With `last_only` only the last query position is computed (its keys and values still span the
  whole input): the output is (B, 1, E), exactly the last row of the full layer's output.
  """
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  attention: AttentionConfig = DEFAULT

  @nn.compact
  def __call__(self, x, x_k, x_v, causal_offset: Optional[int], deterministic: bool,
               last_only: bool = False):
    ln0 = layer_norm('layer_norms_0')
    h = ln0(x)
    if x_k is None:
      hk = hv = h
    else:
      hk = ln0(x_k)
      hv = hk if x_v is x_k else ln0(x_v)
    row_start = 0
    if last_only:
      row_start, x, h = x.shape[1] - 1, x[:, -1:], h[:, -1:]
    a = MultiheadAttention(self.embed_dim, self.num_heads, self.attn_dropout, self.attention,
                           name='self_attn')(h, hk, hv, causal_offset, row_start, deterministic)
    x = x + nn.Dropout(self.res_dropout)(a, deterministic=deterministic)
    h = layer_norm('layer_norms_1')(x)
    h = nn.relu(Linear(4 * self.embed_dim, init='xavier', name='fc1')(h))
    h = nn.Dropout(self.relu_dropout)(h, deterministic=deterministic)
    h = Linear(self.embed_dim, init='xavier', name='fc2')(h)
    return x + nn.Dropout(self.res_dropout)(h, deterministic=deterministic)


class TransformerEncoder(nn.Module):
  """MulT TransformerEncoder: self-attention when `x_kv` is None, else cross-modal attention with
  query `x` (target modality) and key = value = `x_kv` (source modality).

  `last_only=True` returns only the last time step, (B, 1, E), computing the final layer for that
  position alone (DMD reads nothing else from its self-attention and memory transformers).
  """
  embed_dim: int
  num_heads: int
  layers: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  attn_mask: bool = True
  last_only: bool = False
  attention: AttentionConfig = DEFAULT

  @nn.compact
  def __call__(self, x_in: jax.Array, x_kv: Optional[jax.Array] = None, *,
               deterministic: bool = True) -> jax.Array:
    scale = math.sqrt(self.embed_dim)
    drop = nn.Dropout(self.embed_dropout)
    x = drop(scale * x_in + sinusoidal_positions(x_in), deterministic=deterministic)
    x_k = x_v = None
    if x_kv is not None:
      kv = scale * x_kv + sinusoidal_positions(x_kv)
      # Key and value are separate tensors in the reference, each with its own dropout mask.
      x_k = drop(kv, deterministic=deterministic)
      x_v = x_k if deterministic or self.embed_dropout == 0 else drop(kv, deterministic=False)
    tk = x.shape[1] if x_kv is None else x_kv.shape[1]
    offset = abs(tk - x.shape[1]) if self.attn_mask else None
    make = lambda **kw: TransformerEncoderLayer(self.embed_dim, self.num_heads, self.attn_dropout,
                                                self.relu_dropout, self.res_dropout,
                                                self.attention, **kw)
    loop = dict(mode=self.attention.layer_loop, platform=platform_of(self.attention))
    names = [f'layers_{i}' for i in range(self.layers)]
    if self.last_only:    # the final layer computes the last position only
      x = scan_layers(self, make, names[:-1], x, x_k, x_v, offset, deterministic=deterministic,
                      **loop)
      x = make(name=names[-1])(x, x_k, x_v, offset, deterministic, last_only=True)
    else:
      x = scan_layers(self, make, names, x, x_k, x_v, offset, deterministic=deterministic,
                      **loop)
    return layer_norm('layer_norm')(x)
