"""BERT text encoder in linen, and loading of Hugging Face BERT weights.

transformers >= 5 ships no Flax models, so the encoder is written here. It reproduces
`transformers.BertModel(...).last_hidden_state` (post-LN BERT, exact erf GELU, LayerNorm eps from
the config, additive attention mask, token types, absolute positions 0..T-1).

Parameter names mirror Hugging Face's module names so that a state-dict key maps to a path
mechanically: `encoder.layer.3.attention.self.query.weight` <-> `encoder/layer_3/attention/self/
query/kernel` (transposed); see `dmd_jax.model.state_dict`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from huggingface_hub import snapshot_download
from safetensors.numpy import load_file

from dmd_jax.config import BertConfig
from dmd_jax.model.layers import LayerNorm
from dmd_jax.model.state_dict import state_dict_to_params

PyTree = Any
_INIT = nn.initializers.normal(0.02)  # HF's initializer_range; only used without pretrained weights.


def _act(name: str):
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)  # HF 'gelu' is the exact erf form.
  if name in ('gelu_new', 'gelu_pytorch_tanh'):
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


def _dense(features: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=_INIT, name=name)


def _ln(eps: float, name: str) -> LayerNorm:
  return LayerNorm(epsilon=eps, name=name)


class _SelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, allowed, deterministic):
    cfg = self.config
    h = cfg.num_attention_heads
    hd = cfg.hidden_size // h
    b, t, _ = x.shape
    split = lambda y: y.reshape(b, t, h, hd)
    q = split(_dense(cfg.hidden_size, 'query')(x))
    k = split(_dense(cfg.hidden_size, 'key')(x))
    v = split(_dense(cfg.hidden_size, 'value')(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) * (hd ** -0.5)
    scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    probs = nn.Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic=deterministic)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, cfg.hidden_size)


class _Layer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, allowed, deterministic):
    cfg = self.config
    # Nested module names reproduce HF's key layout (layer.i.attention.self.query ...).
    x = _Attention(cfg, name='attention')(x, allowed, deterministic)
    h = _act(cfg.hidden_act)(_Dense1(cfg.intermediate_size, name='intermediate')(x))
    return _Output(cfg, name='output')(h, x, deterministic)


class _Attention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, allowed, deterministic):
    ctx = _SelfAttention(self.config, name='self')(x, allowed, deterministic)
    return _Output(self.config, name='output')(ctx, x, deterministic)


class _Dense1(nn.Module):
  """A scope holding one Dense named 'dense' (HF's `intermediate.dense`, `pooler.dense`)."""
  features: int

  @nn.compact
  def __call__(self, x):
    return _dense(self.features, 'dense')(x)


class _Output(nn.Module):
  """dense -> dropout -> LayerNorm(residual + .) (HF's BertSelfOutput / BertOutput)."""
  config: BertConfig

  @nn.compact
  def __call__(self, h, residual, deterministic):
    cfg = self.config
    h = _dense(cfg.hidden_size, 'dense')(h)
    h = nn.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)
    return _ln(cfg.layer_norm_eps, 'LayerNorm')(h + residual)


class _Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic):
    cfg = self.config
    t = input_ids.shape[1]
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=_INIT, name=name)
    words = embed(cfg.vocab_size, 'word_embeddings')(input_ids)
    if cfg.pad_token_id is not None:  # torch's padding_idx: no gradient into the pad row
      is_pad = (input_ids == cfg.pad_token_id)[..., None]
      words = jnp.where(is_pad, jax.lax.stop_gradient(words), words)
    x = (words
         + embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)
         + embed(cfg.max_position_embeddings, 'position_embeddings')(jnp.arange(t)[None, :]))
    x = _ln(cfg.layer_norm_eps, 'LayerNorm')(x)
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


class _Encoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, allowed, deterministic):
    # A plain loop, not layers.scan_layers: stacking bert-base's 85M layer parameters for a scan
    # costs more per step (3.9-4.1 s vs 3.4-3.5 s, MOSI aligned, batch 16, 2-core CPU) than the
    # scan saves in compile time (none measurable here).
    for i in range(self.config.num_hidden_layers):
      x = _Layer(self.config, name=f'layer_{i}')(x, allowed, deterministic)
    return x


