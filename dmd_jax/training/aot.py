"""Every program a run uses, compiled ahead of time for a Cloud TPU slice from any host.

    rows = compile_programs(run, 'v5e:2x4')      # run: a configs/*.py ConfigDict

`jax.experimental.topologies` (with `libtpu` installed: `pip install -e '.[tpu]'`) describes a
slice's devices without the slice; `jit(...).lower(<ShapeDtypeStructs sharded over a Mesh of
them>).compile()` runs the real TPU compiler on them. The programs are the ones training builds:
the group train step over the ('seed', 'data') mesh that `train_group` makes for the config's
seeds on that slice (`steps.group_mesh`, the multi-host path of `--config.distributed=true`
included), the eval step, and a bundle's predict step on one chip. No TPU is touched and no
weight is read: parameters and optimizer state are shapes (`jax.eval_shape`).

Each program gives one row: whether it compiled (else the compiler's message), bytes per chip
(arguments + outputs + temporaries - aliased, the compiler's `memory_analysis`), the chip's
memory, FLOPs and bytes accessed per chip (`cost_analysis`) and a roofline: max(FLOPs / peak,
bytes / HBM bandwidth), a lower bound on the step's time (no TPU step has been timed here).
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import importlib.util
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
from jax.experimental import topologies
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dmd_jax.config import BertConfig, DMDConfig, from_run_config
from dmd_jax.model import init_params, predict_step
from dmd_jax.model.target import devices_platform
from dmd_jax.schema import BATCH_KEYS, EVAL_KEYS
from dmd_jax.training.train import cached_optimizer
from dmd_jax.training.run_config import bert_config_of
from dmd_jax.training.state import create_train_state
from dmd_jax.training.steps import Steps, choose_layout, group_mesh, state_bytes

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Per-chip figures from Google Cloud's TPU documentation (cloud.google.com/tpu/docs: the
  pages 'TPU v4', 'TPU v5e', 'TPU v5p' and 'TPU v6e', system architecture tables)."""
  name: str
  hbm_bytes: int             # HBM capacity per chip
  peak_bf16_flops: float     # dense bf16 matmul peak per chip
  hbm_bytes_per_s: float     # HBM bandwidth per chip
  cores: int = 1             # TensorCores per chip


CHIPS = {
    'TPU v4': Chip('v4', 32 * GiB, 275e12, 1200e9, cores=2),
    'TPU v5 lite': Chip('v5e', 16 * GiB, 197e12, 819e9),
    'TPU v5': Chip('v5p', 95 * GiB, 459e12, 2765e9, cores=2),
    'TPU v6 lite': Chip('v6e', 32 * GiB, 918e12, 1640e9),
}
# A float32 product at HIGHEST precision runs as six bf16 passes on a TPU's matrix units (one
# at JAX's DEFAULT): the roofline's compute term divides the bf16 peak by this.
PASSES = {'float32': 6, 'default': 1}
# v4 slices run one device per chip (both TensorCores, 'megacore'), as on a Cloud TPU VM.
_CHIP_CONFIG = {'v4': 'megacore'}


def topology_devices(name: str) -> list:
  """The devices of the TPU slice `name` (e.g. 'v5e:2x4', 'v4:2x2x1') for compiling only."""
  kw = {}
  if name.split(':')[0] in _CHIP_CONFIG:
    kw['chip_config_name'] = _CHIP_CONFIG[name.split(':')[0]]
  if importlib.util.find_spec('libtpu') is None:
    raise RuntimeError(f"--topology={name}: the TPU compiler (libtpu) is not installed; pip "
                       "install -e '.[tpu]'")
  # compile-only devices open no TPU: several such processes may share libtpu (its lock file
  # otherwise admits one per host, e.g. one pytest worker)
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    return list(topologies.get_topology_desc(platform='tpu', topology_name=name, **kw).devices)
  except Exception as e:  # pylint: disable=broad-except   # libtpu's message names the problem
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'--topology={name}: {msg}') from None


def chip_of(device) -> Chip:
  try:
    return CHIPS[device.device_kind]
  except KeyError:
    raise ValueError(f'no figures for device kind {device.device_kind!r}; known: '
                     f'{sorted(CHIPS)}') from None


def model_config(run, devices) -> tuple[DMDConfig, str]:
  """The run's model config for `devices` from shapes alone: the text encoder's config.json
  where it is a local directory or cached hub id, else the sizes in `run.random_bert` (bert-base
  by default; the note says which)."""
  try:
    bert = bert_config_of(run)
    note = f'text encoder {run.text_encoder}'
  except (OSError, ValueError) as e:
    bert = BertConfig.from_dict(dict(run.random_bert))
    note = (f'text encoder {run.text_encoder} not found here ({str(e).splitlines()[0]}); '
            f'shapes from config.random_bert ({bert.hidden_size}x{bert.num_hidden_layers})')
  return from_run_config(run, bert, devices_platform(devices)), note


