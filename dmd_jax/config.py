"""Typed, frozen model configuration.

The ml_collections config files in `configs/` describe a whole run; everything the network needs is
copied into the frozen dataclasses below (`DMDConfig`, `BertConfig`) at the model boundary, so the
modules are hashable, jit-static and validated once.

Reference values come from the released `config/config.json` and `run.py` of the PyTorch code
(spec §1.4). Modality order inside the GD-Units is always `schema.MODALITIES` (l, v, a); feature
tuples use the MMSA order `schema.FEATURE_ORDER` (l, a, v). How the network is computed
(attention paths, layer loops, precision, dropout generator) is part of the config too, so it is
part of every compiled function's cache key.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional

import numpy as np

from dmd_jax import schema

DROPOUT_RNGS = ('hash', 'threefry')  # dmd_jax/model/rng.py
COMPUTE_DTYPES = ('float32', 'bfloat16')  # dmd_jax/model/precision.py
DICT_POOLS = ('max', 'mean')                       # dmd_jax/model/dictionary.py
DICT_ACTIVATIONS = ('sparsemax', 'softmax')
DICT_LOSSES = ('label_hinge', 'infonce', 'edge_kl')
DROPOUT_FIELDS = ('attn_dropout', 'attn_dropout_a', 'attn_dropout_v', 'relu_dropout',
                  'embed_dropout', 'res_dropout', 'output_dropout', 'text_dropout')


def _prior(logits, temperature: float = 0.25) -> tuple[float, ...]:
  """The reference's hand-set edge prior: a numpy softmax of `logits / T`, stored as float32."""
  w = np.asarray(logits, np.float64) / temperature
  e = np.exp(w - w.max())
  return tuple(float(x) for x in (e / e.sum()).astype(np.float32))


# Edge order x = 0..5 is (student, teacher) = (l,v) (l,a) (v,l) (v,a) (a,l) (a,v) (spec §2.7).
HOMO_PRIOR = _prior([0, 0, 1, 0, 1, 0])    # favours L->V and L->A
HETERO_PRIOR = _prior([0, 0, 1, 0, 1, 1])  # favours L->V, L->A and V->A


