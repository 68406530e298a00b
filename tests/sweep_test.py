"""A hyper-parameter sweep trained along the member axis: each grid point stops on its own and
gets its folder and table; an interrupted group resumes exactly and its finished members are not
retrained. (Its own file so that xdist runs it beside tests/seeds_test.py.)"""

import json

import pytest

from configs import smoke
from helpers import seed_outputs, synthetic_data_dir
from dmd_jax.training import experiment, loop


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return synthetic_data_dir(tmp_path_factory)


SWEEP_LRS = (0.0, 0.0001, 0.0003, 0.001)


def _sweep_run(data_dir):
  run = smoke.get_config()
  run.data_dir, run.progress, run.seeds, run.max_epochs, run.early_stop = \
      data_dir, False, (1111,), 3, 1
  run.sweep.learning_rate = SWEEP_LRS
  run.figures = False
  return run


@pytest.fixture(scope='module')
def sweep(data_dir, tmp_path_factory):
  """Four members (the program of tests/seeds_test.py's four seeds, from the compilation
  cache when that ran first)."""
  workdir = tmp_path_factory.mktemp('sweep')
  table = experiment.run_training(_sweep_run(data_dir), str(workdir), progress=False,
                                  log=lambda *_: None)
  return workdir, table


def test_sweep_members_stop_on_their_own_and_get_their_folders(sweep):
  """A member with learning rate 0 never improves after its first epoch: with early_stop=1 it
  stops after epoch 2 while the others train on to max_epochs."""
  workdir, table = sweep
  assert set(table['sweep']) == {'learning_rate=0', 'learning_rate=0.0001',
                                 'learning_rate=0.0003', 'learning_rate=0.001'}
  frozen, frozen_hist, _ = seed_outputs(str(workdir / 'learning_rate=0'), 1111)
  trained, hist, _ = seed_outputs(str(workdir / 'learning_rate=0.0003'), 1111)
  assert frozen['epochs'] == 2 and frozen['hparams'] == {'learning_rate': 0.0}
  assert [h['lr'] for h in frozen_hist] == [0.0, 0.0]
  assert trained['epochs'] == 3 and trained['hparams'] == {'learning_rate': 0.0003}
  assert hist[-1]['lr'] == pytest.approx(0.0003)
  sweep_md = (workdir / 'sweep.md').read_text().splitlines()
  assert sweep_md[0].startswith('| member | seeds |') and len(sweep_md) == 6
  assert json.loads((workdir / 'sweep.json').read_text()).keys() == table['sweep'].keys()
  assert (workdir / 'learning_rate=0' / 'results.md').exists()
  # figures off: the edge numbers without the plots
  seed_dir = workdir / 'learning_rate=0' / 'seed_1111'
  assert (seed_dir / 'edges_test_summary.json').exists() and (seed_dir / 'edges_history.csv').exists()
  assert not list(seed_dir.glob('*.png')) and not list(seed_dir.glob('*.svg'))


def test_interrupted_group_resumes_exactly_and_finished_members_are_not_retrained(
    data_dir, sweep, tmp_path, monkeypatch):
  """The sweep stopped in the middle of epoch 3 (its lr=0 member already finished after epoch
  2), then run again: the same outputs as the uninterrupted run, the finished member untouched.
  (The lr=0.001 member may stop after epoch 2 as well: the test reads what the uninterrupted run
  did.)"""
  want, _ = sweep
  calls = []

  def interrupted(*args):
    calls.append(1)
    if len(calls) == 3:                              # epoch 3
      count = []

      def on_step():
        count.append(1)
        if len(count) == 5:
          raise KeyboardInterrupt('simulated kill')
      args = args[:-2] + (on_step,) + args[-1:]
    return real(*args)
  real = loop.train_epoch
  monkeypatch.setattr(loop, 'train_epoch', interrupted)
  with pytest.raises(KeyboardInterrupt):
    experiment.run_training(_sweep_run(data_dir), str(tmp_path), progress=False,
                            log=lambda *_: None)
  monkeypatch.setattr(loop, 'train_epoch', real)
  finished = tmp_path / 'learning_rate=0' / 'seed_1111' / 'result.json'
  assert finished.exists() and not (tmp_path / 'learning_rate=0.0001' / 'seed_1111' /
                                    'result.json').exists()
  running = [f for f in ('learning_rate=0.0001', 'learning_rate=0.0003', 'learning_rate=0.001')
             if seed_outputs(str(want / f), 1111)[0]['epochs'] == 3]
  stamp = finished.stat().st_mtime_ns
  logs = []
  experiment.run_training(_sweep_run(data_dir), str(tmp_path), progress=False, log=logs.append)
  assert finished.stat().st_mtime_ns == stamp                     # not retrained
  assert len(running) >= 2
  assert sum('resumed after epoch 2' in l for l in logs) == len(running)
  assert sum('finished earlier' in l for l in logs) == 4 - len(running)
  assert sum(' epoch 3:' in l for l in logs) == len(running)
  assert not any(' epoch 2:' in l for l in logs)
  for folder in ('learning_rate=0', 'learning_rate=0.0001', 'learning_rate=0.0003',
                 'learning_rate=0.001'):
    got, got_hist, got_preds = seed_outputs(str(tmp_path / folder), 1111)
    exp, exp_hist, exp_preds = seed_outputs(str(want / folder), 1111)
    # everything but the count of compilations, which depends on what this process compiled
    assert {k: v for k, v in got.items() if k != 'compiles'} == \
        {k: v for k, v in exp.items() if k != 'compiles'} and got_preds == exp_preds
    assert [{k: v for k, v in h.items() if k != 'seconds'} for h in got_hist] == \
        [{k: v for k, v in h.items() if k != 'seconds'} for h in exp_hist]
  assert (tmp_path / 'sweep.json').read_text() == (want / 'sweep.json').read_text()
