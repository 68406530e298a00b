"""data_prep: the synthetic MMSA generator, the TFDS builder and its bad-input handling."""

import json
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import data_prep
from dmd_jax.data import mmsa_format, synthetic
from dmd_jax import fileio
from dmd_jax import lock, schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

tfds = pytest.importorskip('tensorflow_datasets')
tfds.disable_progress_bar()

SETTINGS = [('mosi', True), ('mosi', False), ('mosei', True), ('mosei', False)]
SIZES = (13, 5, 4)


def tree(path):
  """Every file and folder below `path` (relative), to compare a data dir before and after."""
  out = set()
  for root, dirs, files in os.walk(path):
    out.update(os.path.relpath(os.path.join(root, n), path) for n in dirs + files)
  return out


@pytest.fixture(scope='module')
def pickles(tmp_path_factory):
  """One small synthetic pickle per setting (MOSI aligned also with the 768-wide 'text' key)."""
  d = tmp_path_factory.mktemp('pickles')
  out = {}
  for dataset, aligned in SETTINGS:
    data = data_prep.generate(dataset, aligned, SIZES, seed=3,
                              text_features=(dataset, aligned) == ('mosi', True))
    out[(dataset, aligned)] = data_prep.write_pickle(
        data, d / f'{mmsa_format.setting_name(dataset, aligned)}.pkl')
  return out


def load(path):
  return fileio.load_pickle(path)


# ---- the synthetic generator ------------------------------------------------------------------

@pytest.mark.parametrize('dataset,aligned', SETTINGS)
def test_synthetic_matches_the_mmsa_layout(pickles, dataset, aligned):
  data = load(pickles[(dataset, aligned)])
  assert set(data) == {'train', 'valid', 'test'}
  shapes = mmsa_format.expected_shapes(dataset, aligned)
  for split, n in zip(mmsa_format.SPLITS, SIZES):
    d = data[split]
    keys = {'id', 'raw_text', 'audio', 'vision', 'text_bert', 'regression_labels',
            'classification_labels', 'annotations'}
    keys |= {'text'} if (dataset, aligned) == ('mosi', True) else set()
    keys |= set() if aligned else {'audio_lengths', 'vision_lengths'}
    assert set(d) == keys
    for key, per_sample in shapes.items():
      assert d[key].shape == (n,) + per_sample and d[key].dtype == np.float32
    assert d['regression_labels'].shape == (n,)
    y = d['regression_labels']
    assert np.all(np.abs(y) <= 3)
    grid = 3 if dataset == 'mosei' else 5            # MOSEI: k/3, MOSI: k/5
    np.testing.assert_allclose(y * grid, np.round(y * grid), atol=1e-5)
    ids, mask, seg = d['text_bert'][:, 0], d['text_bert'][:, 1], d['text_bert'][:, 2]
    assert np.all(ids[:, 0] == 101) and np.all(seg == 0)        # [CLS], one segment
    n_tok = mask.sum(1).astype(int)
    assert np.all(ids[np.arange(n), n_tok - 1] == 102)           # [SEP] closes the text
    assert np.all(ids * (1 - mask) == 0)                         # right-padded with zeros
    if aligned:
      lengths = {'audio': n_tok, 'vision': n_tok}
    else:
      lengths = {'audio': d['audio_lengths'], 'vision': d['vision_lengths']}
    for key in ('audio', 'vision'):
      t = np.arange(d[key].shape[1])[None, :, None]
      tail = np.where(t >= lengths[key][:, None, None], d[key], 0)
      assert not tail.any(), f'{key}: non-zero values after the length'
    assert np.isneginf(d['audio']).any() == (dataset == 'mosei')


def test_synthetic_text_is_the_tokenized_transcript(pickles):
  from transformers import BertTokenizerFast
  tok = BertTokenizerFast.from_pretrained(os.path.dirname(synthetic.default_vocab()))
  d = load(pickles[('mosi', True)])['train']
  for ids, text in zip(d['text_bert'][:, 0].astype(int), d['raw_text']):
    assert tok.decode(ids, skip_special_tokens=True) == text.lower()


