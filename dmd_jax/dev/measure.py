"""The benchmark's measurements (the command is `python -m dmd_jax.benchmark`, whose docstring
says what is measured): one setting's cases in this process, tables of the records, and the
bfloat16 drift table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Optional, Sequence

import jax
import jaxlib
import numpy as np

from dmd_jax import config as config_lib
from dmd_jax.model.batch import random_batch
from dmd_jax.dev import parity
from dmd_jax.model import init_params, kernels
from dmd_jax.schema import EVAL_KEYS
from dmd_jax.training.optim import reference_optimizer
from dmd_jax.training.state import create_train_state, train_step
from dmd_jax.training.steps import Steps, make_mesh, member, seed_axis_size, stack

SETTINGS = ('mosi_aligned', 'mosi_unaligned', 'mosei_aligned', 'mosei_unaligned')
# Untimed train steps before the timed ones (micro, update, micro). In one MOSI-aligned batch-16
# process here: first step 7.7 s, then update 4.24 s, micro 4.34 s, and from the fourth step on
# 3.79-4.03 s; timing the third step overstated the steady-state micro-step by ~10%.
WARMUP_STEPS = 3
# Dense peak TFLOP/s per chip by JAX device_kind, for the utilisation column: (float32 matmuls
# as JAX runs them by default (TF32 tensor cores on NVIDIA), bfloat16). Unknown chips get none.
PEAK_TFLOPS = {
    'NVIDIA H100 80GB HBM3': (494.7, 989.4),   # H100 SXM5 datasheet, dense
    'NVIDIA H200': (494.7, 989.4),
    'NVIDIA A100-SXM4-80GB': (156.0, 312.0),
    'NVIDIA A100-SXM4-40GB': (156.0, 312.0),
    'TPU v4': (275.0, 275.0),
    'TPU v5 lite': (197.0, 197.0),
    'TPU v5p': (459.0, 459.0),
}


def hardware() -> dict[str, Any]:
  dev = jax.devices()[0]
  info = {'platform': dev.platform, 'device_kind': dev.device_kind,
          'devices': jax.device_count(), 'processes': jax.process_count(),
          'host_cpus': os.cpu_count(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__}
  if dev.platform == 'cpu':
    kernels.load()
    info['device_kind'] = _cpu_model()
    info['native_attention'] = kernels.kernel_status()
    info['glibc_tunables'] = os.environ.get('GLIBC_TUNABLES', '')
  return info


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'cpu'


def _reset_peak_rss() -> bool:
  """Resets the kernel's RSS high-water mark of this process (Linux >= 4.0)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def _peak_rss_bytes() -> Optional[int]:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import resource  # pylint: disable=import-outside-toplevel  (Unix only)
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_device_bytes() -> Optional[int]:
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peaks = [s.get('peak_bytes_in_use') for s in stats]
  return max(peaks) if peaks and all(p is not None for p in peaks) else None


def _timed(fn, *args):
  t0 = time.perf_counter()
  out = fn(*args)
  jax.block_until_ready(out)
  return out, time.perf_counter() - t0


def step_flops(cfg, state, batch, key) -> Optional[float]:
  """XLA's FLOP count of one micro-step, traced with every loop unrolled (XLA counts a loop
  body once)."""
  unrolled = cfg.replace(attention=config_lib.AttentionConfig(
      impl=cfg.attention.impl, head_loop='off', native='off', layer_loop='unroll'))
  fn = jax.jit(lambda s, b, k: train_step(s, b, k, config=unrolled))
  cost = fn.lower(state, batch, key).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


def _group_inputs(steps: Steps, params, cfg, k: int, bsz: int):
  """A group of `k` identical members (window of 2: the steps alternate micro-step and update
  step, the same code as a window of 10) and one batch per member."""
  state = create_train_state(params, reference_optimizer(update_epochs=2))
  host = {key: np.asarray(v) for key, v in random_batch(cfg, bsz).items()}
  return (steps.put_members(stack([state] * k)), steps.put(stack([host] * k)),
          steps.keys(np.arange(k, dtype=np.uint32)), steps.put_members(np.ones(k, bool)), host)


