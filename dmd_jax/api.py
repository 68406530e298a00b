"""The public Python API: build, initialise, compute the objective, take accumulated steps.

    import dmd_jax
    cfg = dmd_jax.reference_config('mosi', aligned=True)
    params = dmd_jax.init_params(cfg, jax.random.key(0))
    total, aux = dmd_jax.compute_loss(params, batch, cfg)
    state = dmd_jax.create_train_state(params, dmd_jax.reference_optimizer())
    step = dmd_jax.make_train_step(cfg)
    state, metrics = step(state, batch, jax.random.key(1))
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dmd_jax import precision
from dmd_jax.config import DMDConfig
from dmd_jax.losses import dmd_losses
from dmd_jax.models import DMD
from dmd_jax.rng import dropout_key, init_key

PyTree = Any
Batch = Mapping[str, jax.Array]
BATCH_KEYS = ('text', 'audio', 'vision', 'labels')


def compiler_options() -> Optional[dict[str, str]]:
  """XLA options for the train and eval steps (top-level jits only). On CPU the fast-compile
  preset: ~10% less compile time and no slower steps here (MOSI unaligned, batch 16, 2-core
  CPU: train step compile 62 -> 57 s, 7.1-7.2 s per step either way); the matmuls run in the
  same library kernels."""
  if jax.default_backend() == 'cpu':
    return {'xla_cpu_opt_preset': 'CPU_OPT_PRESET_FAST_COMPILE'}
  return None


def build_model(config: DMDConfig) -> DMD:
  return DMD(config)


def dummy_batch(config: DMDConfig, batch_size: int = 2) -> dict[str, jax.Array]:
  """Zeros in the MMSA layout, e.g. for initialisation or shape inference."""
  t, a, v = config.seq_lens
  _, da, dv = config.feature_dims
  return {'text': jnp.zeros((batch_size, 3, t), jnp.float32),
          'audio': jnp.zeros((batch_size, a, da), jnp.float32),
          'vision': jnp.zeros((batch_size, v, dv), jnp.float32),
          'labels': jnp.zeros((batch_size, 1), jnp.float32)}


def random_batch(cfg, batch_size: int, seed: int = 0) -> dict[str, jax.Array]:
  """Random inputs in the MMSA layout: real-looking token ids and masks, Gaussian features with
  zero-padded tails, labels on MOSEI's 1/3 grid."""
  rs = np.random.default_rng(seed)
  t, a, v = cfg.seq_lens
  _, da, dv = cfg.feature_dims
  n_tok = rs.integers(5, t + 1, batch_size)
  mask = (np.arange(t)[None] < n_tok[:, None]).astype(np.float32)
  vocab = cfg.bert.vocab_size     # ids above the special tokens (1000+ in bert-base)
  ids = rs.integers(min(1000, vocab // 2), min(vocab, 30000), (batch_size, t)) * mask
  text = np.stack([ids, mask, np.zeros_like(mask)], axis=1).astype(np.float32)

  def feats(length, dim):
    x = rs.normal(size=(batch_size, length, dim)).astype(np.float32)
    keep = rs.integers(length // 2, length + 1, batch_size)
    return x * (np.arange(length)[None, :, None] < keep[:, None, None])

  labels = np.round(rs.uniform(-3, 3, (batch_size, 1)) * 3) / 3
  return {'text': jnp.asarray(text), 'audio': jnp.asarray(feats(a, da)),
          'vision': jnp.asarray(feats(v, dv)), 'labels': jnp.asarray(labels, jnp.float32)}


def init_params(config: DMDConfig, rng: jax.Array, *, jit: bool = True) -> PyTree:
  """Random parameters with the reference's initialisers (the text encoder included; load
  pretrained BERT weights over `params['text_model']` with `dmd_jax.load_bert`).

  `rng` is a key with uint32[2] data (`jax.random.key(seed)`); the draws use its data through
  `dmd_jax.rng.INIT_IMPL` (hashed keys and bits: compiling ~900 Threefry kernels made a
  bert-base-sized init cost 24-50 s on a 2-core CPU, now ~10 s). jit=False runs the initialisers
  op by op instead (same values; slower for a model of this size)."""
  b = dummy_batch(config, 1)
  key = init_key(rng)
  if not jit:
    return DMD(config).lazy_init(key, b['text'], b['audio'], b['vision'])['params']
  init = jax.jit(lambda r: DMD(config).init(r, b['text'], b['audio'], b['vision'])['params'])
  if isinstance(key, jax.core.Tracer):   # traced (eval_shape, an outer jit): no compile here
    return init(key)
  return init.lower(key).compile(compiler_options())(key)


def check_batch(batch: Batch) -> None:
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise KeyError(f'batch lacks key(s) {missing}; a batch needs {list(BATCH_KEYS)} '
                   f'(got {sorted(batch)})')
  n = batch['text'].shape[0]
  labels = batch['labels']
  if labels.shape not in ((n,), (n, 1)):
    raise ValueError(f"batch 'labels' has shape {tuple(labels.shape)}, expected ({n},) or ({n}, 1)")


def forward(params: PyTree, batch: Batch, config: DMDConfig, *, rng: Optional[jax.Array] = None,
            train: bool = False, step: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Every forward output of the reference (batch-major) plus both edge matrices."""
  rngs = {'dropout': dropout_key(rng, config.dropout_rng)} if rng is not None else {}
  if train and rng is None and config.has_dropout:
    raise ValueError('train=True with non-zero dropout needs an rng key (rng=...)')
  audio, vision = batch['audio'], batch['vision']
  dtype = precision.compute_dtype(config)
  if dtype != jnp.float32:   # bf16 compute on a cast copy; gradients still reach f32 params
    params, audio, vision = precision.cast_floating((params, audio, vision), dtype)
  out = DMD(config).apply({'params': params}, batch['text'], audio, vision, train=train,
                          step=step, rngs=rngs)
  return precision.cast_floating(out, jnp.float32)


def compute_loss(params: PyTree, batch: Batch, config: DMDConfig, *,
                 rng: Optional[jax.Array] = None, train: bool = False,
                 step: Optional[jax.Array] = None) -> tuple[jax.Array, dict[str, Any]]:
  """The DMD objective on one batch.

  Returns:
    (total, aux) with aux = {'losses': every named term (task, recon, cycle, ort, margin,
    homo_reg, homo_logit, homo_repr, hetero_reg, hetero_logit, hetero_repr, total),
    'outputs': every forward output under the reference's names, including `edges_homo` and
    `edges_hetero` (B, 3, 3) indexed [source, target] in (l, v, a) order}.
  """
  check_batch(batch)
  out = forward(params, batch, config, rng=rng, train=train, step=step)
  terms = dmd_losses(out, batch['labels'], config)
  return terms['total'], {'losses': terms, 'outputs': out}


class TrainState(flax.struct.PyTreeNode):
  """Parameters and optimizer state; `step` counts micro-batches (optimizer updates happen once
  per accumulation window, inside `opt_state`)."""
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def apply_gradients(self, grads: PyTree) -> 'TrainState':
    apply = getattr(self.tx, 'apply', None)     # optim.Accumulator: update fused into the step
    if apply is not None:
      params, opt_state = apply(grads, self.opt_state, self.params)
    else:
      updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
      params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def create_train_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params), tx=tx)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, config: DMDConfig,
               train: bool = True) -> tuple[TrainState, dict[str, jax.Array]]:
  """One micro-batch: forward, every loss, backward, clipped accumulation, and the Adam update
  when the window completes. Pure; dropout keys are `fold_in(rng, step)`."""
  key = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  (_, aux), grads = grad_fn(state.params, batch, config, rng=key, train=train, step=state.step)
  metrics = dict(aux['losses'])
  for space in ('homo', 'hetero'):
    e = aux['outputs'][f'edges_{space}']                   # (B, 3, 3) per sample
    metrics[f'edges_{space}_mean'] = jnp.mean(e, axis=0)
    # running moments for epoch statistics without another pass over the data
    metrics[f'edges_{space}_sum'] = jnp.sum(e, axis=0)
    metrics[f'edges_{space}_sqsum'] = jnp.sum(jnp.square(e), axis=0)
  return state.apply_gradients(grads), metrics


def make_train_step(config: DMDConfig, *, train: bool = True, donate: bool = True):
  """`train_step` jitted once for `config` (the state is donated unless donate=False)."""
  fn = functools.partial(train_step, config=config, train=train)
  return jax.jit(fn, donate_argnums=(0,) if donate else (), compiler_options=compiler_options())