class BertModel(nn.Module):
  """BERT returning `last_hidden_state` (B, T, hidden).

  The pooler's parameters are created (so a reference checkpoint round-trips) but the pooler is
  only evaluated when `with_pooler=True`; DMD never uses it, so it never gets a gradient.
  """
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids, *, deterministic: bool = True,
               with_pooler: bool = False):
    cfg = self.config
    if input_ids.shape[1] > cfg.max_position_embeddings:
      raise ValueError(f'text length {input_ids.shape[1]} exceeds the encoder\'s '
                       f'max_position_embeddings={cfg.max_position_embeddings}')
    x = _Embeddings(cfg, name='embeddings')(input_ids, token_type_ids, deterministic)
    allowed = (attention_mask > 0)[:, None, None, :]  # (B, 1, 1, T) over keys
    x = _Encoder(cfg, name='encoder')(x, allowed, deterministic)
    if with_pooler or self.is_initializing():
      pooled = jnp.tanh(_Dense1(cfg.hidden_size, name='pooler')(x[:, 0]))
      if with_pooler:
        return x, pooled
    return x


# ------------------------------------------------------------------------------------------------
# Loading Hugging Face weights.

def _read_state_dict(directory: str) -> dict[str, np.ndarray]:
  st = os.path.join(directory, 'model.safetensors')
  pt = os.path.join(directory, 'pytorch_model.bin')
  if os.path.isfile(st):
    try:
      return load_file(st)
    except Exception as e:  # safetensors raises its own error types for truncated files.
      raise ValueError(f'cannot read BERT weights {st}: {e}') from e
  if os.path.isfile(pt):
    try:
      import torch
    except ImportError as e:
      raise ImportError(f'{pt} is a PyTorch file and torch is not installed; install the '
                        f"'torch' extra (pip install 'dmd_jax[torch]') or convert it to "
                        f'model.safetensors') from e
    sd = torch.load(pt, map_location='cpu', weights_only=True)
    return {k: v.float().numpy() for k, v in sd.items()}
  raise FileNotFoundError(f'no BERT weights in {directory}: expected model.safetensors '
                          f'(or pytorch_model.bin with torch installed)')


def normalise_bert_keys(sd: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Brings HF checkpoints to `BertModel` keys: strips a 'bert.' prefix, renames TF-era
  LayerNorm 'gamma'/'beta', and drops heads (cls.*) and buffers (position_ids)."""
  out = {}
  for k, v in sd.items():
    if k.startswith('bert.'):
      k = k[len('bert.'):]
    if not k.startswith(('embeddings.', 'encoder.', 'pooler.')) or k.endswith('position_ids'):
      continue
    k = k.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')
    out[k] = np.asarray(v)
  return out


def resolve_bert_dir(name_or_path: str) -> str:
  """A local Hugging Face directory, or a hub id resolved through huggingface_hub's cache.

  Offline and not cached, the error says what to download and where to put it.
  """
  path = os.path.expanduser(name_or_path)
  if os.path.isdir(path):
    return path
  if name_or_path.startswith(('/', '.', '~')) or name_or_path.count('/') > 1:
    raise FileNotFoundError(f'text encoder directory not found: {name_or_path}')
  try:
    return snapshot_download(name_or_path, allow_patterns=['config.json', 'model.safetensors',
                                                           'vocab.txt', 'tokenizer*'])
  except Exception as e:
    raise FileNotFoundError(
        f'text encoder {name_or_path!r} is neither a local directory nor downloadable here ({e}). '
        f'Download config.json, model.safetensors and vocab.txt of {name_or_path!r} from '
        f'https://huggingface.co/{name_or_path} on a machine with network access, put them in a '
        f'directory and pass that directory instead.') from e


def load_bert(name_or_path: str, weights: bool = True) -> tuple[BertConfig, PyTree]:
  """Reads a Hugging Face BERT (local directory or hub id) as (`BertConfig`, params of
  `BertModel`; None without `weights`). Missing files and shape mismatches raise errors that
  name the path and key."""
  directory = resolve_bert_dir(name_or_path)
  config = BertConfig.from_json_file(os.path.join(directory, 'config.json'))
  if not weights:
    return config, None
  sd = normalise_bert_keys(_read_state_dict(directory))
  shapes = jax.eval_shape(
      lambda: BertModel(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32),
                                     jnp.ones((1, 2)), jnp.zeros((1, 2), jnp.int32)))['params']
  params = state_dict_to_params(sd, shapes, source=directory)
  return config, params
