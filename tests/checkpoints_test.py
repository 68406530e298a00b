"""Reference state dicts <-> parameters, errors that name keys, orbax round trips, the CLI."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import dmd_jax
from dmd_jax.config import BertConfig, reference_config
from dmd_jax.model.state_dict import torch_key
from dmd_jax.model.reference_weights import import_reference
from dmd_jax.training.checkpoints import restore_params, save_params

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = reference_config('mosi', bert=BertConfig.tiny(hidden_size=16, layers=1), d=4, num_heads=2,
                       nlevels=1)


@pytest.fixture(scope='module')
def params():
  return jax.device_get(dmd_jax.init_params(CFG, jax.random.key(0)))


def test_key_mapping():
  assert torch_key(('trans_l_mem', 'layers_3', 'self_attn', 'in_proj_kernel')) == \
      'trans_l_mem.layers.3.self_attn.in_proj_weight'
  assert torch_key(('trans_l_mem', 'layers_0', 'layer_norms_1', 'scale')) == \
      'trans_l_mem.layers.0.layer_norms.1.weight'
  assert torch_key(('text_model', 'encoder', 'layer_1', 'attention', 'self', 'query', 'kernel')) \
      == 'text_model.model.encoder.layer.1.attention.self.query.weight'
  assert torch_key(('text_model', 'embeddings', 'word_embeddings', 'embedding')) == \
      'text_model.model.embeddings.word_embeddings.weight'


def test_export_import_round_trip(params):
  dmd, homo, hetero = dmd_jax.export_reference(params)
  assert dmd['proj_l.weight'].shape == (4, 16, 5)  # torch Conv1d layout (out, in, k)
  assert dmd['align_c_l.weight'].shape == (4, 4 * 46)  # torch Linear layout (out, in)
  dmd['trans_l_mem.version'] = np.ones(1)  # buffers are ignored
  back = import_reference(CFG, dmd, homo, hetero)
  jax.tree.map(np.testing.assert_array_equal, back, params)


def test_errors_name_the_key(params):
  dmd, homo, hetero = dmd_jax.export_reference(params)
  missing = {k: v for k, v in dmd.items() if k != 'weight_c.bias'}
  with pytest.raises(ValueError, match=r"missing key\(s\): weight_c.bias"):
    import_reference(CFG, missing, homo, hetero)
  with pytest.raises(ValueError, match=r"unexpected key\(s\): extra.weight"):
    import_reference(CFG, dict(dmd, **{'extra.weight': np.ones(2)}), homo, hetero)
  wrong = dict(dmd, **{'proj_a.weight': np.ones((4, 5, 3))})
  with pytest.raises(ValueError, match=r'proj_a.weight: expected \(4, 5, 5\) .* found \(4, 5, 3\)'):
    import_reference(CFG, wrong, homo, hetero)
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    import_reference(CFG, '/nowhere.pth')


def test_gd_units_fresh_when_not_given(params):
  dmd, _, _ = dmd_jax.export_reference(params)
  got = import_reference(CFG, dmd, rng=jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, got['homo_gd'], params['homo_gd'])


def test_pth_files(params, tmp_path):
  torch = pytest.importorskip('torch')
  dmd, homo, hetero = dmd_jax.export_reference(params)
  for name, sd in (('dmd', dmd), ('homo', homo), ('hetero', hetero)):
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()},
               tmp_path / f'{name}.pth')
  back = import_reference(CFG, tmp_path / 'dmd.pth', tmp_path / 'homo.pth', tmp_path / 'hetero.pth')
  jax.tree.map(np.testing.assert_array_equal, back, params)
  (tmp_path / 'broken.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(ValueError, match='broken.pth'):
    import_reference(CFG, tmp_path / 'broken.pth')


def test_orbax_round_trip_and_no_overwrite(params, tmp_path):
  path = save_params(str(tmp_path / 'ckpt'), params, {'note': 'x'})
  assert os.path.isdir(path)
  got, meta = restore_params(str(tmp_path / 'ckpt'))
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert meta == {'note': 'x'}
  with pytest.raises(FileExistsError):
    save_params(str(tmp_path / 'ckpt'), params, {})
  assert sorted(os.listdir(tmp_path)) == ['ckpt']  # no temporary directory left behind
  with pytest.raises(FileNotFoundError, match='checkpoint directory not found'):
    restore_params(str(tmp_path / 'absent'))


def test_import_command(parity_first, tmp_path):
  """The CLI on a reference checkpoint gives the parameters the parity tests validate."""
  v = parity_first.variant
  fx = parity_first.path
  out = tmp_path / 'imported'
  alignment = 'aligned' if v['aligned'] else 'unaligned'
  if parity_first.config.seq_lens != reference_config(v['dataset'], v['aligned']).seq_lens:
    pytest.skip('fixture lengths differ from the released ones')
  cmd = [sys.executable, '-m', 'dmd_jax.import_reference',
         f'--config=configs/{v["dataset"]}.py:{alignment}', f'--dmd={fx / "dmd.npz"}',
         f'--homo_gd={fx / "homo_gd.npz"}', f'--hetero_gd={fx / "hetero_gd.npz"}', f'--out={out}',
         f'--config.text_encoder={fx / "bert"}', f'--config.model.d={v["dst_feature_dim"]}',
         f'--config.model.num_heads={v["nheads"]}',
         '--config.model.kernel_sizes=' + ','.join(map(str, v['conv1d_kernel_sizes_lav']))]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got, meta = restore_params(str(out))
  want = import_reference(parity_first.config, fx / 'dmd.npz', fx / 'homo_gd.npz', fx / 'hetero_gd.npz')
  jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(want))
  assert meta['model_config']['d'] == v['dst_feature_dim']
  # A checkpoint of the wrong setting fails with the key and both shapes, and writes nothing.
  bad = [a for a in cmd if not a.startswith(('--config.model.d=', '--out='))]
  bad += ['--config.model.d=12', f'--out={tmp_path / "bad"}']
  proc = subprocess.run(bad, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0 and 'shape mismatch' in proc.stderr
  assert not (tmp_path / 'bad').exists()
