"""Training: data parallelism (8 devices = 1 device = 2 processes), compile counts, exact resume
after SIGKILL, the results table, eval mode, and the failure messages."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
from jax.sharding import Mesh
import numpy as np
import pytest

from configs import smoke
import dmd_jax
from helpers import cpu_env
from dmd_jax.analysis import edges
from dmd_jax.training import checkpoints, experiment, inputs, optim, run_config, train
from dmd_jax.training.checkpoints import save_params
from dmd_jax.data.pipeline import Loader, open_split
from dmd_jax.schema import dataset_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(smoke_run):
  return str(smoke_run.data_dir)


def smoke_config(data_dir, **overrides):
  run = smoke.get_config()
  run.data_dir = data_dir
  run.progress = False
  for k, v in overrides.items():
    setattr(run, k, v)
  return run


def main_cmd(data_dir, workdir, *extra):
  return [sys.executable, '-m', 'dmd_jax.main', '--config=configs/smoke.py', f'--workdir={workdir}',
          f'--config.data_dir={data_dir}', '--config.progress=false', *extra]


@pytest.mark.slow
def test_8_devices_match_1_device(data_dir):
  run = smoke_config(data_dir)
  cfg, init = run_config.model(run)
  loader = Loader(open_split(dataset_path(data_dir, 'mosi', True), 'train'), 8, train=True,
                  seed=1, device_count=8)
  batches = [b for _, b in zip(range(4), loader.epoch(0))]
  results = []
  for devices in (jax.devices(), jax.devices()[:1]):
    steps = train.RunSteps(cfg, Mesh(np.asarray(devices), ('data',)))   # a single run
    tx = optim.reference_optimizer(run.learning_rate, run.update_epochs, run.grad_clip)
    state = jax.device_put(dmd_jax.create_train_state(init(0), tx), steps.replicated)
    rng = jax.device_put(jax.random.key(np.uint32(0)), steps.replicated)
    losses = []
    for i, b in enumerate(batches):
      state, metrics = steps.train(state, steps.put(b), rng)
      losses.append(metrics['total'])
      if i == run.update_epochs - 1:             # right after the first Adam update
        after_update = jax.device_get((state.params, state.opt_state.inner.inner_state[0].mu))
    results.append((np.array(jax.device_get(losses)), *after_update))
    assert len(state.params['text_model']['embeddings']['word_embeddings']['embedding']
               .sharding.device_set) == len(devices)
  (l8, p8, mu8), (l1, p1, mu1) = results
  unflatten = optim.Segments(p1).unflatten       # Adam's moments live on per-segment vectors
  mu8, mu1 = unflatten(mu8), unflatten(mu1)
  np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-6)
  assert not np.allclose(l8[0], l8[-1])          # parameters moved between the steps
  # After the first update (gradients taken at identical parameters): Adam's first moments are
  # sums of gradients and must agree to float precision.
  scale = max(float(np.max(np.abs(m))) for m in jax.tree.leaves(mu1))
  for a, b in zip(jax.tree.leaves(mu8), jax.tree.leaves(mu1)):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale)
  # Parameters agree to 1e-5, except entries whose gradient is zero up to float noise (key biases
  # of attention, GD-Unit biases that cancel in softmax/differences, dead ReLU units): Adam
  # normalises that noise into steps of about +-lr, so there both runs may move by up to lr per
  # update, and nothing else may differ.
  updates = 1
  for (path, a), b, m in zip(jax.tree_util.tree_flatten_with_path(p8)[0], jax.tree.leaves(p1),
                             jax.tree.leaves(mu1)):
    noise = np.abs(m) <= 1e-6 * scale
    diff = np.abs(a - b)
    assert np.all(diff[~noise] <= 1e-5), (jax.tree_util.keystr(path), diff[~noise].max())
    assert np.all(diff[noise] <= 2 * run.learning_rate * updates + 1e-6), jax.tree_util.keystr(path)


@pytest.fixture(scope='module')
def clean_run(smoke_run):
  """One uninterrupted `python -m dmd_jax.main` run of configs/smoke.py (3 epochs, 8 devices),
  shared with tests/predict_test.py (tests/conftest.py)."""
  return smoke_run.workdir


def history(workdir):
  return [json.loads(l) for l in (workdir / 'seed_1111' / 'metrics.jsonl').read_text()
          .splitlines()]


def test_main_writes_results_and_compiles_each_step_once(clean_run):
  result = json.loads((clean_run / 'seed_1111' / 'result.json').read_text())
  assert result['epochs'] == 3 and result['compiles'] == {'train': 1, 'eval': 1}
  assert set(result['test']) == {'Has0_acc_2', 'Has0_F1_score', 'Non0_acc_2', 'Non0_F1_score',
                                 'Mult_acc_5', 'Mult_acc_7', 'MAE', 'Corr', 'Loss'}
  assert [r['step'] for r in history(clean_run)] == [1, 2, 3]
  assert {'train/total', 'valid/Loss', 'valid/Corr', 'test/Non0_F1_score', 'lr'} <= set(
      history(clean_run)[0])
  assert os.listdir(clean_run / 'seed_1111' / 'tensorboard')
  preds = (clean_run / 'seed_1111' / 'predictions_test.csv').read_text().splitlines()
  assert preds[0] == 'index,id,label,prediction' and len(preds) == 1 + 20
  assert sorted(int(r.split(',')[0]) for r in preds[1:]) == list(range(20))
  table = json.loads((clean_run / 'results.json').read_text())
  assert table['dataset'] == 'mosi' and table['aligned'] is True and len(table['seeds']) == 1
  row = table['seeds'][0]
  assert row['commit'] and row['seed'] == 1111 and row['MAE'] == result['test']['MAE']
  assert table['mean_std']['MAE'] == {'mean': result['test']['MAE'], 'std': 0.0}
  assert 'constant prediction' in (clean_run / 'results.md').read_text().lower()
  csv_rows = (clean_run / 'results.csv').read_text().splitlines()
  assert csv_rows[0].startswith('dataset,aligned,commit,seed,best_epoch,Has0_acc_2')
  assert len(csv_rows) == 4                       # header, one seed, mean, std
  assert (clean_run / 'bundle' / 'bundle.json').is_file()  # the best seed's (tests/predict_test.py)


@pytest.mark.slow   # the CI tier resumes an interrupted group in process (tests/seeds_test.py)
def test_sigkill_mid_epoch_then_rerun_finishes_like_an_uninterrupted_run(data_dir, clean_run,
                                                                          tmp_path):
  killed = tmp_path / 'killed'
  proc = subprocess.Popen(main_cmd(data_dir, killed), cwd=REPO, env=cpu_env(8),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  log = killed / 'seed_1111' / 'metrics.jsonl'
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if log.exists() and log.read_text().count('\n') >= 1:   # epoch 1 done: epoch 2 is running
      break
    time.sleep(0.01)
  assert proc.poll() is None, 'the run ended before it could be killed'
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / 'seed_1111' / 'result.json').exists()
  again = subprocess.run(main_cmd(data_dir, killed), cwd=REPO, env=cpu_env(8),
                         capture_output=True, text=True, timeout=900, check=False)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed after epoch' in again.stdout
  want = json.loads((clean_run / 'seed_1111' / 'result.json').read_text())
  got = json.loads((killed / 'seed_1111' / 'result.json').read_text())
  assert got == want
  for name in ('results.csv', 'results.md'):
    assert (killed / name).read_text() == (clean_run / name).read_text()
  final = {r['step']: r for r in history(killed)}   # a re-run epoch is logged again
  assert sorted(final) == [1, 2, 3]
  assert [final[k] for k in (1, 2, 3)] == history(clean_run)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


@pytest.mark.slow   # two processes compiling at once: ~100 s of CI
def test_two_processes_match_one(data_dir, clean_run, tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      main_cmd(data_dir, tmp_path / 'two', '--config.max_epochs=1', '--config.distributed=true',
               f'--config.coordinator_address=localhost:{port}', '--config.num_processes=2',
               f'--config.process_id={i}'),
      cwd=REPO, env=dict(cpu_env(2), JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo'),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  # 2 processes x 2 devices, against the single-process 8-device run's first epoch (the same
  # global batches, so the same numbers up to float reduction order)
  one, two = history(clean_run)[0], history(tmp_path / 'two')[0]
  for key in ('train/total', 'train/task', 'valid/Loss', 'test/Loss', 'test/Corr'):
    assert abs(one[key] - two[key]) <= 1e-5 * max(1.0, abs(one[key])), (key, one[key], two[key])


def test_eval_mode_writes_metrics_and_predictions(data_dir, clean_run, tmp_path):
  run = smoke_config(data_dir, mode='eval', eval_split='valid')
  metrics = experiment.run_eval(run, str(clean_run), log=lambda *_: None)
  saved = json.loads((clean_run / 'eval_valid_metrics.json').read_text())
  assert saved['Loss'] == metrics['Loss'] and saved['split'] == 'valid'
  rows = (clean_run / 'eval_valid_predictions.csv').read_text().splitlines()
  assert len(rows) == 1 + 24 and rows[1].split(',')[1].count('$_$') == 1
  best = json.loads((clean_run / 'seed_1111' / 'result.json').read_text())
  assert best['valid']['Loss'] == pytest.approx(metrics['Loss'], abs=1e-6)
  # a params-only checkpoint, as `python -m dmd_jax.import_reference` writes them
  cfg, init = run_config.model(run)
  with checkpoints.checkpoint_manager(str(clean_run / 'seed_1111' / 'best'), 1) as mngr:
    params, _ = checkpoints.restore_state(mngr, mngr.latest_step(), init(0))
  save_params(str(tmp_path / 'imported'), jax.device_get(params), {'source': 'test'})
  run.checkpoint = str(tmp_path / 'imported')
  again = experiment.run_eval(run, str(tmp_path / 'eval'), log=lambda *_: None)
  assert again == metrics


def test_failures_are_named(data_dir, tmp_path):
  run = smoke_config(str(tmp_path / 'empty'))
  run.synthetic = None
  with pytest.raises(FileNotFoundError, match='python -m data_prep.mmsa --dataset=mosi '
                     '--aligned=true.*, or point --config.data_dir at'):
    inputs.open_data(run)
  # a synthetic config's dataset is made by the command (`prepare_synthetic`), not by a run
  run = smoke_config(str(tmp_path / 'syn'))
  with pytest.raises(FileNotFoundError, match='no prepared synthetic mosi dataset at .*'
                     r'prepare_synthetic\(run\)'):
    inputs.open_data(run)
  inputs.prepare_synthetic(run)
  data = inputs.open_data(run)
  assert data.path == dataset_path(str(tmp_path / 'syn'), 'mosi', True)
  assert sorted(data.train) == list(run.seeds) and len(data.valid.source) == 24
  with pytest.raises(ValueError, match=r'config.batch_size=0: must be >= 1'):
    run_config.validate_run(smoke_config(data_dir, batch_size=0))
  with pytest.raises(ValueError, match=r"config.mode='fit'"):
    run_config.validate_run(smoke_config(data_dir, mode='fit'))
  # As a user runs it: no JAX_PLATFORMS (the TPU compiler of the tpu extra is installed in CI),
  # no PyTorch: the error is the one line on stderr, and nothing else is.
  env = {k: v for k, v in cpu_env(1).items() if k not in ('JAX_PLATFORMS',
                                                           'TRANSFORMERS_NO_ADVISORY_WARNINGS')}
  script = textwrap.dedent(f"""
      import importlib.abc, runpy, sys
      class Hide(importlib.abc.MetaPathFinder):   # as if PyTorch were not installed
        def __init__(self, inner):
          self.inner = inner
        def find_spec(self, name, path=None, target=None):
          return None if name.split('.')[0] == 'torch' else self.inner.find_spec(name, path, target)
        def invalidate_caches(self):
          getattr(self.inner, 'invalidate_caches', lambda: None)()
        def find_distributions(self, *args, **kwargs):
          if 'torch' in str(args) + str(kwargs):
            return iter(())
          return getattr(self.inner, 'find_distributions', lambda *a, **k: iter(()))(*args, **kwargs)
      sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
      sys.argv = {main_cmd(data_dir, tmp_path / 'w', '--config.text_encoder=/no/such/bert')[2:]!r}
      runpy.run_module('dmd_jax.main', run_name='__main__', alter_sys=True)
  """)
  bad = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert bad.returncode == 2 and bad.stdout == ''
  assert len(bad.stderr.splitlines()) == 1, bad.stderr[-3000:]
  assert bad.stderr.startswith('error: ') and '/no/such/bert' in bad.stderr
  assert not (tmp_path / 'w').exists()
  unknown = subprocess.run(main_cmd(data_dir, tmp_path / 'w', '--config.learning_rat=1'),
                           cwd=REPO, env=cpu_env(1), capture_output=True, text=True, timeout=300,
                           check=False)
  assert unknown.returncode != 0 and 'learning_rat' in unknown.stderr


def test_a_checkpoint_resumes_only_on_the_data_order_it_was_trained_on():
  loader = Loader([{}] * 37, 8, train=True, seed=9, device_count=8)
  saved = train.data_order(loader, 3)
  assert saved == {'epoch': 3, 'seed': 9, 'num_examples': 37, 'global_batch_size': 8}
  train.check_data_order(saved, loader, 'seed 9')
  # a checkpoint of an older version (its loader state) is read the same way
  train.check_data_order({**saved, 'batch': 0}, Loader([{}] * 37, 8, train=True, seed=9,
                                                      device_count=8), 'seed 9')
  for other, named in ((Loader([{}] * 37, 8, train=True, seed=10, device_count=8), 'seed=9, '
                        'this run has 10'),
                       (Loader([{}] * 40, 8, train=True, seed=9, device_count=8),
                        'num_examples=37, this run has 40'),
                       (Loader([{}] * 37, 16, train=True, seed=9, device_count=8),
                        'global_batch_size=8, this run has 16')):
    with pytest.raises(ValueError, match=f'seed 9 was trained on data with {named}; train it '
                       'again with --fresh'):
      train.check_data_order(saved, other, 'seed 9')


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, clean_run, tmp_path,
                                                                  monkeypatch):
  work = tmp_path / 'seed'
  shutil.copytree(clean_run / 'seed_1111', work)
  os.remove(work / 'result.json')                    # as if interrupted after epoch 3
  before = sorted(os.listdir(work / 'checkpoints'))
  run = smoke_config(data_dir, max_epochs=4)
  cfg, init = run_config.model(run)

  class Poisoned(train.RunSteps):
    def __init__(self, *args):
      super().__init__(*args)
      inner = self.train

      def poisoned(state, batch, rng):
        state, metrics = inner(state, batch, rng)
        return state, dict(metrics, total=metrics['total'] * np.nan)
      self.train = poisoned

  monkeypatch.setattr(train, 'cached_run_steps', Poisoned)
  data = inputs.open_data(run)
  with pytest.raises(FloatingPointError, match='non-finite training loss in epoch 4'):
    train.train_run(run, cfg, init, train.Member(1111, str(work)), data, log=lambda *_: None)
  assert sorted(os.listdir(work / 'checkpoints')) == before
  assert not (work / 'result.json').exists()


def test_a_run_resumed_after_its_best_epoch_reports_the_best_epochs_parameters(
    data_dir, clean_run, tmp_path):
  """Resumed after an epoch that was not its best, a run still tests the best epoch's
  parameters (from best/), as the uninterrupted run does (it tested the resumed ones)."""
  want = json.loads((clean_run / 'seed_1111' / 'result.json').read_text())
  last = want['epochs']
  assert want['best_epoch'] < last - 1       # the smoke run's best epoch comes before its last two
  work = tmp_path / 'seed'
  shutil.copytree(clean_run / 'seed_1111', work)
  os.remove(work / 'result.json')            # as if killed while saving the last epoch
  shutil.rmtree(work / 'checkpoints' / str(last))
  os.remove(work / 'checkpoints' / f'digests-{last}.json')
  run = smoke_config(data_dir)
  cfg, init = run_config.model(run)
  data = inputs.open_data(run)
  logs = []
  got = train.train_run(run, cfg, init, train.Member(1111, str(work)), data, log=logs.append)
  assert any(f'resumed after epoch {last - 1}' in line for line in logs)
  assert (got['best_epoch'], got['epochs'], got['valid']) == (want['best_epoch'], last,
                                                               want['valid'])
  assert got['test'] == want['test']


# ---- edges (what the GD-Units learned) --------------------------------------------------------

def test_exported_edges_are_normalised_and_match_the_model(data_dir, clean_run):
  seed_dir = clean_run / 'seed_1111'
  with np.load(seed_dir / 'edges_test.npz') as z:
    f = {k: z[k] for k in z.files}
  assert f['homo'].shape == f['hetero'].shape == (20, 3, 3) and len(f['id']) == 20
  for u in edges.UNITS:
    m = f[u]
    assert np.all(m >= 0) and np.all(m[:, np.arange(3), np.arange(3)] == 0)
    np.testing.assert_allclose(m.sum((1, 2)), 1.0, atol=1e-5)
  # the model itself, on the same samples, from the best parameters
  run = smoke_config(data_dir)
  cfg, init = run_config.model(run)
  with checkpoints.checkpoint_manager(str(seed_dir / 'best'), 1) as mngr:
    params, _ = checkpoints.restore_state(mngr, mngr.latest_step(), init(0))
  loader = Loader(open_split(dataset_path(data_dir, 'mosi', True), 'test'), 8, train=False,
                  device_count=8)
  batch = next(loader.epoch(0))
  out = jax.jit(lambda p, b: dmd_jax.forward(p, b, cfg))(params, batch)
  direct = jax.device_get({u: out[f'edges_{u}'] for u in edges.UNITS})
  rows = [int(np.where(f['index'] == i)[0][0]) for i in batch['index']]
  for u in edges.UNITS:
    np.testing.assert_allclose(f[u][rows], direct[u], atol=1e-6)
  # aggregates are the numpy means of the per-sample file
  summary = json.loads((seed_dir / 'edges_test_summary.json').read_text())
  f = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in f.items()}
  for u in edges.UNITS:
    np.testing.assert_allclose(summary[u]['mean'], f[u].mean(0), atol=1e-12)
    np.testing.assert_allclose(summary[u]['std'], f[u].std(0), atol=1e-12)
    pos = f['label'] > 0
    np.testing.assert_allclose(summary[u]['groups']['positive']['mean'], f[u][pos].mean(0),
                               atol=1e-12)
    assert sum(g['count'] for g in summary[u]['groups'].values()) == 20
    np.testing.assert_allclose(summary[u]['weighted_mean'],
                               f[u].mean(0) + np.array(summary[u]['prior']), atol=1e-12)
  for name in ('edges_test_heatmap.png', 'edges_history_train.png', 'edges_history_valid.png'):
    data = (seed_dir / name).read_bytes()
    assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 5000, name
  assert (seed_dir / 'edges_test_heatmap.svg').stat().st_size > 0


def test_edge_history_has_a_row_per_epoch_split_and_unit(clean_run):
  seed_dir = clean_run / 'seed_1111'
  rows = (seed_dir / 'edges_history.csv').read_text().splitlines()
  assert rows[0].startswith('epoch,split,unit,L->V mean,L->A mean,V->L mean,V->A mean')
  keys = [tuple(r.split(',')[:3]) for r in rows[1:]]
  assert keys == [(str(e), s, u) for e in (1, 2, 3) for s in ('train', 'valid', 'test')
                  for u in ('homo', 'hetero')]
  hist = json.loads((seed_dir / 'edges_history.json').read_text())
  assert [h['epoch'] for h in hist] == [1, 2, 3]
  for h in hist:
    for split in ('train', 'valid', 'test'):
      for u in edges.UNITS:   # the six means of a unit sum to 1
        total = sum(h[split][f'{u}/{e}/mean'] for e in edges.EDGE_LABELS)
        assert abs(total - 1) < 1e-5
  logged = history(clean_run)[0]
  assert logged['edges/train/homo/L->A/mean'] == hist[0]['train']['homo/L->A/mean']


def test_train_edge_moments_from_batch_moments():
  rs = np.random.default_rng(0)
  m = rs.dirichlet(np.ones(6) * 400, size=50)              # edges near 1/6, std ~0.007
  batches = m.reshape(5, 10, 6)
  s = batches.sum(1)
  m2 = ((batches - batches.mean(1, keepdims=True)) ** 2).sum(1)
  stats = edges.moment_stats(s.sum(0), m2.sum(0), (s ** 2).sum(0), 10, 5)
  np.testing.assert_allclose(stats['mean'], m.mean(0), atol=1e-12)
  np.testing.assert_allclose(stats['std'], m.std(0), rtol=1e-9)
  mat = np.zeros((50, 3, 3))
  mat[:, [0, 0, 1, 1, 2, 2], [1, 2, 0, 2, 0, 1]] = m          # L->V, L->A, V->L, V->A, A->L, A->V
  np.testing.assert_array_equal(edges.edge_vector(mat), m)


def test_export_command(data_dir, clean_run):
  out = subprocess.run([sys.executable, '-m', 'dmd_jax.export_edges', f'--workdir={clean_run}',
                        '--split=valid', f'--data_dir={data_dir}'], cwd=REPO, env=cpu_env(8),
                       capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'homo: L->V' in out.stdout
  assert not re.search(r'^I\d{4} ', out.stderr, re.M), out.stderr[-3000:]   # no INFO chatter
  d = clean_run / 'edges'
  with np.load(d / 'edges_valid.npz') as z:
    assert z['homo'].shape == (24, 3, 3) and sorted(z['index'].tolist()) == list(range(24))
    ids = [str(i) for i in z['id']]
  assert all('$_$' in i for i in ids)
  csv_rows = (d / 'edges_valid_summary.csv').read_text().splitlines()
  assert csv_rows[0] == 'unit,group,statistic,source,to L,to V,to A'
  assert (d / 'edges_valid_heatmap.png').stat().st_size > 5000


def test_resuming_a_checkpoint_of_another_layout_names_it(tmp_path):
  # e.g. a workdir from a dmd_jax whose optimizer state was one flat vector (now per segment).
  mngr = checkpoints.checkpoint_manager(str(tmp_path / 'ck'), 1)
  checkpoints.save_state(mngr, 3, {'acc': np.zeros(5, np.float32)}, {'epoch': 1})
  with pytest.raises(ValueError, match=r'ck step 3 does not match the state this version trains'):
    checkpoints.restore_state(mngr, 3, {'acc': (np.zeros(3, np.float32), np.zeros(2, np.float32))})
  state, meta = checkpoints.restore_state(mngr, 3, {'acc': np.ones(5, np.float32)})
  np.testing.assert_array_equal(state['acc'], np.zeros(5))
  assert meta == {'epoch': 1}


# ---- a run folder is a faithful record -------------------------------------------------------

def snapshot(folder):
  """Every file below `folder` with its bytes, to show that a command wrote nothing."""
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file()}


def test_a_command_with_another_config_stops_before_writing_anything(data_dir, clean_run,
                                                                      tmp_path):
  work = tmp_path / 'run'
  shutil.copytree(clean_run, work)
  before = snapshot(work)
  for flag, said in (('--config.learning_rate=0.002', 'learning_rate 0.001 -> 0.002'),
                     ('--config.model.nlevels=2', 'model.nlevels 1 -> 2')):
    bad = subprocess.run(main_cmd(data_dir, work, flag), cwd=REPO, env=cpu_env(1),
                         capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 2, bad.stderr[-2000:]
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and said in lines[0] and 'use a new --workdir, or --fresh' in lines[0]
    assert snapshot(work) == before
  # fields that do not decide results may differ, and are named
  run = smoke_config(data_dir, max_epochs=5, figures=False)
  assert run_config.check_run_folder(run, str(work)) == ['figures true -> false',
                                                         'max_epochs 3 -> 5']


def test_eval_uses_the_stored_config_and_fresh_moves_the_run_aside(data_dir, clean_run,
                                                                   tmp_path):
  run = smoke_config(data_dir, mode='eval', eval_split='valid', learning_rate=0.5)
  stored, ignored = run_config.stored_for_eval(run, str(clean_run))
  assert stored.learning_rate == 1e-3 and stored.eval_split == 'valid' and stored.mode == 'eval'
  assert ignored == ['learning_rate 0.001 -> 0.5']
  work = tmp_path / 'run'
  shutil.copytree(clean_run, work)
  before = snapshot(work)
  moved = run_config.move_run_aside(str(work))
  assert os.listdir(work) == [] and moved.startswith(f'{work}.replaced-')
  assert snapshot(type(work)(moved)) == before


def test_one_command_at_a_time_per_run_folder(data_dir, clean_run, tmp_path):
  from dmd_jax import lock  # pylint: disable=import-outside-toplevel
  work = tmp_path / 'run'
  shutil.copytree(clean_run, work)
  before = snapshot(work)
  with lock.hold(work / '.lock', 'test'):
    busy = subprocess.run(main_cmd(data_dir, work), cwd=REPO, env=cpu_env(1),
                          capture_output=True, text=True, timeout=300, check=False)
  assert busy.returncode == 2, busy.stderr[-2000:]
  assert f'the run folder {work} is in use by pid {os.getpid()} on' in busy.stderr
  assert snapshot(work) == before


def test_heatmap_colours_span_each_units_off_diagonal_edges(tmp_path):
  homo = np.full((3, 3), 0.166) + np.array([[0, 1, 3], [2, 0, -1], [0, 1, 0]]) * 1e-3
  hetero = np.array([[0, 0.2, 0.1], [0.3, 0, 0.15], [0.05, 0.2, 0]])
  np.fill_diagonal(homo, 0.0)
  fig = edges.heatmap_figure({'homo': {'mean': homo}, 'hetero': {'mean': hetero}}, 'seed 7')
  panels = [ax for ax in fig.axes if ax.images]
  off = ~np.eye(3, dtype=bool)
  for ax, m in zip(panels, (homo, hetero)):
    im = ax.images[0]
    assert im.get_clim() == pytest.approx((m[off].min(), m[off].max()))
    assert im.get_array().mask.tolist() == np.eye(3, dtype=bool).tolist()   # no edge: masked
  assert [ax.get_ylabel() for ax in fig.axes if not ax.images] == ['mean edge weight'] * 2
  assert fig.get_suptitle() == 'seed 7'
  rows = [{'epoch': e, 'edges': {'train': {f'{u}/{x}/mean': 0.1 * e + (u == 'homo')
                                           for u in edges.UNITS for x in edges.EDGE_LABELS}}}
          for e in (1, 2, 3)]
  paths = edges.plot_history(rows, str(tmp_path / 'h'), 'train', best_epoch=2, seed=7)
  assert [os.path.basename(p) for p in paths] == ['h.png', 'h.svg']
  assert 'best epoch (2)' in (tmp_path / 'h.svg').read_text()


def test_a_damaged_checkpoint_is_passed_over_for_the_newest_intact_one(data_dir, clean_run,
                                                                       tmp_path):
  work = tmp_path / 'run'
  shutil.copytree(clean_run, work)
  ckpts = work / 'seed_1111' / 'checkpoints'
  assert sorted(p.name for p in ckpts.glob('digests-*.json')) == ['digests-2.json',
                                                                 'digests-3.json']
  (work / 'seed_1111' / 'result.json').unlink()      # unfinished: the next command resumes it
  victim = max((p for p in (ckpts / '3').rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(np.random.default_rng(0).bytes(victim.stat().st_size))
  said = []
  run = smoke_config(data_dir, max_epochs=4, figures=False, bundle='')
  experiment.run_training(run, str(work), progress=False, log=said.append)
  assert any(f'checkpoint of epoch 3 is damaged ({ckpts}/3/{victim.relative_to(ckpts / "3")} '
             'changed since it was saved)' in s for s in said), said
  assert any('resumed after epoch 2' in s for s in said), said
  assert [r['step'] for r in history(work)][-2:] == [3, 4]
  for step in (3, 4):                                  # epoch 3 again, then 4: both intact
    assert checkpoints.damaged(checkpoints.checkpoint_manager(str(ckpts), 2), step) is None


@pytest.mark.parametrize('flag,said', [
    ('--config.learning_rat=1', 'error: bad --config override: \'learning_rat\' Did you mean '
                                '"learning_rate"'),
    ('--config.seeds=abc', "error: config.seeds=('abc',): must be a non-empty tuple of distinct "
                           'integers'),
])
def test_a_mistyped_flag_is_one_line_and_writes_nothing(tmp_path, flag, said):
  work = tmp_path / 'w'
  bad = subprocess.run(main_cmd(str(tmp_path / 'data'), work, flag), cwd=REPO, env=cpu_env(1),
                       capture_output=True, text=True, timeout=300, check=False)
  assert bad.returncode == 2 and bad.stdout == ''
  assert bad.stderr.splitlines() == [bad.stderr.strip()] and bad.stderr.startswith(said), \
      bad.stderr[-2000:]
  assert not work.exists() and not (tmp_path / 'data').exists()


def test_progress_bars_only_on_a_terminal():
  from dmd_jax.training import outputs  # pylint: disable=import-outside-toplevel
  assert not sys.stderr.isatty()                   # pytest captures it, as a redirected log
  assert outputs._Progress(True, 3, 10).bar is None  # pylint: disable=protected-access