def _time_steps(train, state, batch, keys, active, repeats: int):
  """(compile-free) first step time, micro-step and update-step times after WARMUP_STEPS."""
  micro, update = [], []
  (state, _), first_s = _timed(train, state, batch, keys, active)   # micro-step 1
  for _ in range(WARMUP_STEPS - 1):
    state, _ = train(state, batch, keys, active)
  jax.block_until_ready(state)
  for step in range(WARMUP_STEPS + 1, WARMUP_STEPS + 1 + 2 * repeats):
    (state, metrics), dt = _timed(train, state, batch, keys, active)
    (update if step % 2 == 0 else micro).append(dt)   # a window of 2 closes on even steps
  return state, metrics, first_s, micro, update


def _peak_memory(platform: str) -> dict[str, Any]:
  if platform == 'cpu':
    return {'peak_host_rss_gib': round(_peak_rss_bytes() / 2**30, 3)}
  peak = _peak_device_bytes()
  return {'peak_device_gib': None if peak is None else round(peak / 2**30, 3)}


def run_setting(setting: str, batch_sizes: Sequence[int], *, dtype: str = 'float32',
                repeats: int = 1, eval_batches: int = 2, count_flops: bool = False,
                seeds: Sequence[int] = (), bert=None, devices=None,
                **overrides) -> list[dict[str, Any]]:
  """Runs the cases of one setting in this process; returns one record per batch size, and with
  `seeds` (e.g. (1, 2, 5)) one 'seeds' record per batch size and member count: K seeds trained
  together in one program against K steps of one seed.

  `bert` replaces the bert-base-sized encoder and `overrides` any DMDConfig field (tests use a
  tiny network); `devices` the mesh's devices (default: all)."""
  if setting not in SETTINGS:
    raise ValueError(f'--settings: unknown setting {setting!r}; choose from {SETTINGS}')
  if repeats < 1 or eval_batches < 1:
    raise ValueError(f'--repeats ({repeats}) and --eval_batches ({eval_batches}) must be >= 1')
  if any(k < 1 for k in seeds):
    raise ValueError(f'--seeds: member counts must be >= 1, got {list(seeds)}')
  dataset, alignment = setting.split('_')
  cfg = config_lib.reference_config(dataset, aligned=alignment == 'aligned', bert=bert,
                                    compute_dtype=dtype, **overrides)
  devices = np.asarray(devices if devices is not None else jax.devices())
  n_dev = devices.size
  for b in batch_sizes:
    if b < 1 or b % n_dev:
      raise ValueError(f'--batch_sizes: {b} is not a positive multiple of the {n_dev} devices')
  hw = dict(hardware(), devices=n_dev)    # the devices of the mesh the steps run on
  t0 = time.perf_counter()
  params = jax.block_until_ready(init_params(cfg, jax.random.key(0)))
  init_s = time.perf_counter() - t0
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  steps = Steps(cfg, make_mesh(devices))
  base = dict(hw, setting=setting, dataset=dataset, aligned=cfg.aligned, seq_lens=cfg.seq_lens,
              dtype=dtype, text_encoder=f'{cfg.bert.hidden_size}x{cfg.bert.num_hidden_layers} '
              '(random)', params=n_params)
  records = []
  for bsz in sorted(batch_sizes):
    _reset_peak_rss()
    state, batch, keys, active, host = _group_inputs(steps, params, cfg, 1, bsz)
    t0 = time.perf_counter()
    train = steps.train.lower(state, batch, keys, active).compile()
    compile_s = time.perf_counter() - t0
    state, metrics, first_s, micro, update = _time_steps(train, state, batch, keys, active,
                                                         repeats)
    loss = float(jax.device_get(metrics['total'])[0])
    flops = (step_flops(cfg, member(state, 0), member(batch, 0), member(keys, 0))
             if count_flops else None)
    del state

    one = stack([params])
    eval_batch = steps.put_shared(dict(host, mask=np.ones(bsz, np.float32),
                                       index=np.arange(bsz, dtype=np.int32)), EVAL_KEYS)
    one = steps.put_members(one)
    t0 = time.perf_counter()
    evaluate = steps.eval.lower(one, eval_batch).compile()
    eval_compile_s = time.perf_counter() - t0
    _timed(evaluate, one, eval_batch)
    eval_times = [_timed(evaluate, one, eval_batch)[1] for _ in range(eval_batches)]

    micro_s, update_s, eval_s = (statistics.median(x) for x in (micro, update, eval_times))
    rec = dict(base, kind='step', batch_size=bsz,
               init_s=round(init_s, 2), compile_s=round(compile_s, 2),
               first_step_s=round(first_s, 3), micro_step_s=round(micro_s, 4),
               update_step_s=round(update_s, 4),
               train_samples_per_s=round(bsz / micro_s, 2),
               eval_compile_s=round(eval_compile_s, 2), eval_step_s=round(eval_s, 4),
               eval_samples_per_s=round(bsz / eval_s, 2), loss=round(loss, 4),
               timed_micro_steps=len(micro), timed_update_steps=len(update),
               micro_steps_s=[round(t, 4) for t in micro],
               update_steps_s=[round(t, 4) for t in update], **_peak_memory(hw['platform']))
    if flops is not None:
      rec['step_tflop'] = round(flops / 1e12, 4)
      rec['achieved_tflops'] = round(flops / micro_s / 1e12, 3)
      peak_t = PEAK_TFLOPS.get(hw['device_kind'])
      if peak_t is not None:
        chip = peak_t[1] if dtype == 'bfloat16' else peak_t[0]
        rec['peak_tflops'] = round(chip * hw['devices'], 1)
        rec['utilisation'] = round(rec['achieved_tflops'] / rec['peak_tflops'], 4)
    records.append(rec)
    records += [_seeds_case(cfg, params, devices, bsz, k, repeats, base, rec)
                for k in sorted(set(seeds))]
  return records


