"""Data preparation: MMSA pickles of CMU-MOSI / CMU-MOSEI -> sharded TFDS datasets.

    python -m data_prep.mmsa --dataset=mosi --aligned=false --pickle=PATH --data_dir=DIR
    python -m data_prep.synthetic --dataset=mosi --aligned=false --out=PATH --sizes=64,16,16

Library use: `data_prep.prepare(...)` (builder.py), `data_prep.generate(...)` /
`data_prep.write_pickle(...)` (synthetic.py), `data_prep.load_source(...)` (mmsa_format.py).
Names are imported on first use, so `python -m data_prep.<command>` and a plain `import data_prep`
stay light (TFDS is only imported by the builder).
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
    return getattr(importlib.import_module(f'data_prep.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
