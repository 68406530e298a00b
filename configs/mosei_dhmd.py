r"""DHMD on CMU-MOSEI (configs/mosei.py plus the dictionaries of configs/mosi_dhmd.py).

    python -m dmd_jax.main --config=configs/mosei_dhmd.py --workdir=runs/mosei_dhmd
    python -m dmd_jax.main --config=configs/mosei_dhmd.py:unaligned --workdir=runs/mosei_dhmd_u
"""

from configs import mosei, mosi_dhmd


def get_config(alignment: str = 'aligned'):
  c = mosei.get_config(alignment)
  c.model.dictionary = mosi_dhmd.dictionary()
  return c