def _struct(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _batch(cfg: DMDConfig, lead: tuple, keys: Iterable[str]) -> dict[str, tuple]:
  t, a, v = cfg.seq_lens
  _, da, dv = cfg.feature_dims
  shapes = {'text': (3, t), 'audio': (a, da), 'vision': (v, dv), 'labels': (1,), 'mask': (),
            'index': ()}
  dtypes = {'index': jnp.int32}
  return {k: (lead + shapes[k], dtypes.get(k, jnp.float32)) for k in keys}


def abstract_member_state(run, cfg: DMDConfig):
  """One member's train state as shapes (no initialiser runs). The initialiser is traced here,
  with this host's implementation choices: the shapes are those of every platform."""
  tx = cached_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  here = cfg.replace(attention=dataclasses.replace(cfg.attention, platform='auto'))
  return jax.eval_shape(lambda k: create_train_state(init_params(here, k), tx),
                        jax.random.key(0))


def _stacked(tree, k: int):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct((k,) + tuple(x.shape), x.dtype), tree)


def _measure(compiled, chip: Chip, precision: str) -> dict[str, Any]:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  flops = float(cost.get('flops', 0.0))
  accessed = float(cost.get('bytes accessed', 0.0))
  compute_s = flops / (chip.peak_bf16_flops / PASSES[precision])
  memory_s = accessed / chip.hbm_bytes_per_s
  return {'bytes_per_chip': int(total), 'argument_bytes': int(mem.argument_size_in_bytes),
          'output_bytes': int(mem.output_size_in_bytes),
          'temp_bytes': int(mem.temp_size_in_bytes), 'alias_bytes': int(mem.alias_size_in_bytes),
          'flops_per_chip': flops, 'bytes_accessed_per_chip': accessed,
          'roofline_s': max(compute_s, memory_s),
          'bound': 'compute' if compute_s >= memory_s else 'memory'}


def _compile(lowerable, args, row: dict, chip: Chip, precision: str,
             keep_text: bool = False) -> dict:
  t0 = time.perf_counter()
  try:
    lowered = lowerable.lower(*args)
    if keep_text:
      row['stablehlo'] = lowered.as_text()
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except   # the compiler's verdict is the result
    row.update(compiled=str(e).strip().splitlines()[0][:500] if str(e).strip() else repr(e),
               compile_s=round(time.perf_counter() - t0, 1))
    return row
  row['compile_s'] = round(time.perf_counter() - t0, 1)
  row['compiled'] = True
  row.update(_measure(compiled, chip, precision))
  row['fits'] = row['bytes_per_chip'] <= row['hbm_per_chip']
  if keep_text:
    row['hlo'] = compiled.as_text()
  return row


def compile_programs(run, topology: str, *, programs: Iterable[str] = ('train', 'eval',
                                                                        'predict'),
                     layout: Optional[str] = None, predict_batch: int = 32,
                     keep_text: bool = False, devices=None,
                     on_row: Optional[Callable[[dict], None]] = None) -> list[dict[str, Any]]:
  """Compile `programs` of the run config `run` for the TPU slice `topology` (or for `devices`,
  e.g. CPU devices in tests); one row per program (see the module docstring), each also passed
  to `on_row` as soon as it is compiled."""
  devices = topology_devices(topology) if devices is None else list(devices)
  chip = chip_of(devices[0]) if devices[0].platform == 'tpu' else Chip(
      devices[0].platform, 0, 1.0, 1.0)
  cfg, note = model_config(run, devices)
  k = len(run.seeds) if run.get('seeds_per_program', 0) in (0, None) else min(
      len(run.seeds), run.seeds_per_program)
  mesh = group_mesh(np.asarray(devices), k)
  member = abstract_member_state(run, cfg)
  per_device_hbm = chip.hbm_bytes // max(chip.cores // getattr(devices[0], 'num_cores', 1), 1)
  layout = choose_layout(layout or run.get('state_layout', 'auto'), mesh, state_bytes(member), k,
                         per_device_hbm or None)
  steps = Steps(cfg, mesh, layout)
  processes = len({d.process_index for d in devices})
  base = {'topology': topology, 'device_kind': devices[0].device_kind, 'chips': len(devices),
          'hosts': processes, 'members': k, 'mesh': dict(mesh.shape), 'layout': layout,
          'global_batch': run.batch_size, 'matmul_precision': cfg.matmul_precision,
          'platform': steps.platform, 'hbm_per_chip': per_device_hbm,
          'dataset': run.dataset, 'aligned': bool(run.aligned), 'note': note}
  rows = []
  precision = cfg.matmul_precision
  for program in programs:
    row = dict(base, program=program)
    if program == 'train':
      state = _stacked(member, k)
      state = jax.tree.map(lambda s, sh: _struct(s.shape, s.dtype, sh), state,
                           steps.sharding(state))
      batch = {n: _struct(s, d, steps.batches)
               for n, (s, d) in _batch(cfg, (k, run.batch_size), BATCH_KEYS).items()}
      keys = jax.eval_shape(jax.vmap(jax.random.key), jax.ShapeDtypeStruct((k,), jnp.uint32))
      args = (state, batch, _struct(keys.shape, keys.dtype, steps.members),
              _struct((k,), jnp.bool_, steps.members))
      rows.append(_compile(steps.train, args, row, chip, precision, keep_text))
    elif program == 'eval':
      params = _stacked(member.params, k)
      params = jax.tree.map(lambda s, sh: _struct(s.shape, s.dtype, sh), params,
                            steps.sharding(params))
      batch = {n: _struct(s, d, steps.shared)
               for n, (s, d) in _batch(cfg, (run.batch_size,), EVAL_KEYS).items()}
      rows.append(_compile(steps.eval, (params, batch), row, chip, precision, keep_text))
    elif program == 'predict':
      one = NamedSharding(jax.sharding.Mesh(np.asarray(devices[:1]), ('x',)), P())
      params = jax.tree.map(lambda s: _struct(s.shape, s.dtype, one), member.params)
      batch = {n: _struct(s, d, one)
               for n, (s, d) in _batch(cfg, (predict_batch,), BATCH_KEYS).items()}
      row.update(chips=1, members=1, mesh={'x': 1}, layout='single chip',
                 global_batch=predict_batch)
      rows.append(_compile(predict_step(cfg, devices[0].platform), (params, batch), row, chip,
                           precision, keep_text))
    else:
      raise ValueError(f"unknown program {program!r}; choose from 'train', 'eval', 'predict'")
    if on_row:
      on_row(rows[-1])
    _release_compiler_memory()
  return rows


