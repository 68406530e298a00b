"""The benchmark command's measurements on a tiny network (the real table is bert-base-sized and
runs for minutes; see docs/performance.md)."""

import json
import math

import jax
import pytest

from configs import smoke
from dmd_jax.dev import measure
from dmd_jax.training import run_config

# configs/smoke.py's network (tiny random BERT, d=8), on one device: a benchmark row of the
# command's own programs in a fraction of the 8-device compile (the 8-device path is the same
# code with a larger mesh)
_SMOKE = run_config.model(smoke.get_config())[0]
TINY = dict(bert=_SMOKE.bert, d=_SMOKE.d, num_heads=_SMOKE.num_heads, nlevels=_SMOKE.nlevels)


def test_run_setting_measures_a_case():
  n = 8                                                   # samples per step
  (rec,) = measure.run_setting('mosi_aligned', [n], repeats=2, eval_batches=1,
                                 count_flops=True, devices=jax.devices()[:1], **TINY)
  json.dumps(rec)                                         # one JSON line per case
  assert rec['setting'] == 'mosi_aligned' and rec['seq_lens'] == (50, 50, 50)
  assert rec['batch_size'] == n and rec['devices'] == 1 and rec['dtype'] == 'float32'
  assert rec['platform'] == 'cpu' and rec['jax'] == jax.__version__
  for key in ('compile_s', 'first_step_s', 'micro_step_s', 'update_step_s', 'eval_step_s',
              'eval_compile_s', 'peak_host_rss_gib', 'step_tflop'):
    assert rec[key] > 0, key
  assert rec['timed_micro_steps'] == 2 and rec['timed_update_steps'] == 2
  assert len(rec['micro_steps_s']) == 2 and len(rec['update_steps_s']) == 2
  assert math.isclose(rec['micro_step_s'], sum(rec['micro_steps_s']) / 2, abs_tol=2e-4)
  assert math.isclose(rec['update_step_s'], sum(rec['update_steps_s']) / 2, abs_tol=2e-4)
  assert math.isclose(rec['train_samples_per_s'], n / rec['micro_step_s'], rel_tol=0.01)
  assert math.isclose(rec['eval_samples_per_s'], n / rec['eval_step_s'], rel_tol=0.01)
  assert math.isfinite(rec['loss'])
  # One micro-step: forward + backward is at least 3x the forward matmuls of the text encoder
  # alone (2 * tokens * its layer weights).
  bert = TINY['bert']
  per_token = bert.num_hidden_layers * (4 * bert.hidden_size ** 2
                                        + 2 * bert.hidden_size * bert.intermediate_size)
  assert rec['step_tflop'] * 1e12 > 3 * 2 * n * 50 * per_token
  table = measure.markdown_table([rec, dict(rec, batch_size=2 * n)])
  lines = table.splitlines()
  assert len(lines) == 4 and lines[0].startswith('| setting | batch |')
  assert '| mosi_aligned | %d | float32 |' % n in lines[2]
  assert 'TFLOP/s' in lines[0] and 'peak host RSS' in lines[0]


def test_bad_arguments_are_named():
  with pytest.raises(ValueError, match='unknown setting'):
    measure.run_setting('mosi', [16])
  with pytest.raises(ValueError, match='--batch_sizes: 3 is not a positive multiple'):
    measure.run_setting('mosi_aligned', [3], **TINY)
