"""Data preparation: MMSA pickles of CMU-MOSI / CMU-MOSEI -> sharded TFDS datasets.

    python -m data_prep.mmsa --dataset=mosi --aligned=false --pickle=PATH --data_dir=DIR
    python -m data_prep.synthetic --dataset=mosi --aligned=false --out=PATH --sizes=64,16,16

The commands are thin: the work is done by dmd_jax.data (builder.py, mmsa_format.py,
synthetic.py), so data_prep imports dmd_jax and never the other way. The library names are
re-exported here: `data_prep.prepare(...)`, `data_prep.generate(...)` / `data_prep.write_pickle(...)`,
`data_prep.load_source(...)`; they are imported on first use, so a plain `import data_prep` stays
light (TFDS is only imported by the builder).
"""

import importlib

_EXPORTS = {
    'Mmsa': 'builder', 'prepare': 'builder',
    'MMSA_SHA256': 'mmsa_format', 'HashMismatchWarning': 'mmsa_format',
    'MmsaFormatError': 'mmsa_format', 'load_source': 'mmsa_format', 'setting_name': 'mmsa_format',
    'generate': 'synthetic', 'write_pickle': 'synthetic',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'dmd_jax.data.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
