r"""A tiny MOSI-shaped model with a random 2-layer BERT: runs in seconds on a laptop CPU.

    python -m dmd_jax.main --config=configs/smoke.py
"""

from configs import mosi


def get_config(alignment: str = 'aligned'):
  c = mosi.get_config(alignment)
  c.text_encoder = 'random'
  c.random_bert.update(dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64))
  c.model.d, c.model.num_heads = 8, 2
  c.batch_size = 4
  c.update_epochs = 2
  return c
