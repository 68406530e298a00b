r"""Entry point: `python -m dmd_jax.main --config=configs/mosi.py [--config.x=y ...]`.

Until the training loop lands (issue: train and evaluate), this runs a smoke test of the whole
training step on random inputs of the configuration's shapes: model build (with the configured
text encoder), the objective, and `smoke_steps` accumulated Adam micro-steps, reporting the loss
terms, compile time and step time.
"""

from __future__ import annotations

import time

from absl import app, logging
import jax
import numpy as np
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run configuration file (configs/*.py).',
                                          lock_config=True)


def smoke(run) -> dict[str, float]:
  import dmd_jax
  from dmd_jax.config import from_run_config
  from dmd_jax.text_encoder import text_encoder, with_text_encoder

  bert_cfg, bert_params = text_encoder(run)
  cfg = from_run_config(run, bert_cfg)
  params = with_text_encoder(dmd_jax.init_params(cfg, jax.random.key(0)), bert_params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  n_bert = sum(x.size for x in jax.tree.leaves(params['text_model']))
  print(f'{cfg.dataset} {"aligned" if cfg.aligned else "unaligned"}: d={cfg.d}, heads='
        f'{cfg.num_heads}, lengths t/a/v={cfg.seq_lens}; {n_params - n_bert:,} DMD+GD parameters '
        f'+ {n_bert:,} text encoder ({run.text_encoder}); devices: {jax.devices()}')
  tx = dmd_jax.reference_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
  state = dmd_jax.create_train_state(params, tx)
  step = dmd_jax.make_train_step(cfg)
  batch = dmd_jax.random_batch(cfg, run.batch_size)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  state, metrics = step(state, batch, key)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(run.smoke_steps - 1):
    state, metrics = step(state, batch, key)
  metrics = jax.device_get(metrics)
  per_step = (time.perf_counter() - t0) / max(run.smoke_steps - 1, 1)
  losses = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
  if not all(np.isfinite(v) for v in losses.values()):
    raise FloatingPointError(f'non-finite loss in smoke run: {losses}')
  print(f'first step (compile + run) {compile_s:.1f}s; then {per_step:.3f}s per micro-step at '
        f'batch {run.batch_size}; {int(state.step)} micro-steps, window {run.update_epochs}')
  print('losses: ' + ', '.join(f'{k}={v:.4f}' for k, v in losses.items()))
  return losses


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if _CONFIG.value is None:
    raise app.UsageError('--config is required, e.g. --config=configs/mosi.py')
  logging.info('config:\n%s', _CONFIG.value)
  smoke(_CONFIG.value)


if __name__ == '__main__':
  app.run(main)