def _strict_from_dict(cls, d: Mapping[str, Any], where: str):
  """`cls(**d)`, with unknown keys an error naming `where` and the known ones."""
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f'{where} has unknown key(s) {unknown}; known: {sorted(names)}')
  return cls(**d)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The subset of a Hugging Face `BertConfig` that the encoder needs."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  hidden_act: str = 'gelu'
  # HF builds word_embeddings with padding_idx=pad_token_id: that row never receives a gradient.
  pad_token_id: int | None = 0

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f'BertConfig: hidden_size={self.hidden_size} is not divisible by '
                       f'num_attention_heads={self.num_attention_heads}')
    if self.hidden_act not in ('gelu', 'gelu_new', 'gelu_pytorch_tanh', 'relu'):
      raise ValueError(f'BertConfig: unsupported hidden_act {self.hidden_act!r}')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'BertConfig':
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: d[k] for k in names if k in d})

  @classmethod
  def from_json_file(cls, path: str) -> 'BertConfig':
    """Reads a Hugging Face `config.json`."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f'BERT config not found: {path}')
    with open(path) as f:
      try:
        d = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'BERT config {path} is not valid JSON: {e}') from e
    missing = [k for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads') if k not in d]
    if missing:
      raise ValueError(f'BERT config {path} lacks key(s) {missing}')
    return cls.from_dict(d)

  @classmethod
  def tiny(cls, vocab_size: int = 1000, hidden_size: int = 32, layers: int = 2,
           heads: int = 2) -> 'BertConfig':
    """A small random encoder for tests and smoke runs."""
    return cls(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=layers,
               num_attention_heads=heads, intermediate_size=2 * hidden_size,
               max_position_embeddings=64)


@dataclasses.dataclass(frozen=True)
class DictionaryConfig:
  """DHMD's dictionary (dmd_jax/model/dictionary.py): one switch per inferred choice of the design
  note (shared/spec/DHMD.md). The same settings serve both spaces."""
  enabled: bool = True           # False: the DMD network and objective, exactly
  num_atoms: int = 512           # K (the note's default; 256/1024 reported similar)
  pool: str = 'max'              # temporal pooling of the atom scores: 'max' | 'mean'
  activation: str = 'sparsemax'  # 'sparsemax' | 'softmax'
  temperature: float = 2.0       # tau (fixed), or the start of the annealing
  temperature_end: Optional[float] = None   # annealed linearly to this value ...
  anneal_steps: int = 0                     # ... over this many micro-steps (0 = fixed tau)
  stop_gradient: bool = False    # detach the dictionary inputs from the backbone
  loss: str = 'label_hinge'      # 'label_hinge' | 'infonce' | 'edge_kl'
  weight: float = 0.1            # weight of each space's matching loss in the total
  kl_eps: float = 1e-6           # smoothing of the activations inside `edge_kl` (sparse zeros)

  def __post_init__(self):
    def fail(field, msg):
      raise ValueError(f'DictionaryConfig.{field}: {msg}')
    if self.num_atoms < 2:
      fail('num_atoms', f'needs at least 2 atoms, got {self.num_atoms}')
    if self.pool not in DICT_POOLS:
      fail('pool', f'must be one of {DICT_POOLS}, got {self.pool!r}')
    if self.activation not in DICT_ACTIVATIONS:
      fail('activation', f'must be one of {DICT_ACTIVATIONS}, got {self.activation!r}')
    if self.loss not in DICT_LOSSES:
      fail('loss', f'must be one of {DICT_LOSSES}, got {self.loss!r}')
    if self.temperature <= 0 or (self.temperature_end is not None and self.temperature_end <= 0):
      fail('temperature', f'must be positive, got {self.temperature} -> {self.temperature_end}')
    if self.anneal_steps < 0:
      fail('anneal_steps', f'must be >= 0, got {self.anneal_steps}')
    if self.weight < 0:
      fail('weight', f'must be >= 0, got {self.weight}')
    if not 0 < self.kl_eps < 1:
      fail('kl_eps', f'must be in (0, 1), got {self.kl_eps}')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'DictionaryConfig':
    return _strict_from_dict(cls, d, 'config.model.dictionary')

  @property
  def annealed(self) -> bool:
    return self.temperature_end is not None and self.anneal_steps > 0


ATTENTION_IMPLS = ('fast', 'plain')
AUTO_ON_OFF = ('auto', 'on', 'off')
LAYER_LOOPS = ('auto', 'scan', 'unroll')
PLATFORMS = ('auto', 'cpu', 'gpu', 'tpu')   # dmd_jax/model/target.py
MATMUL_PRECISIONS = ('float32', 'default')  # dmd_jax/model/precision.py


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """How the MulT attention and layer stacks are computed; every choice gives the same values
  and gradients to float32 rounding (tests/attention_test.py, tests/transformer_test.py)."""
  # 'fast': memory-saving paths with a hand-written backward (dmd_jax/model/attention.py);
  # 'plain': dropout(softmax(q k^T + mask)) v for all heads at once, gradients by autodiff.
  impl: str = 'fast'
  # Per-head loop (lax.map) with batch chunks and causal row blocks: 'auto' = on CPU where a
  # head's scores have >= 128 x 128 entries; 'on' / 'off' force it (analysis, tests).
  head_loop: str = 'auto'
  # The native CPU kernel (dmd_jax/model/csrc/attention_cpu.cc): 'auto' = for the head-loop
  # sizes on a single CPU device in float32 with hash or no dropout, when it builds; 'on' = also
  # across devices, an error if it cannot be used; 'off' = never.
  native: str = 'auto'
  # MulT layer stacks: 'scan' (one lax.scan over stacked layer parameters), 'unroll', or 'auto'
  # (on CPU unrolled where a layer's activations have >= 2^15 elements, else scanned).
  layer_loop: str = 'auto'
  # The platform the choices above are made for: the devices the program is compiled for.
  # 'auto' = the tracing process's default backend; a run's model config is made for its
  # devices (from_run_config's `platform`: training.run_config.model, `python -m dmd_jax.aot`),
  # and training's steps refuse one made for other devices (dmd_jax/model/target.py), so a
  # program traced on a CPU host for a TPU slice carries TPU choices.
  platform: str = 'auto'

  def __post_init__(self):
    for name, allowed in (('impl', ATTENTION_IMPLS), ('head_loop', AUTO_ON_OFF),
                          ('native', AUTO_ON_OFF), ('layer_loop', LAYER_LOOPS),
                          ('platform', PLATFORMS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'AttentionConfig.{name}: must be one of {allowed}, got '
                         f'{getattr(self, name)!r}')

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'AttentionConfig':
    return _strict_from_dict(cls, d, 'config.model.attention')


@dataclasses.dataclass(frozen=True)
class DMDConfig:
  """Everything that defines the DMD network and its objective.

  Defaults are the released MOSI hyper-parameters (aligned data, bert-base text encoder).
  Use `reference_config(dataset, aligned)` for the four reference settings.
  """
  dataset: str = 'mosi'
  aligned: bool = True
  # Input feature widths (t, a, v); t must equal the text encoder's hidden size.
  feature_dims: tuple[int, int, int] = schema.feature_dims('mosi')
  # Sequence lengths (t, a, v). The reference hard-codes them; they size the flatten-Linears.
  seq_lens: tuple[int, int, int] = schema.seq_lens('mosi', True)
  d: int = 50                    # dst_feature_dim: common width of every projection.
  num_heads: int = 10
  nlevels: int = 4               # Depth of every transformer (the *_mem ones use max(nlevels, 3)).
  kernel_sizes: tuple[int, int, int] = (5, 5, 5)  # Conv1d kernels (l, a, v).
  attn_dropout: float = 0.3      # Transformers 'l', 'al', 'vl' and the three *_mem.
  attn_dropout_a: float = 0.2    # 'a', 'la', 'va'.
  attn_dropout_v: float = 0.0    # 'v', 'lv', 'av'.
  relu_dropout: float = 0.0
  embed_dropout: float = 0.2
  res_dropout: float = 0.0
  output_dropout: float = 0.5
  text_dropout: float = 0.5
  attn_mask: bool = True
  bert: BertConfig = BertConfig()
  # GD-Units (spec §1.4 / §2.7).
  gd_size_homo: int = 64
  gd_size_hetero: int = 32
  gd_prior_homo: tuple[float, ...] = HOMO_PRIOR
  gd_prior_hetero: tuple[float, ...] = HETERO_PRIOR
  gd_reg: float = 10.0
  gd_alpha: float = 1 / 8
  w_losses_homo: tuple[float, float] = (1.0, 10.0)
  w_losses_hetero: tuple[float, float] = (1.0, 10.0)
  # Loss weights of the total (spec §3.7).
  gd_weight: float = 0.05        # lambda_2, both GD-Units.
  decouple_weight: float = 0.1   # lambda_1, cycle + reconstruction + gamma * (margin + ort).
  margin_ort_weight: float = 0.1  # gamma.
  margin_scale: float = 0.15     # Hinge margin per unit of label difference.
  # Execution: which generator draws the dropout masks (dmd_jax/model/rng.py).
  dropout_rng: str = 'hash'      # dropout masks from dmd_jax.model.rng.HASH_IMPL, or 'threefry'.
  # 'bfloat16': matmuls and activations in bf16; parameters, optimizer state, LayerNorm, softmax,
  # GD-Units and losses stay float32 (dmd_jax/model/precision.py).
  compute_dtype: str = 'float32'
  # Precision of float32 matmuls and convolutions on accelerators (dmd_jax/model/precision.py):
  # 'float32' = true float32 products, the reference's arithmetic (HIGHEST: six bf16 passes on
  # TPU, no TF32 on NVIDIA GPUs); 'default' = the platform's native speed (one bf16 pass on TPU,
  # TF32 on recent NVIDIA GPUs). CPUs compute float32 either way.
  matmul_precision: str = 'float32'
  # DHMD (dmd_jax/model/dictionary.py): a modality-shared dictionary per space; None = DMD.
  dictionary: Optional[DictionaryConfig] = None
  # How attention and the layer stacks are computed (same values either way).
  attention: AttentionConfig = AttentionConfig()

  def __post_init__(self):
    def fail(field, msg):
      raise ValueError(f'DMDConfig.{field}: {msg}')
    if self.dataset not in ('mosi', 'mosei'):
      fail('dataset', f"must be 'mosi' or 'mosei', got {self.dataset!r}")
    for name in ('feature_dims', 'seq_lens', 'kernel_sizes'):
      v = getattr(self, name)
      if len(v) != 3 or any(int(x) <= 0 for x in v):
        fail(name, f'needs three positive ints, got {v!r}')
    if self.d <= 0 or self.num_heads <= 0 or self.d % self.num_heads:
      fail('d', f'd={self.d} must be a positive multiple of num_heads={self.num_heads}')
    if self.d < 4:
      fail('d', f'd={self.d} is too small for the sinusoidal positions (needs d >= 4)')
    if self.nlevels <= 0:
      fail('nlevels', f'must be positive, got {self.nlevels}')
    if self.feature_dims[0] != self.bert.hidden_size:
      fail('feature_dims', f'text width {self.feature_dims[0]} != text encoder hidden_size '
           f'{self.bert.hidden_size}')
    for m, t, k in zip(schema.FEATURE_ORDER, self.seq_lens, self.kernel_sizes):
      if t - k + 1 <= 0:
        fail('kernel_sizes', f'kernel {k} of modality {m} is longer than its sequence ({t})')
    for name in ('gd_prior_homo', 'gd_prior_hetero'):
      if len(getattr(self, name)) != 6:
        fail(name, 'needs six values, one per directed edge')
    if self.dropout_rng not in DROPOUT_RNGS:
      fail('dropout_rng', f'must be one of {DROPOUT_RNGS}, got {self.dropout_rng!r}')
    if self.compute_dtype not in COMPUTE_DTYPES:
      fail('compute_dtype', f'must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}')
    if self.matmul_precision not in MATMUL_PRECISIONS:
      fail('matmul_precision', f'must be one of {MATMUL_PRECISIONS}, got '
           f'{self.matmul_precision!r}')
    for name in DROPOUT_FIELDS:
      if not 0.0 <= getattr(self, name) < 1.0:
        fail(name, f'dropout rate must be in [0, 1), got {getattr(self, name)}')

  # Derived sizes -------------------------------------------------------------------------------
  @property
  def conv_lens(self) -> dict[str, int]:
    """T'_m = T_m - k_m + 1 per modality, keyed 'l', 'a', 'v'."""
    return {m: t - k + 1
            for m, t, k in zip(schema.FEATURE_ORDER, self.seq_lens, self.kernel_sizes)}

  @property
  def input_dims(self) -> dict[str, int]:
    return dict(zip(schema.FEATURE_ORDER, self.feature_dims))

  @property
  def kernels(self) -> dict[str, int]:
    return dict(zip(schema.FEATURE_ORDER, self.kernel_sizes))

  def without_dropout(self) -> 'DMDConfig':
    """The same network with every dropout rate at zero (the parity fixtures' setting)."""
    zero = {n: 0.0 for n in DROPOUT_FIELDS}
    bert = dataclasses.replace(self.bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return dataclasses.replace(self, bert=bert, **zero)

  @property
  def dhmd(self) -> bool:
    """Whether the dictionary branch (DHMD) is on."""
    return self.dictionary is not None and self.dictionary.enabled

  @property
  def has_dropout(self) -> bool:
    rates = [getattr(self, n) for n in DROPOUT_FIELDS]
    return any(r > 0 for r in rates + [self.bert.hidden_dropout_prob,
                                       self.bert.attention_probs_dropout_prob])

  def replace(self, **kw) -> 'DMDConfig':
    return dataclasses.replace(self, **kw)


# The released hyper-parameters per dataset (spec §1.4 and §2.1): MOSI's are DMDConfig's
# defaults; lengths and feature widths come from dmd_jax.schema.
_DATASET = {
    'mosi': {},
    'mosei': dict(d=30, num_heads=6, kernel_sizes=(5, 1, 3), attn_dropout=0.4, attn_dropout_a=0.0,
                  attn_dropout_v=0.0, embed_dropout=0.0, text_dropout=0.3),
}


def reference_config(dataset: str = 'mosi', aligned: bool = True,
                     bert: BertConfig | None = None, **overrides) -> DMDConfig:
  """The released hyper-parameters for `dataset` ('mosi'/'mosei') and alignment.

  `bert` replaces the bert-base-uncased encoder config (feature_dims[0] follows its width);
  any other field can be overridden by keyword.
  """
  if dataset not in _DATASET:
    raise ValueError(f"dataset must be 'mosi' or 'mosei', got {dataset!r}")
  bert = bert or BertConfig()
  kw = dict(_DATASET[dataset], dataset=dataset, aligned=aligned, bert=bert,
            seq_lens=schema.seq_lens(dataset, bool(aligned)),
            feature_dims=schema.feature_dims(dataset, bert.hidden_size))
  kw.update(overrides)
  return DMDConfig(**kw)


# DMDConfig fields that a run config does not set under `model`: the dataset and alignment are
# run fields, the input sizes follow from them and from the text encoder (`text_encoder`), and
# DHMD's dictionary is a block of its own (configs/mosi_dhmd.py). Every other field is a key of
# `config.model` (configs/mosi.py makes them from `run_model_fields`).
RUN_DERIVED_FIELDS = ('dataset', 'aligned', 'feature_dims', 'seq_lens', 'bert')


def run_model_fields(dataset: str, aligned: bool) -> dict[str, Any]:
  """The released value of every `config.model` field for `dataset` and alignment (the
  `AttentionConfig` as a dataclass); the one source of the run configs' model values."""
  ref = reference_config(dataset, aligned)
  return {f.name: getattr(ref, f.name) for f in dataclasses.fields(DMDConfig)
          if f.name not in RUN_DERIVED_FIELDS + ('dictionary',)}


def from_run_config(run: Mapping[str, Any], bert: BertConfig, platform: str = 'auto'
                    ) -> DMDConfig:
  """The `DMDConfig` of a run config (`configs/*.py`): dataset, alignment and `model.*` fields,
  with the text encoder's `BertConfig`, its implementation choices made for `platform` (one of
  PLATFORMS: the devices the run's programs are compiled for; it replaces the run config's
  `model.attention.platform`); fields it lacks keep their released values. Unknown `model` keys
  are rejected by name."""
  model = dict(run['model'])
  known = [f.name for f in dataclasses.fields(DMDConfig) if f.name not in RUN_DERIVED_FIELDS]
  unknown = sorted(set(model) - set(known))
  if unknown:
    raise ValueError(f'config.model has unknown key(s) {unknown}; known: {known}')
  model = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items()}
  if model.get('dictionary') is not None:
    model['dictionary'] = DictionaryConfig.from_dict(dict(model['dictionary']))
  model['attention'] = AttentionConfig.from_dict({**(model.get('attention') or {}),
                                                   'platform': platform})
  return reference_config(run['dataset'], bool(run['aligned']), bert=bert, **model)
