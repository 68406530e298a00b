"""dmd_jax: Decoupled Multimodal Distilling (DMD, CVPR 2023) for emotion recognition in JAX/Flax.

Stages, each a subpackage that imports only the ones before it:
  schema, config, fileio  ->  data  ->  model  ->  objective  ->  analysis  ->  training  ->
inference (bundles, prediction) and dev tools  ->  entry points (main, predict, bundle,
benchmark, export_edges, import_reference). See docs/architecture.md.

The names below are the public API; they are imported on first use, so `import dmd_jax` (or
`dmd_jax.schema` from data_prep) stays light and initialises no JAX backend.
"""

import glob
import importlib
import os
import sys


def _quiet_start() -> None:
  """Keeps start-up chatter of optional packages out of every command's output:
  - on a Linux host without accelerator devices JAX can only use the CPU; saying so up front
    (JAX_PLATFORMS=cpu) keeps an installed TPU compiler (the `tpu` extra, for `dmd_jax.aot`)
    from probing for a TPU and printing five lines of failure;
  - transformers' advice that PyTorch is not installed (it is optional here).
  Variables already set win."""
  if sys.platform.startswith('linux') and 'JAX_PLATFORMS' not in os.environ and not any(
      glob.glob(p) for p in ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*', '/dev/kfd')):
    os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TRANSFORMERS_NO_ADVISORY_WARNINGS', '1')


_quiet_start()

__version__ = '0.2.0'

_EXPORTS = {
    'BertConfig': 'config', 'DMDConfig': 'config', 'AttentionConfig': 'config',
    'DictionaryConfig': 'config', 'reference_config': 'config',
    'DMD': 'model', 'BertModel': 'model', 'init_params': 'model', 'forward': 'model',
    'load_bert': 'model', 'edges_to_matrix': 'model',
    'compute_loss': 'objective', 'dmd_losses': 'objective',
    'dummy_batch': 'model.batch', 'random_batch': 'model.batch', 'check_batch': 'model.batch',
    'TrainState': 'training.state', 'create_train_state': 'training.state',
    'train_step': 'training.state', 'make_train_step': 'training.state',
    'reference_optimizer': 'training.optim', 'accumulate_clipped': 'training.optim',
    'reset_window': 'training.optim', 'set_learning_rate': 'training.optim',
    'EDGE_NAMES': 'schema', 'MODALITIES': 'schema',
    'import_reference': 'model.reference_weights',
    'export_reference': 'model.reference_weights',
    'save_params': 'training.checkpoints', 'restore_params': 'training.checkpoints',
    'load_state_dict': 'model.state_dict',
    'Predictor': 'inference.predictor', 'load_bundle': 'inference.bundle',
    'write_bundle': 'training.export',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'dmd_jax.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
