r"""DHMD on CMU-MOSI: DMD's released hyper-parameters plus a modality-shared dictionary in each
decoupled space (dmd_jax/dictionary.py; design and what is inferred: README, DHMD).

    python -m dmd_jax.main --config=configs/mosi_dhmd.py --workdir=runs/mosi_dhmd
    python -m dmd_jax.main --config=configs/mosi_dhmd.py:unaligned --workdir=runs/mosi_dhmd_u
    python -m dmd_jax.main --config=configs/mosi_dhmd.py --config.model.dictionary.loss=infonce ...
"""

import ml_collections

from configs import mosi


def dictionary() -> ml_collections.ConfigDict:
  """The design note's defaults; every field is a DictionaryConfig switch."""
  return ml_collections.ConfigDict(dict(
      enabled=True,              # False: exactly DMD
      num_atoms=512,             # K atoms per space, shared by l, v, a
      pool='max',                # temporal pooling of atom scores: 'max' | 'mean'
      activation='sparsemax',    # 'sparsemax' | 'softmax'
      temperature=2.0,           # tau; annealed to temperature_end over anneal_steps if set
      temperature_end=ml_collections.FieldReference(None, field_type=float),
      anneal_steps=0,            # micro-steps; 0 = fixed tau
      stop_gradient=False,       # detach the dictionary inputs from the backbone
      loss='label_hinge',        # 'label_hinge' | 'infonce' | 'edge_kl'
      weight=0.1,                # per space, in the total
      kl_eps=1e-6))              # smoothing inside edge_kl


def get_config(alignment: str = 'aligned'):
  c = mosi.get_config(alignment)
  c.model.dictionary = dictionary()
  return c
