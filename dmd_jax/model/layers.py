"""Building blocks with PyTorch's initialisation and numerics: Linear, Conv1d, LayerNorm, and
MulT's data-dependent sinusoidal positions. Batch-major: (B, T, E)."""

from __future__ import annotations

import math

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


class Conv1d(nn.Module):
  """Bias-free 'valid' Conv1d over (B, T, C) with PyTorch's default initialisation; parameter
  `kernel` (k, in, out) as flax's nn.Conv. Computed as k shifted matrix products, not with the
  convolution primitive: vmapped over the members of a group (training.steps) a convolution
  becomes a grouped one, which XLA's SPMD partitioner gets wrong when the members are sharded
  over devices (wrong values for 1-wide kernels, an error for wider ones; tests/seeds_test.py)."""
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                        (k, x.shape[-1], self.features)).astype(x.dtype)
    t = x.shape[-2] - k + 1
    out = x[..., :t, :] @ kernel[0]
    for j in range(1, k):
      out = out + x[..., j:j + t, :] @ kernel[j]
    return out


def conv1d(features: int, kernel: int, name: str) -> Conv1d:
  return Conv1d(features, kernel, name=name)


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
    x32 = x.astype(jnp.float32)                 # statistics and affine in float32 under bf16
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(
        jnp.float32)
    return y.astype(x.dtype)


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
