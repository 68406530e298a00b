r"""CMU-MOSEI with the released DMD hyper-parameters (spec §1.4).

    python -m dmd_jax.main --config=configs/mosei.py            # word-aligned
    python -m dmd_jax.main --config=configs/mosei.py:unaligned
"""

from configs import mosi


def get_config(alignment: str = 'aligned'):
  return mosi.base_config('mosei', alignment)
