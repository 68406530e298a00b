"""Programs for Cloud TPU compiled on this CPU host (python -m dmd_jax.aot): the real TPU compiler
from `libtpu` (the `tpu` extra) on a slice's devices from `jax.experimental.topologies`.

Every choice that depends on the hardware is made for the devices a program is compiled for: the
TPU programs carry no CPU kernel, no CPU head loop and no CPU compiler options, while CPU training
keeps them (its parity and equivalence tests live elsewhere and pass unchanged).
"""

import dataclasses
import re

import jax
import numpy as np
import pytest

import dmd_jax
from configs import smoke
from dmd_jax.model import target
from dmd_jax.model.kernels import load as native_kernel_builds
from dmd_jax.training import aot, run_config
from dmd_jax.training.steps import Steps, group_mesh

pytest.importorskip('libtpu', reason="the TPU compiler: pip install -e '.[tpu]'")


@pytest.fixture(scope='module')
def slice_devices():
  return aot.topology_devices('v5e:2x2')


def _smoke(**model):
  run = smoke.get_config()
  with run.unlocked():
    run.model.update(model)
  return run


def _eval_args(run, cfg, steps=None):
  """Abstract (params, batch) of the eval step: one member, the config's batch; placed on the
  steps' mesh when given."""
  member = aot.abstract_member_state(run, cfg)
  at = lambda s: {} if steps is None else {'sharding': s}
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype,
                                                       **at(steps and steps.members)),
                        member.params)
  shapes = {k: (v.shape[1:], v.dtype) for k, v in dmd_jax.dummy_batch(cfg, 1).items()}
  shapes.update(mask=((), np.float32), index=((), np.int32))
  batch = {k: jax.ShapeDtypeStruct((run.batch_size,) + shape, dtype, **at(steps and steps.shared))
           for k, (shape, dtype) in shapes.items()}
  return params, batch


def _custom_calls(text: str) -> set[str]:
  return set(re.findall(r'custom_call_target="([^"]+)"', text)) | set(
      re.findall(r'stablehlo.custom_call @([\w.]+)', text))


@pytest.fixture(scope='module')
def smoke_train_row(slice_devices):
  """The smoke config's train step compiled for a v5e:2x2 slice through the function `python -m
  dmd_jax.aot` runs (its row, with the lowered and compiled texts)."""
  (row,) = aot.compile_programs(smoke.get_config(), 'v5e:2x2', programs=('train',),
                                keep_text=True, devices=slice_devices)
  return row


def test_smoke_train_step_compiles_for_a_v5e_slice(smoke_train_row):
  """Compiled by the TPU compiler, within the chip's memory, with TPU choices."""
  row = smoke_train_row
  assert row['compiled'] is True, row['compiled']
  assert (row['device_kind'], row['chips'], row['platform']) == ('TPU v5 lite', 4, 'tpu')
  assert row['hbm_per_chip'] == 16 * 2 ** 30 and 0 < row['bytes_per_chip'] < row['hbm_per_chip']
  assert row['fits'] and row['flops_per_chip'] > 0 and row['roofline_s'] > 0
  assert row['mesh'] == {'seed': 1, 'data': 4} and row['layout'] == 'replicated'
  calls = _custom_calls(row['hlo'])
  assert not {c for c in calls if 'dmd' in c or 'cpu' in c.lower()}, calls


def test_tpu_programs_carry_no_cpu_choices_even_where_the_cpu_takes_them(slice_devices):
  """MOSI unaligned (376 x 500 scores per head: the CPU's head loop and native kernel sizes),
  lowered for the slice and for this CPU: only the CPU program has the native kernel."""
  run = _smoke(attention={**smoke.get_config().model.attention.to_dict(), 'native': 'on'})
  with run.unlocked():
    run.aligned = False
  cfg, _ = aot.model_config(run, jax.devices()[:1])
  cpu_cfg = cfg
  cpu = Steps(cfg, group_mesh(np.asarray(jax.devices()[:1]), 1))
  assert cpu.platform == 'cpu' and cpu.config.attention.platform == 'cpu'
  params, batch = _eval_args(run, cfg)
  if native_kernel_builds():
    assert any('dmd' in c for c in _custom_calls(cpu.eval.lower(params, batch).as_text()))
  # 'on' is an error where the program is not for a CPU: the row says why
  (row,) = aot.compile_programs(run, 'v5e:2x2', programs=('eval',), devices=slice_devices)
  assert 'native attention needs the CPU backend' in row['compiled']
  run.model.attention.native = 'auto'
  cfg, _ = aot.model_config(run, slice_devices)
  tpu = Steps(cfg, group_mesh(np.asarray(slice_devices), 1))
  assert tpu.platform == 'tpu' and tpu.config.attention.platform == 'tpu'
  # a run's model config is made for the devices it is for: this process's by default; steps
  # refuse a config made for other devices
  assert run_config.model(run, slice_devices)[0].attention.platform == 'tpu'
  assert run_config.model(run)[0].attention.platform == 'cpu'
  with pytest.raises(ValueError, match=r"made for cpu \(attention.platform='cpu'\) but these "
                     'steps compile for tpu devices'):
    Steps(run_config.model(run)[0], tpu.mesh)
  with pytest.raises(ValueError, match=r"made for cpu \(attention.platform='auto'\)"):
    Steps(dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention,
                                                                 platform='auto')), tpu.mesh)
  text = tpu.eval.lower(*_eval_args(run, cfg, tpu)).as_text()
  assert not _custom_calls(text), _custom_calls(text)
  # the CPU head loop (lax.map over heads, batch chunks) is not in the TPU program: its loops are
  # the layer scans alone, which the CPU program (native kernel off) has too
  cpu_off = Steps(dataclasses.replace(cpu_cfg, attention=dataclasses.replace(
      cpu_cfg.attention, native='off')), cpu.mesh)
  cpu_text = cpu_off.eval.lower(params, batch).as_text()
  loops = lambda t: t.count('stablehlo.while')
  assert 0 < loops(text) < loops(cpu_text)
  assert target.compiler_options('tpu') is None
  assert target.compiler_options('cpu') == {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'}


def _precisions(text: str) -> tuple[int, set[str]]:
  products = re.findall(r'stablehlo\.(?:dot_general|convolution)[^\n]*', text)
  return len(products), {p for line in products for p in re.findall(r'precision = \[(\w+), ',
                                                                    line)}


def test_float32_setting_traces_highest_precision_products_for_the_slice(smoke_train_row,
                                                                         slice_devices):
  """matmul_precision='float32' (the default): every product of the TPU train step, backward
  included, is at HIGHEST precision; 'default' leaves JAX's DEFAULT (one bf16 pass on TPU)."""
  count, seen = _precisions(smoke_train_row['stablehlo'])
  assert count > 100 and seen == {'HIGHEST'}        # forward and backward of every layer
  run = _smoke(matmul_precision='default')
  cfg, _ = aot.model_config(run, slice_devices)
  steps = Steps(cfg, group_mesh(np.asarray(slice_devices), 1))
  count, seen = _precisions(steps.eval.lower(*_eval_args(run, cfg, steps)).as_text())
  assert count > 50 and seen == {'DEFAULT'}
