r"""DHMD on CMU-MOSI: DMD's released hyper-parameters plus a modality-shared dictionary in each
decoupled space (dmd_jax/model/dictionary.py; design and what is inferred: README, DHMD).

    python -m dmd_jax.main --config=configs/mosi_dhmd.py --workdir=runs/mosi_dhmd
    python -m dmd_jax.main --config=configs/mosi_dhmd.py:unaligned --workdir=runs/mosi_dhmd_u
    python -m dmd_jax.main --config=configs/mosi_dhmd.py --config.model.dictionary.loss=infonce ...
"""

from configs import mosi
from dmd_jax.config import DictionaryConfig


def dictionary():
  """The design note's defaults (dmd_jax.config.DictionaryConfig holds them): every field is a
  switch, e.g. --config.model.dictionary.loss=infonce or .num_atoms=256."""
  return mosi.config_dict(DictionaryConfig())


def get_config(alignment: str = 'aligned'):
  c = mosi.get_config(alignment)
  c.model.dictionary = dictionary()
  return c
