"""The platform a program is compiled for, and what follows from it.

Implementation choices that depend on the hardware (the XLA compiler options, the native CPU
attention kernel, the CPU head loop and the layer-loop heuristic) are made for the devices a
program is compiled for, never for the host that traces it: a train step traced on a CPU host for
a Cloud TPU slice (python -m dmd_jax.aot) must carry TPU choices. `AttentionConfig.platform`
names that platform; 'auto' means the default backend of the tracing process, which is right for
a program that runs where it is traced (tests, the initialiser). A run's model config is made for
the devices it trains on (`training.run_config.model(run, devices)`, through
`config.from_run_config(run, bert, platform)`); training's steps check that it fits their mesh,
and a stored config is made for another platform with `for_platform` (prediction).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import jax

from dmd_jax.config import AttentionConfig, DMDConfig

# jax's device.platform names -> the platform families the choices are made for
_FAMILY = {'cpu': 'cpu', 'tpu': 'tpu', 'gpu': 'gpu', 'cuda': 'gpu', 'rocm': 'gpu'}


def family(platform: str) -> str:
  """'cpu', 'gpu' or 'tpu' for a jax platform name ('cuda' and 'rocm' are GPUs)."""
  try:
    return _FAMILY[platform]
  except KeyError:
    raise ValueError(f'unknown platform {platform!r}; known: {sorted(_FAMILY)}') from None


def platform_of(config: AttentionConfig) -> str:
  """The platform family a model config's choices are made for ('auto': the default backend)."""
  return family(jax.default_backend()) if config.platform == 'auto' else config.platform


def devices_platform(devices: Iterable) -> str:
  """The one platform family of `devices` (a list or an array of devices: a mesh's, or a TPU
  topology's)."""
  found = {family(d.platform) for d in getattr(devices, 'flat', devices)}
  if len(found) != 1:
    raise ValueError(f'devices of several platforms: {sorted(found)}')
  return found.pop()


def for_platform(cfg: DMDConfig, platform: str) -> DMDConfig:
  """`cfg` with its implementation choices made for `platform` ('cpu', 'gpu', 'tpu')."""
  return cfg.replace(attention=dataclasses.replace(cfg.attention, platform=family(platform)))


def compiler_options(platform: str) -> Optional[dict[str, str]]:
  """XLA options for the top-level jits (train, eval, predict, init) of a program compiled for
  `platform`. On CPU the fast-compile preset: ~10% less compile time and no slower steps here
  (MOSI unaligned, batch 16, 2-core CPU: train step compile 62 -> 57 s, 7.1-7.2 s per step
  either way); the matmuls run in the same library kernels. None (XLA's defaults) elsewhere."""
  if family(platform) == 'cpu':
    return {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'}
  return None
