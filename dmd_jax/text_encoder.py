"""Resolving the text encoder named by a run config: weights and `BertConfig`."""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional

import jax

from dmd_jax.bert import load_bert, resolve_bert_dir
from dmd_jax.config import BertConfig

PyTree = Any


def bert_config_of(run: Mapping[str, Any]) -> BertConfig:
  """The encoder's `BertConfig` alone (no weights are read)."""
  if run['text_encoder'] == 'random':
    return BertConfig.from_dict(dict(run['random_bert']))
  return BertConfig.from_json_file(os.path.join(resolve_bert_dir(run['text_encoder']),
                                                'config.json'))


def text_encoder(run: Mapping[str, Any]) -> tuple[BertConfig, Optional[PyTree]]:
  """(BertConfig, pretrained params or None) for `run.text_encoder`.

  'random' gives the sizes in `run.random_bert` and no weights (the caller keeps its random
  initialisation); anything else is a local Hugging Face directory or a hub id.
  """
  if run['text_encoder'] == 'random':
    return bert_config_of(run), None
  return load_bert(run['text_encoder'])


def with_text_encoder(params: PyTree, bert_params: Optional[PyTree]) -> PyTree:
  """Puts pretrained encoder weights into a DMD parameter tree (shapes must already agree)."""
  if bert_params is None:
    return params
  want = jax.tree.map(lambda x: x.shape, params['text_model'])
  got = jax.tree.map(lambda x: x.shape, bert_params)
  if want != got:
    raise ValueError('pretrained text encoder does not fit the model: parameter shapes differ')
  return dict(params, text_model=bert_params)