def _seeds_case(cfg, params, devices, bsz: int, k: int, repeats: int, base: dict,
                single: dict) -> dict[str, Any]:
  """K members in one program (the training program of `seed_mode='together'`, on the mesh
  training would use) against K single-member steps."""
  _reset_peak_rss()
  mesh = make_mesh(devices, seed_axis_size(k, devices.size, jax.process_count()))
  steps = Steps(cfg, mesh)
  state, batch, keys, active, _ = _group_inputs(steps, params, cfg, k, bsz)
  t0 = time.perf_counter()
  train = steps.train.lower(state, batch, keys, active).compile()
  compile_s = time.perf_counter() - t0
  state, _, _, micro, update = _time_steps(train, state, batch, keys, active, repeats)
  del state
  micro_s, update_s = statistics.median(micro), statistics.median(update)
  memory = _peak_memory(base['platform'])
  total = next(iter(memory.values()))
  return dict(base, kind='seeds', batch_size=bsz, seeds=k, seed_axis=mesh.shape['seed'],
              compile_s=round(compile_s, 2), micro_step_s=round(micro_s, 4),
              update_step_s=round(update_s, 4),
              sequential_micro_step_s=round(k * single['micro_step_s'], 4),
              sequential_update_step_s=round(k * single['update_step_s'], 4),
              speedup=round(k * single['micro_step_s'] / micro_s, 3),
              time_vs_one_seed=round(micro_s / single['micro_step_s'], 3),
              micro_steps_s=[round(t, 4) for t in micro],
              update_steps_s=[round(t, 4) for t in update], **memory,
              memory_per_seed_gib=None if total is None else round(total / k, 3))


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
  """The step records as a Markdown table (memory and FLOP/s columns as available), and the
  'seeds' records as a second one."""
  steps = [r for r in records if r.get('kind', 'step') == 'step']
  seeds = [r for r in records if r.get('kind') == 'seeds']
  mem = 'peak_host_rss_gib' if any('peak_host_rss_gib' in r for r in records) else \
      'peak_device_gib'
  mem_title = 'peak host RSS (GiB)' if mem == 'peak_host_rss_gib' else 'peak device memory (GiB)'
  cols = [('setting', 'setting'), ('batch_size', 'batch'), ('dtype', 'dtype'),
          ('devices', 'devices'), ('compile_s', 'compile (s)'),
          ('micro_step_s', 'micro-step (s)'), ('update_step_s', 'update step (s)'),
          ('train_samples_per_s', 'train samples/s'), ('eval_samples_per_s', 'eval samples/s'),
          (mem, mem_title)]
  if any('achieved_tflops' in r for r in steps):
    cols += [('achieved_tflops', 'TFLOP/s'), ('utilisation', 'of peak')]
  out = _table(cols, steps)
  if seeds:
    out += '\n\n' + _table(
        [('setting', 'setting'), ('batch_size', 'batch'), ('seeds', 'seeds K'),
         ('seed_axis', 'seed axis'), ('compile_s', 'compile (s)'),
         ('micro_step_s', 'K together: micro-step (s)'),
         ('update_step_s', 'K together: update step (s)'),
         ('sequential_micro_step_s', 'K sequential micro-steps (s)'), ('speedup', 'speed-up'),
         ('time_vs_one_seed', 'time / one seed'), (mem, mem_title),
         ('memory_per_seed_gib', 'per seed (GiB)')], seeds)
  return out


