"""Test setup: 8 simulated CPU devices (set before jax is imported) and the parity fixtures."""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session and the subprocesses it starts (training
# runs compile the same steps several times).
import tempfile  # noqa: E402
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='dmd-jax-cache-'))

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dmd_jax.config import BertConfig, reference_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ('mosi_aligned_small', 'mosei_unaligned_small')


def parity_root():
  """The reference's parity fixtures: $DMD_PARITY_DIR, else ../shared/parity beside the repo."""
  env = os.environ.get('DMD_PARITY_DIR')
  candidates = [pathlib.Path(env)] if env else []
  candidates.append(REPO.parent / 'shared' / 'parity')
  for c in candidates:
    if (c / FIXTURES[0] / 'variant.json').is_file():
      return c
  return None


class Fixture:
  """One folder of shared/parity: the reference's weights, inputs and results."""

  def __init__(self, path: pathlib.Path):
    self.path = path
    self.variant = json.loads((path / 'variant.json').read_text())
    v = self.variant
    bert = BertConfig.from_json_file(str(path / 'bert' / 'config.json'))
    self.config = reference_config(
        v['dataset'], v['aligned'], bert=bert, d=v['dst_feature_dim'], num_heads=v['nheads'],
        nlevels=v['nlevels'], attn_mask=v['attn_mask'],
        kernel_sizes=tuple(v['conv1d_kernel_sizes_lav']),
        feature_dims=tuple(v['feature_dims']), seq_lens=tuple(v['seq_lens_tav'])
    ).without_dropout()  # the fixtures ran the reference in .eval()

  def npz(self, name):
    with np.load(self.path / name) as z:
      return {k: z[k] for k in z.files}

  def json(self, name):
    return json.loads((self.path / name).read_text())

  def batch(self, i):
    return self.npz(f'batch{i}.npz')


@pytest.fixture(scope='session', params=FIXTURES)
def parity(request):
  root = parity_root()
  if root is None:
    pytest.skip('parity fixtures not found: set DMD_PARITY_DIR to the shared/parity folder, or '
                'place the shared/ folder beside the repository (CI does)')
  return Fixture(root / request.param)