def test_synthetic_is_deterministic_for_a_seed():
  a = data_prep.generate('mosei', False, (3, 2, 2), seed=7, text_features=False)
  b = data_prep.generate('mosei', False, (3, 2, 2), seed=7, text_features=False)
  c = data_prep.generate('mosei', False, (3, 2, 2), seed=8, text_features=False)
  for split in a:
    for key in a[split]:
      np.testing.assert_array_equal(a[split][key], b[split][key])
  assert not np.array_equal(a['train']['audio'], c['train']['audio'])


def _r2(x, y):
  x = np.concatenate([x, np.ones((len(x), 1))], 1)
  coef, *_ = np.linalg.lstsq(x, y, rcond=None)
  return 1 - np.var(y - x @ coef) / np.var(y)


def _modality_r2(d):
  """How much of the score a linear read-out of each modality alone explains."""
  y = d['regression_labels'].astype(np.float64)
  words = {w: lv for lv, ws in synthetic._WORDS.items() for w in ws}  # pylint: disable=protected-access
  polarity = np.array([[sum(words.get(w.strip('.'), 0) for w in t.lower().split())]
                       for t in d['raw_text']], np.float64)
  mean = lambda x: x.sum(1) / np.maximum((x != 0).any(-1).sum(1), 1)[:, None]
  return {'text': _r2(polarity, y), 'vision': _r2(mean(d['vision']), y),
          'audio': _r2(mean(np.where(np.isinf(d['audio']), 0, d['audio'])), y)}


def test_synthetic_labels_follow_the_modality_weights():
  d = data_prep.generate('mosi', True, (600, 1, 1), seed=0, text_features=False)['train']
  r2 = _modality_r2(d)
  assert r2['text'] > r2['vision'] > r2['audio'] > 0.02, r2   # default 1.0 / 0.6 / 0.3
  d = data_prep.generate('mosi', True, (600, 1, 1), seed=0, weights=(0, 0, 1),
                         text_features=False)['train']
  r2 = _modality_r2(d)
  assert r2['audio'] > 0.5 and r2['text'] < 0.05 and r2['vision'] < 0.05, r2


def test_synthetic_rejects_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match='sizes'):
    data_prep.generate('mosi', True, (3, 0, 1))
  with pytest.raises(ValueError, match='weights'):
    data_prep.generate('mosi', True, (3, 1, 1), weights=(0, 0, 0))
  with pytest.raises(FileNotFoundError, match='vocabulary file not found'):
    data_prep.generate('mosi', True, (3, 1, 1), vocab=str(tmp_path / 'nope.txt'))


# ---- the builder ------------------------------------------------------------------------------

def _audio_as_stored(d, i):
  audio = d['audio'][i].copy()
  audio[np.isneginf(audio)] = 0
  return audio


@pytest.mark.parametrize('dataset,aligned', SETTINGS)
def test_builder_round_trips_every_field(pickles, tmp_path, dataset, aligned):
  out = data_prep.prepare(pickles[(dataset, aligned)], dataset, aligned, tmp_path,
                          check_sha256=False, num_shards=2)
  assert out == schema.dataset_path(tmp_path, dataset, aligned)
  data = load(pickles[(dataset, aligned)])
  sources = tfds.builder_from_directory(out).as_data_source()
  assert {s: len(v) for s, v in sources.items()} == dict(zip(mmsa_format.SPLITS, SIZES))
  for split in mmsa_format.SPLITS:
    d, src = data[split], sources[split]
    assert len([f for f in os.listdir(out) if f'-{split}.array_record-' in f]) == 2
    for i in range(len(src)):   # stored in the pickle's order
      ex = src[i]
      np.testing.assert_array_equal(ex['text_bert'], d['text_bert'][i].astype(np.int32))
      assert ex['text_bert'].dtype == np.int32
      np.testing.assert_array_equal(ex['audio'], _audio_as_stored(d, i))
      np.testing.assert_array_equal(ex['vision'], d['vision'][i])
      assert ex['label'] == d['regression_labels'][i]
      assert ex['id'].decode() == d['id'][i] and ex['raw_text'].decode() == d['raw_text'][i]
      if aligned:
        assert 'audio_length' not in ex
      else:
        assert ex['audio_length'] == d['audio_lengths'][i]
        assert ex['vision_length'] == d['vision_lengths'][i]
  md = tfds.builder_from_directory(out).info.metadata
  neg = int(sum(np.isneginf(data[s]['audio']).sum() for s in mmsa_format.SPLITS))
  assert sum(md['nonfinite_counts'][s]['audio']['neg_inf'] for s in mmsa_format.SPLITS) == neg
  assert (neg > 0) == (dataset == 'mosei')


