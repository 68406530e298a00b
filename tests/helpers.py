"""Shared test helpers."""

import jax
import jax.numpy as jnp
import numpy as np

import dmd_jax


def random_params(cfg, seed: int = 0):
  """Parameters of `cfg`'s network at the scale of its initialisers, without compiling the
  initialiser (an init compile costs 5-10 s at the reference sizes): weights ~ N(0, 1/fan_in),
  biases ~ N(0, 0.1^2), LayerNorm scales ~ 1 + N(0, 0.1^2)."""
  rs = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda r: dmd_jax.init_params(cfg, r), jax.random.key(0))

  def fill(path, s):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'scale':
      x = 1 + 0.1 * rs.normal(size=s.shape)
    elif len(s.shape) >= 2:
      x = rs.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    else:
      x = 0.1 * rs.normal(size=s.shape)
    return jnp.asarray(x, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
