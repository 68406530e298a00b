"""python -m dmd_jax.aot's parts that need no TPU compiler: the --fit search, the model config
from shapes alone, the state layout choice and the one-line errors."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import mosi, smoke
from dmd_jax.training import aot, steps as steps_lib
from helpers import cpu_env

GiB = 2 ** 30


def test_fit_finds_the_largest_batch_and_seed_count(monkeypatch):
  """With a compiler that fits members x batch <= 80 sample-slots: batch 16 -> 16 doubled while
  5 seeds fit (80/5 = 16), seeds 1.. while batch 16 fits (80/16 = 5); each candidate compiled
  once."""
  tried = []

  def fake(run, topology, programs, layout=None):
    tried.append((len(run.seeds), run.batch_size))
    ok = len(run.seeds) * run.batch_size <= 80
    return [dict(program='train', compiled=True, fits=ok, bytes_per_chip=1, hbm_per_chip=2)]

  monkeypatch.setattr(aot, 'compile_programs', fake)
  found = aot.fit(mosi.get_config(), 'v5e:2x4', max_seeds=16, log=lambda _: None)
  assert (found['largest_global_batch'], found['largest_seed_count']) == (16, 5)
  assert tried == [(5, 16), (5, 32), (1, 16), (2, 16), (4, 16), (8, 16), (6, 16), (5, 16)]


def test_model_config_from_shapes_without_the_encoder_weights():
  run = mosi.get_config()
  with run.unlocked():
    run.text_encoder = '/nonexistent/bert'
  cfg, note = aot.model_config(run, jax.devices())
  assert cfg.attention.platform == 'cpu'
  assert cfg.bert.hidden_size == 768 and cfg.bert.num_hidden_layers == 12
  assert 'not found here' in note and 'config.random_bert (768x12)' in note
  cfg, note = aot.model_config(smoke.get_config(), jax.devices())
  assert cfg.bert.hidden_size == 32 and note == 'text encoder random'


def test_auto_layout_shards_where_replicated_state_crowds_a_device():
  """'auto': fsdp where members x state per device > a quarter of the device; never on CPU."""
  class Dev:      # a TPU device as the layout choice sees it
    platform = 'tpu'
  mesh = type('M', (), {'devices': np.array([Dev()] * 8), 'shape': {'seed': 1, 'data': 8}})()
  one = int(1.7 * GiB)
  assert steps_lib.choose_layout('auto', mesh, one, 5, 16 * GiB) == 'fsdp'      # 8.5 GiB > 4
  assert steps_lib.choose_layout('auto', mesh, one, 1, 16 * GiB) == 'replicated'
  assert steps_lib.choose_layout('auto', mesh, one, 1, 95 * GiB) == 'replicated'
  assert steps_lib.choose_layout('replicated', mesh, one, 5, 16 * GiB) == 'replicated'
  cpu = steps_lib.make_mesh(jax.devices(), 1)
  assert steps_lib.choose_layout('auto', cpu, one, 5, None) == 'replicated'
  with pytest.raises(ValueError, match="state layout must be one of .*got 'zero3'"):
    steps_lib.choose_layout('zero3', mesh, one, 5, 16 * GiB)


def test_member_spec_shards_the_largest_divisible_dimension():
  spec = steps_lib.member_spec
  assert spec((5, 30522, 768), 'fsdp', 8) == jax.sharding.PartitionSpec('seed', None, 'data')
  assert spec((5, 3072, 768), 'fsdp', 8) == jax.sharding.PartitionSpec('seed', 'data')
  assert spec((5, 26619904), 'fsdp', 8) == jax.sharding.PartitionSpec('seed', 'data')
  assert spec((5, 768), 'fsdp', 8) == jax.sharding.PartitionSpec('seed')       # small: whole
  assert spec((5, 30001, 3), 'fsdp', 8) == jax.sharding.PartitionSpec('seed')  # no divisor
  assert spec((5, 30522, 768), 'replicated', 8) == jax.sharding.PartitionSpec('seed')


def test_cli_errors_are_one_line():
  res = subprocess.run([sys.executable, '-m', 'dmd_jax.aot', '--config=configs/smoke.py',
                        '--topology=v9x:1x1'], capture_output=True, text=True, env=cpu_env(1),
                       timeout=300, check=False)
  assert res.returncode == 2
  last = res.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --topology=v9x:1x1: ') or 'libtpu' in last, res.stderr[-2000:]


def test_train_step_compiles_once_across_steps():
  """The state a step returns has the sharding it came in with (axes of size 1 as None), so the
  jitted step is not compiled a second time for its own output (it was: P('seed') in, P() out).
  One device: shardings that differ only in spec are distinct there too (a second compile)."""
  import dmd_jax
  from dmd_jax.training import run_config, train
  run = smoke.get_config()
  cfg, init = run_config.model(run)
  tx = train.cached_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  steps = steps_lib.Steps(cfg, steps_lib.make_mesh(jax.devices()[:1], 1))
  state = steps.put_members(steps_lib.stack([dmd_jax.create_train_state(init(0), tx)]))
  rng, active = steps.keys(np.zeros(1, np.uint32)), steps.put_members(np.ones(1, bool))
  batch = {k: np.asarray(v) for k, v in dmd_jax.random_batch(cfg, 8).items()}
  for _ in range(3):
    state, _ = steps.train(state, steps.put(steps_lib.stack([batch])), rng, active)
  assert steps.train._cache_size() == 1      # pylint: disable=protected-access
