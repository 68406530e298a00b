r"""A tiny MOSI-shaped model with a random 1-layer BERT on a small synthetic dataset: trains in
about a minute on a laptop CPU (mostly compilation). Used by the tests.

    python -m dmd_jax.main --config=configs/smoke.py --workdir=/tmp/dmd_smoke
    python -m dmd_jax.main --config=configs/smoke.py --config.mode=smoke   # random inputs, timing
"""

import ml_collections

from configs import mosi


def get_config(alignment: str = 'aligned'):
  c = mosi.get_config(alignment)
  c.text_encoder = 'random'
  c.random_bert.update(dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=64))
  c.model.d, c.model.num_heads = 8, 2
  c.model.nlevels = 1
  c.batch_size = 8
  c.update_epochs = 2
  c.learning_rate = 1e-3
  c.data_dir = '/tmp/dmd_jax_smoke_data'
  c.synthetic = ml_collections.ConfigDict(dict(sizes=(96, 24, 20), seed=0,
                                               weights=(1.0, 0.6, 0.3)))
  c.max_epochs = 3
  c.seeds = (1111,)
  c.log_every = 4
  return c