def test_cli_converts_and_refuses_to_overwrite(pickles, tmp_path):
  cmd = [sys.executable, '-m', 'data_prep.mmsa', '--dataset=mosi', '--aligned=false',
         f"--pickle={pickles[('mosi', False)]}", f'--data_dir={tmp_path}', '--nocheck_sha256',
         '--num_shards=1']
  run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  out = schema.dataset_path(tmp_path, 'mosi', False)
  assert run.stdout.strip().endswith(out)
  before = tree(tmp_path)
  again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
  assert again.returncode != 0 and 'already exists' in again.stderr and '--overwrite' in again.stderr
  assert tree(tmp_path) == before
  again = subprocess.run(cmd + ['--overwrite'], cwd=REPO, capture_output=True, text=True,
                         check=False)
  assert again.returncode == 0, again.stderr[-2000:]
  assert tree(tmp_path) == before


# ---- bad input: a named error and an untouched data dir ---------------------------------------

def _mutated(tmp_path, pickles, edit, name='bad.pkl'):
  data = load(pickles[('mosi', False)])
  edit(data)
  path = tmp_path / name
  with open(path, 'wb') as f:
    pickle.dump(data, f, protocol=4)
  return path


def _setitem(split, key, value):
  def edit(data):
    data[split][key] = value(data[split][key]) if callable(value) else value
  return edit


BAD_CASES = {
    'missing key': (lambda d: d['valid'].pop('vision'), r"split 'valid' lacks key\(s\) \['vision'\]"),
    'missing split': (lambda d: d.pop('test'), r"missing split\(s\) \['test'\]"),
    'wrong shape': (_setitem('train', 'audio', lambda a: a[:, :, :4]),
                    r"split 'train', key 'audio': wrong shape for mosi_unaligned: expected "
                    r'\(13, 375, 5\), found \(13, 375, 4\)'),
    'wrong dtype': (_setitem('test', 'vision', lambda a: a.astype(str)),
                    r"split 'test', key 'vision': wrong dtype: expected a float or integer array"),
    'row counts disagree': (_setitem('valid', 'audio', lambda a: a[:-1]),
                            r"split 'valid', key 'audio': row count disagrees with "
                            r"'regression_labels': expected 5, found 4"),
    'non-integer token id': (_setitem('train', 'text_bert', lambda a: a + 0.5),
                             r"split 'train', key 'text_bert': sample 0, row 0"),
    'token id past the vocabulary': (
        _setitem('valid', 'text_bert', lambda a: np.where(
            (np.arange(a.shape[0]) == 2)[:, None, None] & (np.arange(3) == 0)[None, :, None]
            & (np.arange(a.shape[2]) == 1)[None, None, :], 1e9, a)),
        r"split 'valid', key 'text_bert': sample 2, row 0, position 1: word-piece id 1e\+09 is "
        r'not an integer in \[0, 30522\)'),
    'mask not 0 or 1': (_setitem('test', 'text_bert', lambda a: a * np.array([1, 3, 1])[:, None]),
                        r"key 'text_bert': sample 0, row 1, position 0: attention mask 3 is not "
                        r'0 or 1'),
    'bad length': (_setitem('train', 'vision_lengths', lambda a: a + 1000),
                   r"split 'train', key 'vision_lengths': sample 0 is not an integer length"),
    'NaN in vision': (_setitem('test', 'vision', lambda a: np.where(
        np.arange(a.shape[1])[None, :, None] == 3, np.nan, a)),
                      r"split 'test', key 'vision': non-finite values .*--nonfinite=zero.*"
                      r'found 80 NaN'),  # 4 samples x 20 dims
    'NaN label': (_setitem('valid', 'regression_labels', lambda a: a * np.nan),
                  r"split 'valid', key 'regression_labels': sample 0 is not finite"),
}