def _release_compiler_memory() -> None:
  """Drops what one program's trace and compile left behind before the next: JAX's caches of
  traced and lowered functions, then freed heap pages back to the OS (glibc keeps them
  otherwise). The MOSEI-unaligned five-seed train step for v4:2x2x1 left the process at 24 GB
  resident, and the small predict step compiled after it was killed for memory."""
  jax.clear_caches()
  gc.collect()
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):     # not glibc
    pass


def fit(run, topology: str, *, max_batch: int = 1024, max_seeds: int = 16,
        layout: Optional[str] = None, log=print) -> dict[str, Any]:
  """The largest global batch (the config's times a power of two, for its seeds) and the largest
  seed count (at the config's batch; doubling, then bisection) whose train step compiles within
  the chip's memory."""
  def fits(**overrides) -> bool:
    r = run.copy_and_resolve_references()
    with r.unlocked():
      for key, value in overrides.items():
        r[key] = value
    row = compile_programs(r, topology, programs=('train',), layout=layout)[0]
    log(format_row(row))
    return row.get('compiled') is True and row['fits']

  batch, n = 0, run.batch_size            # batches stay multiples of the config's
  while n <= max_batch and fits(batch_size=n):
    batch, n = n, 2 * n
  seeds = lambda n: {'seeds': tuple(1111 + i for i in range(n)), 'seeds_per_program': 0}
  low, high = 0, 1                         # doubling, then bisection: low fits, high does not
  while high <= max_seeds and fits(**seeds(high)):
    low, high = high, 2 * high
  high = min(high, max_seeds + 1)
  while high - low > 1:
    mid = (low + high) // 2
    low, high = (mid, high) if fits(**seeds(mid)) else (low, mid)
  return {'topology': topology, 'largest_global_batch': batch,
          'largest_seed_count': low, 'batch_for_seeds': run.batch_size,
          'seeds_for_batch': len(run.seeds)}


COLUMNS = ('program', 'topology', 'chips', 'members', 'global_batch', 'layout', 'compiled',
           'bytes_per_chip', 'hbm_per_chip', 'flops_per_chip', 'roofline_s', 'compile_s')


def format_row(row: Mapping[str, Any]) -> str:
  def cell(key):
    v = row.get(key, '')
    if key in ('bytes_per_chip', 'hbm_per_chip') and isinstance(v, int):
      return f'{v / GiB:.2f} GiB'
    if key == 'flops_per_chip' and isinstance(v, float):
      return f'{v / 1e12:.2f} TFLOP'
    if key == 'roofline_s' and isinstance(v, float):
      return f"{v * 1e3:.2f} ms ({row.get('bound')})"
    if key == 'compiled':
      return ('yes' if row.get('fits') else 'OVER HBM') if v is True else f'FAILED: {v}'
    return str(v)
  return '| ' + ' | '.join(cell(k) for k in COLUMNS) + ' |'


def table_header() -> str:
  return '| ' + ' | '.join(COLUMNS) + ' |\n|' + '---|' * len(COLUMNS)
