"""Building blocks: PyTorch-initialised Linear/Conv1d, and the MulT transformer encoder.

Every tensor here is batch-major, (B, T, E). The transformer reproduces the fairseq-derived
encoder of MulT as used by DMD (spec §2.5-§2.6), quirks included:
  * inputs scaled by sqrt(E) plus a *data-dependent* sinusoidal position: step t gets position
    t+1 unless channel 0 of the unscaled input is exactly 0, in which case it gets none;
  * key and value inputs are embedded separately, each with its own embed-dropout mask;
  * one LayerNorm (pre-norm) shared by query, key and value inside a layer, a final LayerNorm;
  * an additive causal mask offset by |T_k - T_q| in every transformer.
"""

from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # torch.nn.LayerNorm default; Flax's default (1e-6) would break parity.


def torch_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv weights and biases."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
  """A Dense layer with PyTorch's initialisation (or Xavier weights and zero bias).

  Parameters are `kernel` (in, out) and `bias` (out), the transposes of torch's `weight`/`bias`.
  """
  features: int
  init: str = 'torch'  # 'torch' or 'xavier' (the MulT transformer's fc1/fc2).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    if self.init == 'xavier':
      kernel_init, bias_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
    else:
      kernel_init = bias_init = torch_uniform(fan_in)
    kernel = self.param('kernel', kernel_init, (fan_in, self.features))
    bias = self.param('bias', bias_init, (self.features,))
    return x @ kernel + bias


def conv1d(features: int, kernel: int, name: str) -> nn.Conv:
  """Bias-free 'valid' Conv1d over (B, T, C) with PyTorch's default initialisation."""
  return nn.Conv(features, kernel_size=(kernel,), padding='VALID', use_bias=False,
                 kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                 name=name)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with a two-pass variance, as PyTorch computes it (the fast
  E[x^2] - E[x]^2 form loses digits). Parameters `scale` and `bias`, like flax's LayerNorm.

  Written out rather than `nn.LayerNorm(use_fast_variance=False)`, whose gradient expands into
  thousands of scalar ops on XLA:CPU and roughly doubles the train step's compile time.
  """
  epsilon: float = LN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],))
    centred = x - jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    return centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias


def layer_norm(name: str, eps: float = LN_EPS) -> LayerNorm:
  return LayerNorm(epsilon=eps, name=name)


def sinusoidal_positions(x_in: jax.Array) -> jax.Array:
  """fairseq sinusoidal embedding with MulT's data-dependent positions.

  Args:
    x_in: (B, T, E) unscaled transformer input.
  Returns:
    (B, T, E): row [sin(p f), cos(p f)] with p = t + 1, f_i = exp(-i ln(1e4) / (E/2 - 1)),
    or zeros where x_in[b, t, 0] == 0 (padding index 0). Constant: no gradient flows into it.
  """
  _, t, e = x_in.shape
  half = e // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(10000.0) / (half - 1)))
  angles = jnp.arange(1, t + 1, dtype=jnp.float32)[:, None] * freqs[None, :]
  table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  if e % 2:
    table = jnp.pad(table, ((0, 0), (0, 1)))
  has_position = jax.lax.stop_gradient(x_in[..., 0] != 0)
  return jnp.where(has_position[..., None], table[None].astype(x_in.dtype), 0)


def future_mask(tq: int, tk: int) -> jax.Array:
  """(tq, tk) boolean 'may attend' mask: key j is hidden from query i iff j - i >= 1 + |tk - tq|."""
  i = jnp.arange(tq)[:, None]
  j = jnp.arange(tk)[None, :]
  return (j - i) < 1 + abs(tk - tq)


class MultiheadAttention(nn.Module):
  """MulT's attention: packed in-projection (`in_proj_kernel` (E, 3E)), scaled q, additive mask,
  float32 softmax, dropout on the probabilities, output projection."""
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0

  @nn.compact
  def __call__(self, query, key, value, mask: Optional[jax.Array], deterministic: bool):
    e, h = self.embed_dim, self.num_heads
    hd = e // h
    w = self.param('in_proj_kernel', nn.initializers.xavier_uniform(), (e, 3 * e))
    b = self.param('in_proj_bias', nn.initializers.zeros, (3 * e,))
    if query is key and key is value:           # self-attention: one packed matmul
      q, k, v = jnp.split(query @ w + b, 3, axis=-1)
    else:
      q = query @ w[:, :e] + b[:e]
      if key is value:                          # shared key/value input (eval mode)
        k, v = jnp.split(key @ w[:, e:] + b[e:], 2, axis=-1)
      else:
        k = key @ w[:, e:2 * e] + b[e:2 * e]
        v = value @ w[:, 2 * e:] + b[2 * e:]
    q = q * (hd ** -0.5)
    bsz, tq, tk = query.shape[0], query.shape[1], key.shape[1]
    q = q.reshape(bsz, tq, h, hd)
    k = k.reshape(bsz, tk, h, hd)
    v = v.reshape(bsz, tk, h, hd)
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k)
    if mask is not None:
      scores = jnp.where(mask, scores, -jnp.inf)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(scores.dtype)
    probs = nn.Dropout(self.attn_dropout)(probs, deterministic=deterministic)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(bsz, tq, e)
    return Linear(e, init='xavier', name='out_proj')(out)


class TransformerEncoderLayer(nn.Module):
  """Pre-LN layer: x + Attn(LN0(x), LN0(k), LN0(v)); then x + FFN(LN1(x))."""
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, x_k, x_v, mask, deterministic: bool):
    ln0 = layer_norm('layer_norms_0')
    h = ln0(x)
    if x_k is None:
      hk = hv = h
    else:
      hk = ln0(x_k)
      hv = hk if x_v is x_k else ln0(x_v)
    a = MultiheadAttention(self.embed_dim, self.num_heads, self.attn_dropout,
                           name='self_attn')(h, hk, hv, mask, deterministic)
    x = x + nn.Dropout(self.res_dropout)(a, deterministic=deterministic)
    h = layer_norm('layer_norms_1')(x)
    h = nn.relu(Linear(4 * self.embed_dim, init='xavier', name='fc1')(h))
    h = nn.Dropout(self.relu_dropout)(h, deterministic=deterministic)
    h = Linear(self.embed_dim, init='xavier', name='fc2')(h)
    return x + nn.Dropout(self.res_dropout)(h, deterministic=deterministic)


class TransformerEncoder(nn.Module):
  """MulT TransformerEncoder: self-attention when `x_kv` is None, else cross-modal attention with
  query `x` (target modality) and key = value = `x_kv` (source modality)."""
  embed_dim: int
  num_heads: int
  layers: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  attn_mask: bool = True

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
    mask = future_mask(x.shape[1], tk) if self.attn_mask else None
    for i in range(self.layers):
      x = TransformerEncoderLayer(self.embed_dim, self.num_heads, self.attn_dropout,
                                  self.relu_dropout, self.res_dropout,
                                  name=f'layers_{i}')(x, x_k, x_v, mask, deterministic)
    return layer_norm('layer_norm')(x)
