"""dmd_jax.data.pipeline: per-process slices, seeded epochs, eval padding, epochs that depend on
nothing but (seed, epoch), prepared datasets opened by setting."""

import jax
import numpy as np
import pytest

import data_prep
from dmd_jax.model import batch as batch_lib
from dmd_jax.config import reference_config
from dmd_jax.data.pipeline import Loader, open_dataset, open_split
from dmd_jax.schema import dataset_path
from dmd_jax.training.train import RunSteps

N = 37  # not a multiple of any batch size used below


class CountingSource:
  """A list of MMSA-like records that remembers which indices were read."""

  def __init__(self, n=N):
    rs = np.random.default_rng(0)
    self.records = [{'text_bert': np.full((3, 4), i, np.int32),
                     'audio': rs.normal(size=(5, 2)).astype(np.float32),
                     'vision': rs.normal(size=(6, 3)).astype(np.float32),
                     'label': np.float32(i / 10), 'id': f'clip{i}'.encode()} for i in range(n)]
    self.read = []

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.read.append(i)
    return self.records[i]


def epoch_indices(loader, epoch):
  return [b['index'] for b in loader.epoch(epoch)]


@pytest.mark.parametrize('train', [True, False])
def test_two_processes_see_each_example_once(train):
  sources = [CountingSource(), CountingSource()]
  loaders = [Loader(s, 8, train=train, seed=5, process_index=p, process_count=2, device_count=8)
             for p, s in enumerate(sources)]
  per_process = [np.concatenate(epoch_indices(l, 0)) for l in loaders]
  assert len(per_process[0]) == len(per_process[1])   # same number of batches everywhere
  for l in loaders:
    assert l.local_batch_size == 4 and len(l) == (N // 8 if train else -(-N // 8))
  seen = np.concatenate(per_process)
  real = seen[seen >= 0]
  assert len(real) == len(set(real.tolist()))         # nothing twice
  if train:   # the last partial global batch is dropped (N % 8 = 5 samples)
    assert len(real) == N - N % 8
  else:
    assert sorted(real.tolist()) == list(range(N))
  # each process read only its own samples
  assert set(sources[0].read).isdisjoint(sources[1].read)
  assert sorted(sources[0].read + sources[1].read) == sorted(real.tolist())
  # the blocks of the two processes make up the single-process global batches
  single = Loader(CountingSource(), 8, train=train, seed=5, process_count=1, process_index=0,
                  device_count=8)
  for g, b0, b1 in zip(epoch_indices(single, 0), epoch_indices(loaders[0], 0),
                       epoch_indices(loaders[1], 0)):
    np.testing.assert_array_equal(g, np.concatenate([b0, b1]))


def test_eval_mask_counts_every_sample_once():
  src = CountingSource()
  loader = Loader(src, 8, train=False, process_count=1, process_index=0, device_count=8)
  batches = list(loader.epoch(0))
  assert len(batches) == 5 and all(b['labels'].shape == (8, 1) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == N and mask[:N].all() and not mask[N:].any()
  labels = np.concatenate([b['labels'][:, 0] for b in batches])
  np.testing.assert_allclose((labels * mask).sum(), sum(r['label'] for r in src.records),
                             rtol=1e-6)
  last = batches[-1]
  assert not last['audio'][5:].any() and not last['text'][5:].any()   # padding is zeros
  # a process whose whole block is padding still gets a well-formed batch
  tail = Loader(CountingSource(9), 8, train=False, process_index=1, process_count=2,
                device_count=2)
  b = list(tail.epoch(0))[-1]
  assert b['mask'].tolist() == [0, 0, 0, 0] and b['audio'].shape == (4, 5, 2)


def test_shuffling_is_seeded_per_epoch_and_train_batches_are_full():
  make = lambda seed: Loader(CountingSource(), 8, train=True, seed=seed, process_count=1,
                             process_index=0, device_count=8)
  a, b, c = make(1), make(1), make(2)
  np.testing.assert_array_equal(a.global_order(0), b.global_order(0))
  assert not np.array_equal(a.global_order(0), a.global_order(1))
  assert not np.array_equal(a.global_order(0), c.global_order(0))
  for batch in a.epoch(3):
    assert batch['mask'].all() and batch['text'].shape == (8, 3, 4)
    # each row holds the record named by `index`
    np.testing.assert_array_equal(batch['text'][:, 0, 0], batch['index'].astype(np.float32))


def test_an_epoch_depends_on_the_seed_and_the_epoch_alone():
  """A loader holds no position: a fresh loader (a resumed run's) reads epoch e, or its tail from
  batch k, exactly as one that has read every epoch before it."""
  make = lambda: Loader(CountingSource(), 8, train=True, seed=9, process_count=1,
                        process_index=0, device_count=8)
  used = make()
  before = [list(used.epoch(e)) for e in range(3)]     # 4 batches per epoch
  again = list(used.epoch(1))
  fresh = make()
  for want, got in zip(before[1], again):
    assert want.keys() == got.keys()
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  for want, got in zip(before[2][2:], fresh.epoch(2, start=2)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  assert len(list(fresh.epoch(2, start=2))) == 2
  assert not np.array_equal(before[0][0]['index'], before[1][0]['index'])


def test_bad_batch_sizes_are_named():
  with pytest.raises(ValueError, match=r'multiple of the device count \(8\).*config.batch_size'):
    Loader(CountingSource(), 12, train=True, device_count=8)
  with pytest.raises(ValueError, match='fewer than one global batch'):
    Loader(CountingSource(5), 8, train=True, device_count=8)


def test_a_loaders_batch_spans_the_runs_mesh():
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  loader = Loader(CountingSource(), 16, train=True, seed=0)
  local = next(loader.epoch(0))
  steps = RunSteps(reference_config('mosi', True), mesh)      # nothing compiled: put only
  arrays = steps.put(local, keys=tuple(local))
  assert len(jax.devices()) == 8
  for key, value in local.items():
    assert arrays[key].shape == value.shape
    assert len(arrays[key].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(arrays[key]), value)


def test_prepared_dataset_to_model_batches(tmp_path):
  data = data_prep.generate('mosei', False, (20, 7, 5), seed=1, text_features=False)
  pkl = data_prep.write_pickle(data, tmp_path / 'mosei.pkl')
  data_prep.prepare(pkl, 'mosei', False, tmp_path / 'tfds', num_shards=2, check_sha256=False)
  path = dataset_path(tmp_path / 'tfds', 'mosei', False)
  found, sources = open_dataset(tmp_path / 'tfds', 'mosei', False)
  assert found == path and sorted(sources) == ['test', 'train', 'valid']
  loader = Loader(sources['valid'], 4, train=False, device_count=4)
  batches = list(loader.epoch(0))
  assert len(batches) == 2
  cfg = reference_config('mosei', False)
  want = {k: v.shape[1:] for k, v in batch_lib.dummy_batch(cfg, 1).items()}
  for b in batches:
    batch_lib.check_batch(b)
    assert {k: b[k].shape[1:] for k in want} == want
    assert all(b[k].dtype == np.float32 for k in want)
    for row, i in enumerate(b['index']):
      if i < 0:
        continue
      audio = data['valid']['audio'][i].copy()
      audio[np.isneginf(audio)] = 0
      np.testing.assert_array_equal(b['audio'][row], audio)
      np.testing.assert_array_equal(b['vision'][row], data['valid']['vision'][i])
      np.testing.assert_array_equal(b['text'][row], data['valid']['text_bert'][i])
      assert b['labels'][row, 0] == data['valid']['regression_labels'][i]
  assert sorted(np.concatenate([b['index'] for b in batches]).tolist()) == [-1] + list(range(7))
  with pytest.raises(KeyError, match="no split 'dev'"):
    open_split(path, 'dev')
  with pytest.raises(FileNotFoundError, match='not a prepared dataset'):
    open_split(tmp_path, 'train')
  with pytest.raises(FileNotFoundError, match='no prepared mosei dataset at .*mosei_aligned.*'
                     '--dataset=mosei --aligned=true --pickle=.*aligned_50.pkl'):
    open_dataset(tmp_path / 'tfds', 'mosei', True)
