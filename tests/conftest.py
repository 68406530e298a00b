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

import fcntl  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from dmd_jax.dev.parity import FIXTURES, fixture_config  # noqa: E402
from helpers import prepare_smoke_data  # noqa: E402

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


# The longest files first (per-file test time, one pass on the 2-core AMD host, most first), the
# short ones at the end to fill in. xdist gives whole files to the two workers in this order
# (--dist loadfile --no-loadscope-reorder, setup.cfg), and a worker takes its next file while the
# last two tests of the current one run: a long file at the end would run alone while the other
# worker idles. The order also shares compilations through the cache above: the shared smoke run
# (`smoke_run`, asked for first by predict_test.py) compiles the single-seed smoke program while
# seeds_test.py compiles the four-seed one; the sequential seeds, train_test.py and others then
# load it.
LONGEST_FIRST = ('seeds_test.py', 'predict_test.py', 'train_test.py', 'parity_test.py',
                 'attention_test.py', 'tpu_test.py', 'dhmd_test.py', 'precision_test.py',
                 'model_test.py', 'benchmark_test.py', 'aot_test.py', 'checkpoints_test.py',
                 'transformer_test.py', 'readme_test.py', 'bert_test.py', 'rng_test.py',
                 'layout_test.py')


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest in order


@pytest.fixture(scope='session', params=FIXTURES)
def parity(request):
  """Each parity fixture in turn."""
  return _fixture(request.param)


@pytest.fixture(scope='session')
def parity_first():
  """The first parity fixture alone (for checks of a code path rather than of numbers)."""
  return _fixture(FIXTURES[0])


class SmokeRun:
  """A finished `python -m dmd_jax.main --config=configs/smoke.py` run (3 epochs, 8 devices) on
  configs/smoke.py's synthetic MOSI (aligned): `workdir` (with `bundle/`), `data_dir`, `pkl`."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.workdir, self.data_dir, self.pkl = root / 'run', root / 'data', root / 'data' / 'mosi.pkl'


@pytest.fixture(scope='session')
def smoke_run(tmp_path_factory) -> SmokeRun:
  """One smoke training run for the whole session, shared by the test processes: the first to ask
  trains (under a file lock in the session's common temporary folder), the others wait and read
  it. Tests add files beside it (eval outputs, edge exports) but change nothing it wrote."""
  base = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    base = base.parent                             # shared by the xdist workers
  out = SmokeRun(base / 'smoke_run')
  with open(base / 'smoke_run.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (out.root / 'DONE').exists():
      shutil.rmtree(out.root, ignore_errors=True)  # a failed attempt of another process
      out.data_dir.mkdir(parents=True)
      prepare_smoke_data(out.data_dir)
      env = dict(os.environ, JAX_PLATFORMS='cpu')   # this session's XLA flags: its cache
      res = subprocess.run(
          [sys.executable, '-m', 'dmd_jax.main', '--config=configs/smoke.py',
           f'--workdir={out.workdir}', f'--config.data_dir={out.data_dir}',
           '--config.progress=false'], cwd=REPO, env=env, capture_output=True, text=True,
          timeout=900, check=False)
      assert res.returncode == 0, res.stderr[-3000:]
      (out.root / 'DONE').write_text('')
  return out