@pytest.mark.parametrize('case', sorted(BAD_CASES))
def test_bad_pickle_is_a_named_error_and_writes_nothing(pickles, tmp_path, case):
  edit, message = BAD_CASES[case]
  path = _mutated(tmp_path, pickles, edit)
  data_dir = tmp_path / 'tfds'
  with pytest.raises(mmsa_format.MmsaFormatError, match=message) as err:
    data_prep.prepare(path, 'mosi', False, data_dir, check_sha256=False)
  assert str(path) in str(err.value)
  assert not data_dir.exists()


class _RunsCode:
  """Unpickling this calls a function: what a hostile 'dataset' file would do."""

  def __reduce__(self):
    return (os.makedirs, ('/tmp/dmd_jax_pwned',))


@pytest.mark.parametrize('protocol', [2, 4, 5])
def test_a_pickle_that_would_run_code_is_refused_naming_file_and_class(pickles, tmp_path,
                                                                       protocol):
  data = load(pickles[('mosi', True)])
  data['train']['extra'] = _RunsCode()
  path = tmp_path / 'hostile.pkl'
  path.write_bytes(pickle.dumps(data, protocol=protocol))
  (tmp_path / 'tfds').mkdir()
  with pytest.raises(mmsa_format.MmsaFormatError,
                     match=f'{path}: refused to load (posix|os).makedirs'):
    data_prep.prepare(path, 'mosi', True, tmp_path / 'tfds', check_sha256=False)
  assert not os.path.exists('/tmp/dmd_jax_pwned') and tree(tmp_path / 'tfds') == set()
  # the same data without the hostile entry reads back whole, at every protocol
  del data['train']['extra']
  back = fileio.load_pickle(pickle.dumps(data, protocol=protocol))
  np.testing.assert_array_equal(back['test']['audio'], data['test']['audio'])
  assert list(back['test']['raw_text']) == list(data['test']['raw_text'])


