r"""Import a checkpoint of the PyTorch reference into an orbax checkpoint directory.

    python -m dmd_jax.import_reference --config=configs/mosi.py --dmd=pt/mosi-aligned.pth \
        --out=/tmp/dmd_mosi [--homo_gd=homo.pth --hetero_gd=hetero.pth] [--bert_config=DIR/config.json]

`--dmd` is what the reference trainer saves (`model[0].state_dict()`, e.g. `pt/dmd.pth`), as .pth
(needs torch) or .npz. The GD kernels are optional (the reference does not save them); without
them the GD-Units are freshly initialised. The text encoder's sizes come from `--bert_config`, or
else from the config.json of `config.text_encoder`. The model hyper-parameters come from the run
config, with `--config.x=y` overrides, and must match the checkpoint (a shape mismatch names the key).
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from dmd_jax import cli
from dmd_jax.training.checkpoints import import_to_checkpoint

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Run configuration (configs/*.py).',
                                          lock_config=True)
_DMD = flags.DEFINE_string('dmd', None, 'Reference DMD state dict (.pth or .npz).')
_HOMO = flags.DEFINE_string('homo_gd', None, 'Optional HomoGD state dict.')
_HETERO = flags.DEFINE_string('hetero_gd', None, 'Optional HeteroGD state dict.')
_BERT_CONFIG = flags.DEFINE_string('bert_config', None, 'Hugging Face config.json of the text '
                                   'encoder (default: from config.text_encoder).')
_OUT = flags.DEFINE_string('out', None, 'Checkpoint directory to create.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed for GD-Units that are not imported.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name, flag in (('config', _CONFIG.value), ('dmd', _DMD.value), ('out', _OUT.value)):
    if flag is None:
      raise app.UsageError(f'--{name} is required')
  path = import_to_checkpoint(_CONFIG.value, _DMD.value, _OUT.value, _HOMO.value,
                              _HETERO.value, _BERT_CONFIG.value, _SEED.value)
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
