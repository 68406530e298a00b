"""Test setup: 8 simulated CPU devices (set before jax is imported) and the parity fixtures.

XLA's CPU backend runs at optimisation level 0 in the tests: the suite is bound by compilation
(a train step of the smoke model: 20 s at the default level, 13 s at 0), not by the steps (20 ms
-> 55 ms); the programs and their float32 accuracy are the same.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8 '
                      '--xla_backend_optimization_level=0')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache for the session and the subprocesses it starts (training
# runs compile the same steps several times).
import tempfile  # noqa: E402
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='dmd-jax-cache-'))

import json  # noqa: E402
import pathlib  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dmd_jax.dev.parity import FIXTURES, fixture_config  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


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
    self.config = fixture_config(str(path))  # dropout off: the fixtures ran in .eval()

  def npz(self, name):
    with np.load(self.path / name) as z:
      return {k: z[k] for k in z.files}

  def json(self, name):
    return json.loads((self.path / name).read_text())

  def batch(self, i):
    return self.npz(f'batch{i}.npz')


def _fixture(name):
  root = parity_root()
  if root is None:
    pytest.skip('parity fixtures not found: set DMD_PARITY_DIR to the shared/parity folder, or '
                'place the shared/ folder beside the repository (CI does)')
  return Fixture(root / name)


@pytest.fixture(scope='session', params=FIXTURES)
def parity(request):
  """Each parity fixture in turn."""
  return _fixture(request.param)


@pytest.fixture(scope='session')
def parity_first():
  """The first parity fixture alone (for checks of a code path rather than of numbers)."""
  return _fixture(FIXTURES[0])