@pytest.mark.parametrize('cut', ['truncated', 'garbage'])
def test_unreadable_pickle_names_the_file(pickles, tmp_path, cut):
  raw = pathlib.Path(pickles[('mosi', False)]).read_bytes()
  path = tmp_path / 'broken.pkl'
  path.write_bytes(raw[:len(raw) // 2] if cut == 'truncated' else os.urandom(4096))
  (tmp_path / 'tfds').mkdir()
  with pytest.raises(mmsa_format.MmsaFormatError, match=f'{path}: not a readable pickle'):
    data_prep.prepare(path, 'mosi', False, tmp_path / 'tfds', check_sha256=False)
  assert tree(tmp_path / 'tfds') == set()
  with pytest.raises(FileNotFoundError, match='MMSA pickle not found'):
    data_prep.prepare(tmp_path / 'nope.pkl', 'mosi', False, tmp_path / 'tfds', check_sha256=False)


def test_failure_while_writing_leaves_the_data_dir_as_it_was(pickles, tmp_path, monkeypatch):
  data_dir = tmp_path / 'tfds'
  data_prep.prepare(pickles[('mosi', True)], 'mosi', True, data_dir, check_sha256=False)
  before = tree(data_dir)

  def boom(self, split, i):
    if split == 'valid' and i == 2:
      raise RuntimeError('disk full')
    return real(self, split, i)

  real = mmsa_format.MmsaSource.example
  monkeypatch.setattr(mmsa_format.MmsaSource, 'example', boom)
  with pytest.raises(RuntimeError, match='disk full'):
    data_prep.prepare(pickles[('mosi', False)], 'mosi', False, data_dir, check_sha256=False)
  assert tree(data_dir) == before
  with pytest.raises(RuntimeError, match='disk full'):   # an overwrite that fails keeps the old
    data_prep.prepare(pickles[('mosi', True)], 'mosi', True, data_dir, check_sha256=False,
                      overwrite=True)
  assert tree(data_dir) == before
  assert len(tfds.builder_from_directory(
      schema.dataset_path(data_dir, 'mosi', True)).as_data_source()['train']) == SIZES[0]


def test_nonfinite_zero_zeroes_and_counts(pickles, tmp_path):
  def edit(d):
    d['test']['vision'][1, :2, :3] = np.nan
    d['test']['vision'][2, 0, 0] = -np.inf
    d['train']['audio'][0, 0, :2] = np.inf
    d['train']['audio'][1, 0, 0] = -np.inf
  path = _mutated(tmp_path, pickles, edit)
  out = data_prep.prepare(path, 'mosi', False, tmp_path / 'tfds', check_sha256=False,
                          nonfinite='zero')
  b = tfds.builder_from_directory(out)
  counts = b.info.metadata['nonfinite_counts']
  assert counts['test']['vision'] == {'neg_inf': 1, 'pos_inf': 0, 'nan': 6}
  assert counts['train']['audio'] == {'neg_inf': 1, 'pos_inf': 2, 'nan': 0}
  src = b.as_data_source()
  assert not src['test'][1]['vision'][:2, :3].any() and src['test'][2]['vision'][0, 0] == 0
  assert not src['train'][0]['audio'][0, :2].any() and src['train'][1]['audio'][0, 0] == 0
  with pytest.raises(mmsa_format.MmsaFormatError, match="key 'audio'.*2 \\+inf"):
    data_prep.prepare(path, 'mosi', False, tmp_path / 'other', check_sha256=False)


def test_sha256_match_is_logged_and_mismatch_warns(pickles, tmp_path, monkeypatch, caplog):
  path = pickles[('mosei', True)]
  with pytest.warns(data_prep.HashMismatchWarning, match=f'{path}: SHA-256 .* differs from the '
                    'MMSA release of mosei_aligned'):
    out = data_prep.prepare(path, 'mosei', True, tmp_path / 'a')
  assert tfds.builder_from_directory(out).info.metadata['sha256_matches_mmsa'] is False
  digest = mmsa_format.sha256_of(path)
  monkeypatch.setitem(mmsa_format.MMSA_SHA256, ('mosei', True), digest)
  with caplog.at_level('INFO', logger='data_prep'):
    out = data_prep.prepare(path, 'mosei', True, tmp_path / 'b')
  assert 'SHA-256 matches the MMSA release of mosei_aligned' in caplog.text
  md = tfds.builder_from_directory(out).info.metadata
  assert md['sha256_matches_mmsa'] is True and md['source_sha256'] == digest


def test_bad_arguments(pickles, tmp_path):
  p = pickles[('mosi', True)]
  with pytest.raises(ValueError, match='file_format must be one of'):
    data_prep.prepare(p, 'mosi', True, tmp_path, file_format='parquet')
  with pytest.raises(ValueError, match="dataset must be one of \\('mosi', 'mosei'\\)"):
    data_prep.prepare(p, 'iemocap', True, tmp_path)
  with pytest.raises(ValueError, match='num_shards=5 exceeds the smallest split'):
    data_prep.prepare(p, 'mosi', True, tmp_path / 'x', num_shards=5, check_sha256=False)
  with pytest.raises(mmsa_format.MmsaFormatError, match='wrong shape for mosei_aligned'):
    data_prep.prepare(p, 'mosei', True, tmp_path / 'y', check_sha256=False)
  assert not (tmp_path / 'x').exists() and not (tmp_path / 'y').exists()


# ---- file formats -----------------------------------------------------------------------------

def test_without_tensorflow_array_record_spills_to_disk_and_tfrecord_says_what_to_install(
    pickles, tmp_path):
  script = textwrap.dedent(f"""
      import importlib.abc, sys

      class Hide(importlib.abc.MetaPathFinder):   # as if TensorFlow were not installed
        def __init__(self, inner):
          self.inner = inner
        def find_spec(self, name, path=None, target=None):
          if name.split('.')[0] == 'tensorflow':
            return None
          return self.inner.find_spec(name, path, target)
        def invalidate_caches(self):
          getattr(self.inner, 'invalidate_caches', lambda: None)()

      sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
      import numpy as np
      import data_prep
      from dmd_jax.data import builder
      from dmd_jax.fileio import load_pickle
      # A split beyond the memory buffer spills to disk (as MOSEI's do at the 64 MB default):
      # lowered to 4 kB here, so every split spills.
      builder._SPILL_BYTES = 4096
      spilled = []
      add = builder._LocalBucket.add
      builder._LocalBucket.add = lambda self, k, d: (spilled.append(len(d)), add(self, k, d))
      pkl = {str(pickles[('mosi', True)])!r}
      out = data_prep.prepare(pkl, 'mosi', True, {str(tmp_path)!r}, check_sha256=False)
      import tensorflow_datasets as tfds
      source = tfds.builder_from_directory(out).as_data_source()
      data = load_pickle(pkl)
      for split in ('train', 'valid', 'test'):
        rows = [source[split][i] for i in range(len(source[split]))]
        assert [r['id'].decode() for r in rows] == list(data[split]['id']), split
        for r, v in zip(rows, data[split]['vision']):
          np.testing.assert_array_equal(r['vision'], v)
      print('SPILLED', len(spilled))
      assert 'tensorflow' not in sys.modules
      try:
        data_prep.prepare({str(pickles[('mosi', False)])!r}, 'mosi', False, {str(tmp_path)!r},
                          file_format='tfrecord', check_sha256=False)
      except ImportError as e:
        print('ERROR:', e)
  """)
  run = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                       check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  assert int(run.stdout.split('SPILLED ')[1].split()[0]) == sum(SIZES)
  assert "ERROR: file_format='tfrecord' needs TensorFlow" in run.stdout
  assert 'pip install tensorflow-cpu' in run.stdout
  assert sorted(os.listdir(tmp_path / 'mmsa')) == ['mosi_aligned']


def test_tfrecord_round_trip(pickles, tmp_path):
  tf = pytest.importorskip('tensorflow', reason='the tfrecord extra (tensorflow-cpu) is not '
                           'installed')
  del tf
  out = data_prep.prepare(pickles[('mosei', False)], 'mosei', False, tmp_path,
                          file_format='tfrecord', num_shards=2, check_sha256=False)
  assert len([f for f in os.listdir(out) if '-train.tfrecord-' in f]) == 2
  data = load(pickles[('mosei', False)])
  b = tfds.builder_from_directory(out)
  for split in mmsa_format.SPLITS:
    rows = list(tfds.as_numpy(b.as_dataset(split=split, shuffle_files=False)))
    d = data[split]
    assert len(rows) == len(d['regression_labels'])
    for i, ex in enumerate(rows):
      np.testing.assert_array_equal(ex['audio'], _audio_as_stored(d, i))
      np.testing.assert_array_equal(ex['vision'], d['vision'][i])
      np.testing.assert_array_equal(ex['text_bert'], d['text_bert'][i])
      assert ex['label'] == d['regression_labels'][i] and ex['id'].decode() == d['id'][i]
      assert ex['vision_length'] == d['vision_lengths'][i]


# ---- one preparation at a time ------------------------------------------------------------------

def _prep_cmd(pkl, data_dir, *extra):
  return [sys.executable, '-m', 'data_prep.mmsa', '--dataset=mosi', '--aligned=true',
          f'--pickle={pkl}', f'--data_dir={data_dir}', '--nocheck_sha256', *extra]


def _leftovers(data_dir):
  return sorted(n for n in tree(data_dir)
                if any(s in n for s in ('.building-', '.previous', '.lock', '.incomplete')))


def test_concurrent_preparations_never_delete_the_finished_dataset(pickles, tmp_path):
  cmd = _prep_cmd(pickles[('mosi', True)], tmp_path)
  procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  outs = [(p.wait(timeout=600), *p.communicate()) for p in procs]
  codes = sorted(rc for rc, _, _ in outs)
  assert codes[0] == 0 and codes[1] != 0, [e[-1500:] for _, _, e in outs]
  loser = [e for rc, _, e in outs if rc != 0][0]
  assert 'already exists' in loser and '--overwrite' in loser
  out = schema.dataset_path(tmp_path, 'mosi', True)
  assert len(tfds.builder_from_directory(out).as_data_source()['train']) == SIZES[0]
  assert _leftovers(tmp_path) == []


def test_a_second_preparation_waits_for_the_holder_of_the_lock(pickles, tmp_path):
  out = schema.dataset_path(tmp_path, 'mosi', True)
  with lock.hold(os.path.dirname(out) + '.lock', 'test'):
    proc = subprocess.Popen(_prep_cmd(pickles[('mosi', True)], tmp_path), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = ''
    while 'waiting for' not in line and proc.poll() is None:
      line = proc.stderr.readline()
    assert f'waiting for pid {os.getpid()} on' in line, line
    assert not os.path.exists(out)
  rc, (stdout, stderr) = proc.wait(timeout=600), proc.communicate()
  assert rc == 0, stderr[-2000:]
  assert stdout.strip().endswith(out) and _leftovers(tmp_path) == []


def test_a_killed_overwrite_keeps_the_old_dataset_and_the_next_run_cleans_up(pickles, tmp_path):
  data_dir = tmp_path / 'tfds'
  out = data_prep.prepare(pickles[('mosi', True)], 'mosi', True, data_dir, check_sha256=False)
  before = tree(data_dir)
  script = textwrap.dedent(f"""
      import os, signal, sys
      from dmd_jax.data import mmsa_format
      real = mmsa_format.MmsaSource.example
      def example(self, split, i):   # killed half-way through writing the new version
        if split == 'valid' and i == 2:
          os.kill(os.getpid(), signal.SIGKILL)
        return real(self, split, i)
      mmsa_format.MmsaSource.example = example
      sys.argv = {_prep_cmd(pickles[('mosi', True)], data_dir, '--overwrite')[2:]!r}
      from absl import app
      from data_prep import mmsa
      mmsa._define_flags()
      app.run(mmsa.main)
  """)
  run = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True, text=True,
                       check=False)
  assert run.returncode == -9, run.stderr[-2000:]
  left = _leftovers(data_dir)
  assert any('.building-' in n for n in left) and tree(data_dir) > before, left
  assert len(tfds.builder_from_directory(out).as_data_source()['valid']) == SIZES[1]
  with pytest.raises(FileExistsError, match='already exists'):
    data_prep.prepare(pickles[('mosi', True)], 'mosi', True, data_dir, check_sha256=False)
  assert tree(data_dir) == before            # the leftovers went with the next preparation
  data_prep.prepare(pickles[('mosi', True)], 'mosi', True, data_dir, check_sha256=False,
                    overwrite=True)
  assert tree(data_dir) == before


def test_lock_names_its_holder_and_takes_over_a_stale_one(tmp_path):
  path = tmp_path / 'x.lock'
  with lock.hold(path, 'the thing'):
    script = (f'from dmd_jax import lock\nwith lock.hold({str(path)!r}, "the thing"): pass')
    run = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                         text=True, check=False)
    assert run.returncode != 0
    assert f'Busy: the thing is in use by pid {os.getpid()} on ' in run.stderr
  assert not path.exists()
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True).stdout.strip()
  path.write_text(json.dumps({'pid': int(dead), 'host': socket.gethostname(), 'since': 0,
                              'command': 'killed'}))
  said = []
  with lock.hold(path, 'the thing', log=said.append):
    assert json.loads(path.read_text())['pid'] == os.getpid()
  assert len(said) == 1 and f'stale lock of pid {dead}' in said[0]
