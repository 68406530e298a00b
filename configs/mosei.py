r"""CMU-MOSEI with the released DMD hyper-parameters (spec §1.4).

    python -m dmd_jax.main --config=configs/mosei.py            # word-aligned
    python -m dmd_jax.main --config=configs/mosei.py:unaligned
"""

from configs import mosi


def get_config(alignment: str = 'aligned'):
  c = mosi.get_config(alignment)
  c.dataset = 'mosei'
  m = c.model
  m.d, m.num_heads = 30, 6
  m.kernel_sizes = (5, 1, 3)
  m.attn_dropout, m.attn_dropout_a, m.attn_dropout_v = 0.4, 0.0, 0.0
  m.embed_dropout = 0.0
  m.text_dropout = 0.3
  return c
