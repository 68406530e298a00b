"""Shared test helpers."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import data_prep
import dmd_jax
from configs import smoke


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


def smoke_data() -> dict:
  """configs/smoke.py's synthetic MOSI (aligned) splits, as data prep's generator makes them (the
  same every call)."""
  syn = smoke.get_config().synthetic
  return data_prep.generate('mosi', True, tuple(syn.sizes), seed=syn.seed, text_features=False)


def prepare_smoke_data(d) -> str:
  """`smoke_data()` as an MMSA pickle and a prepared dataset in folder `d`; the pickle's path."""
  pkl = data_prep.write_pickle(smoke_data(), os.path.join(d, 'mosi.pkl'))
  data_prep.prepare(pkl, 'mosi', True, d, check_sha256=False)
  return str(pkl)


def synthetic_data_dir(tmp_path_factory) -> str:
  """`prepare_smoke_data` in a fresh folder."""
  d = tmp_path_factory.mktemp('data')
  prepare_smoke_data(d)
  return str(d)


def cpu_env(devices: int = 8) -> dict:
  """The environment for a subprocess on `devices` simulated CPU devices with this session's other
  XLA flags (tests/conftest.py): its compilations then share the session's compilation cache."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  return dict(os.environ, JAX_PLATFORMS='cpu',
              XLA_FLAGS=' '.join([f'--xla_force_host_platform_device_count={devices}'] + flags))


def seed_outputs(workdir, seed):
  """(result.json, metrics.jsonl rows, predictions_test.csv text) of one seed of a run."""
  d = os.path.join(workdir, f'seed_{seed}')
  with open(os.path.join(d, 'result.json')) as f:
    result = json.load(f)
  with open(os.path.join(d, 'metrics.jsonl')) as f:
    history = [json.loads(l) for l in f]
  with open(os.path.join(d, 'predictions_test.csv')) as f:
    preds = f.read()
  return result, history, preds