def _table(cols, records) -> str:
  lines = ['| ' + ' | '.join(c[1] for c in cols) + ' |',
           '|' + '|'.join('---' for _ in cols) + '|']
  for r in records:
    cells = []
    for key, _ in cols:
      v = r.get(key)
      if key == 'utilisation' and v is not None:
        v = f'{100 * v:.1f}%'
      cells.append('—' if v is None else str(v))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def drift_table(root: str, dtype: str, matmul_precision: str = 'float32') -> str:
  """Markdown: per parity fixture, the largest relative deviations of the outputs and losses
  under `dtype` and `matmul_precision` ('default' emulates a TPU's one bf16 pass per product)
  from the reference's float32 results (dmd_jax.dev.parity.drift)."""
  lines = ['| fixture | dtype | matmul precision | prediction (output_logit) | edges homo / hetero '
           '| worst output | total loss | worst loss term |', '|---|---|---|---|---|---|---|---|']
  for name in parity.FIXTURES:
    d = parity.drift(os.path.join(root, name), dtype, matmul_precision)
    out, loss = d['outputs'], d['losses']
    worst_o = max(out, key=out.get)
    worst_l = max(loss, key=loss.get)
    lines.append(f"| {name} | {dtype} | {matmul_precision} | {out['output_logit']:.2e} | "
                 f"{out['edges_homo']:.2e} / "
                 f"{out['edges_hetero']:.2e} | {out[worst_o]:.2e} ({worst_o}) | "
                 f"{loss['total']:.2e} | {loss[worst_l]:.2e} ({worst_l}) |")
  return '\n'.join(lines)


def run_in_subprocesses(settings: Sequence[str], args: Sequence[str], *,
                        jsonl: Optional[str] = None, hugepages: bool = True) -> list[dict]:
  """Each setting in its own `python -m dmd_jax.benchmark --child=SETTING *args` process (a
  clean memory high-water mark, no shared caches); its records are printed as JSON lines (and
  appended to `jsonl`) as each setting ends. With `hugepages` on Linux, glibc is asked for
  transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, unless already set)."""
  records = []
  for setting in settings:
    cmd = [sys.executable, '-m', 'dmd_jax.benchmark', f'--child={setting}', *args]
    env = dict(os.environ)
    if hugepages and sys.platform.startswith('linux') and 'GLIBC_TUNABLES' not in env:
      env['GLIBC_TUNABLES'] = 'glibc.malloc.hugetlb=1'
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env, check=False)
    found = [json.loads(line[6:]) for line in proc.stdout.splitlines()
             if line.startswith('BENCH ')]
    if proc.returncode:
      sys.stderr.write(proc.stderr[-4000:])
      raise SystemExit(f'benchmark of {setting} failed (exit {proc.returncode}); '
                       f'command: {" ".join(cmd)}')
    for rec in found:
      line = json.dumps(rec)
      print(line, flush=True)
      if jsonl:
        with open(jsonl, 'a') as f:
          f.write(line + '\n')
    records += found
  return records
