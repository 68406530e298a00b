"""Building blocks: PyTorch-initialised Linear/Conv1d, and the MulT transformer encoder.

Every tensor here is batch-major, (B, T, E). The transformer reproduces the fairseq-derived
encoder of MulT as used by DMD (spec §2.5-§2.6), quirks included:
  * inputs scaled by sqrt(E) plus a *data-dependent* sinusoidal position: step t gets position
    t+1 unless channel 0 of the unscaled input is exactly 0, in which case it gets none;
  * key and value inputs are embedded separately, each with its own embed-dropout mask;
  * one LayerNorm (pre-norm) shared by query, key and value inside a layer, a final LayerNorm;
  * an additive causal mask offset by |T_k - T_q| in every transformer.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

LN_EPS = 1e-5  # torch.nn.LayerNorm default; Flax's default (1e-6) would break parity.


def torch_uniform(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear/Conv weights and biases."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nn.Module):
  """A Dense layer with PyTorch's initialisation (or Xavier weights and zero bias).

  Parameters are `kernel` (in, out) and `bias` (out), the transposes of torch's `weight`/`bias`.
  """
  features: int
  init: str = 'torch'  # 'torch' or 'xavier' (the MulT transformer's fc1/fc2).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    fan_in = x.shape[-1]
    if self.init == 'xavier':
      kernel_init, bias_init = nn.initializers.xavier_uniform(), nn.initializers.zeros
    else:
      kernel_init = bias_init = torch_uniform(fan_in)
    kernel = self.param('kernel', kernel_init, (fan_in, self.features))
    bias = self.param('bias', bias_init, (self.features,))
    return x @ kernel + bias


def conv1d(features: int, kernel: int, name: str) -> nn.Conv:
  """Bias-free 'valid' Conv1d over (B, T, C) with PyTorch's default initialisation."""
  return nn.Conv(features, kernel_size=(kernel,), padding='VALID', use_bias=False,
                 kernel_init=nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform'),
                 name=name)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis with a two-pass variance, as PyTorch computes it (the fast
  E[x^2] - E[x]^2 form loses digits). Parameters `scale` and `bias`, like flax's LayerNorm.

  Written out rather than `nn.LayerNorm(use_fast_variance=False)`, whose gradient expands into
  thousands of scalar ops on XLA:CPU and roughly doubles the train step's compile time.
  """
  epsilon: float = LN_EPS

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.ones, (x.shape[-1],))
    bias = self.param('bias', nn.initializers.zeros, (x.shape[-1],))
    x32 = x.astype(jnp.float32)                 # statistics and affine in float32 under bf16
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32) + bias.astype(
        jnp.float32)
    return y.astype(x.dtype)


def layer_norm(name: str, eps: float = LN_EPS) -> LayerNorm:
  return LayerNorm(epsilon=eps, name=name)


# Trace-time switch for the per-head attention loop (on by default). XLA's cost analysis counts
# a loop body once, so `unrolled_loops()` traces it and the layer loop below unrolled to count a
# step's FLOPs (benchmark.py).
_LOOPS = {'map_heads': True}

# How a stack of identical MulT layers runs: 'scan' (one `lax.scan` over stacked parameters: one
# layer body to compile), 'unroll' (a plain loop), or 'auto': on CPU, unrolled where a layer's
# activations have at least UNROLL_MIN_ELEMENTS elements, else scanned; scanned on GPU/TPU. A
# scan stacks every layer's activations for the backward pass, a copy per layer each way that
# grows with the activations, while unrolling costs a fixed amount of compile time: MOSI unaligned
# batch 16 (16 x 496 x 50 per layer) 4.95-5.02 s -> 4.80 s per micro-step for +3-6 s of compile,
# MOSI aligned batch 16 (16 x 50 x 50) -1.8%, while the parity tests' small models (a few
# thousand elements per layer, compile-bound) took 185 s unrolled against 132 s scanned. The
# environment variable DMD_JAX_LAYER_LOOP sets the default mode.
UNROLL_MIN_ELEMENTS = 2 ** 15
_LAYER_LOOP_MODES = ('auto', 'scan', 'unroll')
_LAYER_LOOP = {'mode': os.environ.get('DMD_JAX_LAYER_LOOP', 'auto')}


@contextlib.contextmanager
def unrolled_loops():
  """Within this context, newly traced models run layers and attention heads unrolled (same
  values; more code, so only for analysis such as FLOP counting)."""
  saved, saved_layers = dict(_LOOPS), dict(_LAYER_LOOP)
  _LOOPS.update(map_heads=False)
  _LAYER_LOOP['mode'] = 'unroll'
  try:
    yield
  finally:
    _LOOPS.update(saved)
    _LAYER_LOOP.update(saved_layers)


@contextlib.contextmanager
def layer_loop(mode: str):
  """Within this context, newly traced MulT layer stacks run as `mode`: 'auto', 'scan' or
  'unroll' (same values)."""
  _check_layer_loop(mode, 'layer loop mode')
  saved = dict(_LAYER_LOOP)
  _LAYER_LOOP['mode'] = mode
  try:
    yield
  finally:
    _LAYER_LOOP.update(saved)


def _check_layer_loop(mode: str, what: str) -> None:
  if mode not in _LAYER_LOOP_MODES:
    raise ValueError(f"{what} must be 'auto', 'scan' or 'unroll', got {mode!r}")


def _scan_layers_now(x: jax.Array) -> bool:
  """Whether a stack of layers applied to activations `x` runs as a scan."""
  mode = _LAYER_LOOP['mode']
  _check_layer_loop(mode, 'DMD_JAX_LAYER_LOOP')
  if mode == 'unroll':
    return False
  return mode == 'scan' or jax.default_backend() != 'cpu' or x.size < UNROLL_MIN_ELEMENTS


def scan_layers(parent: nn.Module, make_layer: Callable[..., nn.Module], names: list[str],
                x: jax.Array, *args, deterministic: bool) -> jax.Array:
  """x -> layer_n(...layer_1(x, *args)...) over the identical layers `names` of `parent`.

  Parameters keep their per-layer names (`layers_0`, `layers_1`, ...; checkpoints and the
  reference mapping are unchanged). Where the layer loop is a scan (see `layer_loop` and
  `_scan_layers_now`), the layers outside initialisation run as one `lax.scan` over their stacked
  parameters: the step compiles one layer body per stack instead of one per layer (about 4x less
  code for XLA). `make_layer(name=..., parent=...)` builds a layer module; it is called as
  layer(x, *args, deterministic). Dropout keys are split per layer in both forms, so they give
  the same values.
  """
  if parent.is_initializing() or len(names) < 2:
    for name in names:
      x = make_layer(name=name)(x, *args, deterministic)
    return x
  params = parent.variables['params']
  layer = make_layer(name=None, parent=None)                  # unbound: applied to each layer
  train = not deterministic and parent.has_rng('dropout')
  keys = (jax.random.split(parent.make_rng('dropout'), len(names)) if train
          else jnp.zeros((len(names),), jnp.uint32))

  def body(h, p_and_key):
    p, key = p_and_key
    rngs = {'dropout': key} if train else {}
    return layer.apply({'params': p}, h, *args, deterministic, rngs=rngs), None

  if not _scan_layers_now(x):
    for i, name in enumerate(names):
      x = body(x, (params[name], keys[i]))[0]
    return x
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *[params[n] for n in names])
  return jax.lax.scan(body, x, (stacked, keys))[0]


def sinusoidal_positions(x_in: jax.Array) -> jax.Array:
  """fairseq sinusoidal embedding with MulT's data-dependent positions.

  Args:
    x_in: (B, T, E) unscaled transformer input.
  Returns:
    (B, T, E): row [sin(p f), cos(p f)] with p = t + 1, f_i = exp(-i ln(1e4) / (E/2 - 1)),
    or zeros where x_in[b, t, 0] == 0 (padding index 0). Constant: no gradient flows into it.
  """
  _, t, e = x_in.shape
  half = e // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * jnp.float32(-math.log(10000.0) / (half - 1)))
  angles = jnp.arange(1, t + 1, dtype=jnp.float32)[:, None] * freqs[None, :]
  table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)
  if e % 2:
    table = jnp.pad(table, ((0, 0), (0, 1)))
  has_position = jax.lax.stop_gradient(x_in[..., 0] != 0)
  return jnp.where(has_position[..., None], table[None].astype(x_in.dtype), 0)


def future_mask(tq: int, tk: int, row_start: int = 0, offset: Optional[int] = None) -> jax.Array:
  """(tq, tk) boolean 'may attend' mask: key j is hidden from query i iff j - i >= 1 + offset,
  offset = |tk - tq| by default; rows are query positions row_start, row_start + 1, ..."""
  offset = abs(tk - tq) if offset is None else offset
  i = row_start + jnp.arange(tq)[:, None]
  j = jnp.arange(tk)[None, :]
  return (j - i) < 1 + offset


# Attention over long sequences (the unaligned settings' 375/500 steps) is memory-bound: a layer's
# (B, heads, T, T) score tensor is ~160 MB at T = 500, and every softmax/dropout pass streams it
# through memory. On CPU, above LOOP_MIN_SCORES scores per head and sample, heads are processed one
# at a time (lax.map), and each head's batch in chunks of about CHUNK_BYTES of scores per device,
# so that a chunk's scores stay in cache; with a causal mask the query rows are cut into
# ROW_BLOCKS blocks that only read the keys they may see. The gradient is written by hand
# (`_attention_core`): the backward pass recomputes the scores from q and k and the saved
# per-row log-normaliser, so no (T, T) tensor is stored between the passes and none of the
# forward's reductions is repeated.
LOOP_MIN_SCORES = 128 * 128
ROW_BLOCKS = 4
CHUNK_BYTES = 2 ** 21


def _visible_keys(bounds: list[int], tk: int, row_start: int, offset: int) -> int:
  """Scores computed when row block [r0, r1) reads keys [0, min(tk, row_start + r1 + offset))."""
  return sum((r1 - r0) * min(tk, row_start + r1 + offset) for r0, r1 in zip(bounds, bounds[1:]))


def _row_blocks(tq: int, tk: int, row_start: int, offset: Optional[int]) -> int:
  """ROW_BLOCKS where cutting the causal rows skips >= 15% of a large score tile, else 1 (each
  block is more code to compile: blocking every masked attention cost ~12 s of the unaligned
  train step's compile for little gain on the cross-modal pairs, whose offset hides few keys)."""
  if offset is None or tq < 4 * ROW_BLOCKS or tq * tk < LOOP_MIN_SCORES:
    return 1
  bounds = [round(i * tq / ROW_BLOCKS) for i in range(ROW_BLOCKS + 1)]
  return ROW_BLOCKS if _visible_keys(bounds, tk, row_start, offset) <= 0.85 * tq * tk else 1


class _Plan(NamedTuple):
  """Static layout of one attention call: row blocks (r0, r1, keys read, masked?) and dropout."""
  blocks: tuple[tuple[int, int, int, bool], ...]
  row_start: int
  offset: Optional[int]
  rate: float            # dropout on the probabilities; 0 = none
  loop: bool             # heads one at a time (lax.map) rather than all at once (vmap)
  chunks: int = 1        # batch chunks per head in the loop (see _batch_chunks)


def _batch_chunks(batch: int, tq: int, tk: int, devices: Optional[int] = None) -> int:
  """How many chunks to cut each head's batch into for the head loop: the most samples per
  device and chunk that keep a chunk's float32 scores within CHUNK_BYTES (at least one sample,
  and a divisor of the per-device batch). The batch is assumed split evenly over every device
  (the data-parallel mesh of train.Steps); when it is not, chunks are only larger than planned.
  At 496 x 496 scores without a mask, 2 samples per chunk rather than all 16 run forward +
  backward 1.6x faster on a 2-core CPU (200 -> 123 ms for 10 heads of width 5, with dropout)."""
  devices = jax.device_count() if devices is None else devices
  if batch % devices:
    return 1
  local = batch // devices
  fit = max(1, CHUNK_BYTES // (4 * tq * tk))
  per_chunk = max(s for s in range(1, local + 1) if local % s == 0 and s <= fit)
  return local // per_chunk


def _plan(tq: int, tk: int, row_start: int, offset: Optional[int], rate: float,
          batch: int = 1, chunks: Optional[int] = None) -> _Plan:
  n = _row_blocks(tq, tk, row_start, offset)
  bounds = [round(i * tq / n) for i in range(n + 1)]
  blocks = []
  for r0, r1 in zip(bounds, bounds[1:]):
    kmax = tk if offset is None else min(tk, row_start + r1 + offset)  # keys j < row + 1 + offset
    masked = offset is not None and row_start + r0 + 1 + offset < kmax  # the block hides some
    blocks.append((r0, r1, kmax, masked))
  loop = tq * tk >= LOOP_MIN_SCORES and _LOOPS['map_heads'] and jax.default_backend() == 'cpu'
  if chunks is None:
    chunks = _batch_chunks(batch, tq, tk) if loop else 1
  if batch % chunks:
    raise ValueError(f'attention: {chunks} chunks do not divide the batch of {batch}')
  return _Plan(tuple(blocks), row_start, offset, rate, loop, chunks)


def _scores(plan: _Plan, block: int, qh: jax.Array, kh: jax.Array) -> jax.Array:
  """(B, r1 - r0, kmax) scores of one row block in float32, hidden keys at -inf."""
  r0, r1, kmax, masked = plan.blocks[block]
  s = jnp.einsum('bqd,bkd->bqk', qh[:, r0:r1], kh[:, :kmax])
  if masked:
    s = jnp.where(future_mask(r1 - r0, kmax, plan.row_start + r0, plan.offset), s, -jnp.inf)
  return s.astype(_acc_dtype(qh))


def _acc_dtype(x: jax.Array):
  """float32 for float32/bfloat16 inputs (float64 stays float64)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _keep(plan: _Plan, block: int, keys: jax.Array, shape) -> jax.Array:
  """The dropout keep mask of one row block, drawn per sample from that sample's key (keys: (B,)):
  P(keep) = 1 - rate, as an integer comparison of the random words (jax.random.bernoulli's float
  conversion costs ~6 more operations per score)."""
  draw = lambda k: jax.random.bits(jax.random.fold_in(k, block), shape[1:], jnp.uint32)
  bits = jax.vmap(draw)(keys)
  return bits < jnp.uint32(min(round((1.0 - plan.rate) * 2.0 ** 32), 2 ** 32 - 1))


def _join_rows(blocks: list[jax.Array]) -> jax.Array:
  """Row blocks (B, r1 - r0, ...) back into one (B, Tq, ...) array."""
  return blocks[0] if len(blocks) == 1 else jnp.concatenate(blocks, axis=1)


def _head_forward(plan: _Plan, qh, kh, vh, key):
  """One head: (B, Tq, hd) output and (B, Tq, 2) row statistics [m, r]: the row max of the
  scores and the reciprocal of the row's normaliser (dropout's 1 - rate folded in), so that the
  probabilities used are exactly exp(s - m) * r (see `_head_backward`)."""
  outs, stats = [], []
  for b in range(len(plan.blocks)):
    s = _scores(plan, b, qh, kh)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    if plan.rate > 0:
      e = jnp.where(_keep(plan, b, key, e.shape), e, 0.0)
      total = total * (1.0 - plan.rate)
    r = 1.0 / total
    o = jnp.einsum('bqk,bkd->bqd', e.astype(vh.dtype), vh[:, :plan.blocks[b][2]])
    outs.append(o * r.astype(o.dtype))
    stats.append(jnp.concatenate([m, r], axis=-1))
  return _join_rows(outs), _join_rows(stats)


def _head_backward(plan: _Plan, qh, kh, vh, key, delta, stats, d_out):
  """Cotangents (dq, dk^T, dv^T) of one head. With P = softmax(s), Z the kept mask over (1 - rate)
  and O = (P * Z) v: ds = P * (Z * (dO v^T) - rowsum(dO * O)).

  P is recomputed as the forward pass formed it, exp(s - m) times the reciprocal row sum, not as
  exp(s - lse) from a log-normaliser lse = m + log(sum): that sum is rounded at the magnitude of
  lse (and leans on the accuracy of log), so exp(s - lse) carries a row-wide relative error of up
  to |lse| * 2^-24, and its rows no longer sum to the 1 that `delta` (taken from the forward's
  exactly normalised output) assumes."""
  acc = _acc_dtype(qh)
  # dk and dv are accumulated transposed, (B, hd, Tk): as dot(q^T, ds) the wide score block is the
  # product's right operand in its natural layout, which CPU matmul kernels run ~2x faster than
  # dot(ds^T, q) with its hd-wide (5 or 10) output rows. The caller transposes them back outside
  # the head loop (inside it, XLA folds the transpose into the product and loses the gain).
  t_shape = lambda x: (x.shape[0], x.shape[2], x.shape[1])
  dq, dk_t, dv_t = [], jnp.zeros(t_shape(kh), acc), jnp.zeros(t_shape(vh), acc)
  rows_t = lambda a, b: jax.lax.dot_general(a, b, (((1,), (1,)), ((0,), (0,))))  # a^T b per sample
  for b, (r0, r1, kmax, _) in enumerate(plan.blocks):
    m, r = stats[:, r0:r1, :1], stats[:, r0:r1, 1:]
    p = jnp.exp(_scores(plan, b, qh, kh) - m) * r                 # P / (1 - rate)
    do = d_out[:, r0:r1]
    dp = jnp.einsum('bqd,bkd->bqk', do, vh[:, :kmax]).astype(acc)
    if plan.rate > 0:
      keep = _keep(plan, b, key, p.shape)
      pz = jnp.where(keep, p, 0.0)                               # P * Z
      # dp and delta cancel where one key dominates a row: subtract before scaling by p, as
      # autodiff of softmax does, so that the rounding stays relative to the difference.
      ds = p * (jnp.where(keep, dp, 0.0) - (1.0 - plan.rate) * delta[:, r0:r1])
    else:
      pz, ds = p, p * (dp - delta[:, r0:r1])
    ds = ds.astype(qh.dtype)
    dq.append(jnp.einsum('bqk,bkd->bqd', ds, kh[:, :kmax]))
    dk_t = dk_t.at[:, :, :kmax].add(rows_t(qh[:, r0:r1], ds))
    dv_t = dv_t.at[:, :, :kmax].add(rows_t(do, pz.astype(vh.dtype)))
  return _join_rows(dq), dk_t.astype(kh.dtype), dv_t.astype(vh.dtype)     # (B, hd, Tk) each


def _over_heads(plan: _Plan, fn, *args):
  """fn applied to every (head, chunk) of (H * chunks, ...) arguments: a lax.map on CPU above the
  size limit (one chunk's scores in cache at a time), else a vmap."""
  if plan.loop:
    return jax.lax.map(lambda a: fn(*a), args)
  return jax.vmap(fn)(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_core(plan: _Plan, qh, kh, vh, keys):
  return _over_heads(plan, functools.partial(_head_forward, plan), qh, kh, vh, keys)[0]


def _attention_core_fwd(plan, qh, kh, vh, keys):
  out, stats = _over_heads(plan, functools.partial(_head_forward, plan), qh, kh, vh, keys)
  return out, (qh, kh, vh, keys, out, stats)


def _attention_core_bwd(plan, residuals, d_out):
  qh, kh, vh, keys, out, stats = residuals
  # rowsum(dO * O) for every head at once, outside the per-head loop: inside it XLA:CPU fuses
  # this reduction into the dO v^T product's epilogue, which then runs ~3x slower.
  acc = _acc_dtype(qh)
  delta = jnp.sum(d_out.astype(acc) * out.astype(acc), axis=-1, keepdims=True)
  dq, dk_t, dv_t = _over_heads(plan, functools.partial(_head_backward, plan), qh, kh, vh, keys,
                               delta, stats, d_out)
  return dq, dk_t.swapaxes(-1, -2), dv_t.swapaxes(-1, -2), None


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal_offset: Optional[int],
              row_start: int = 0, dropout_rate: float = 0.0,
              rng: Optional[jax.Array] = None, chunks: Optional[int] = None) -> jax.Array:
  """softmax(q k^T + mask) v with dropout on the probabilities, per head.

  Args:
    q: (B, Tq, H, hd), already scaled; k, v: (B, Tk, H, hd).
    causal_offset: None for no mask, else key j is hidden from query i iff
      j - i >= 1 + causal_offset; query i is at position row_start + i.
    dropout_rate, rng: dropout on the normalised probabilities (rng None = no dropout).
    chunks: batch chunks per head in the CPU head loop (None: by _batch_chunks; the result does
      not depend on it).
  Returns (B, Tq, H, hd).

  The normalisation is applied after the value product, out = (drop(e) v) / sum(e) with
  e = exp(s - max s): the same function as dropout(softmax(s)) v, one (Tq, Tk) pass fewer.
  """
  rate = float(dropout_rate) if rng is not None and dropout_rate > 0 else 0.0
  plan = _plan(q.shape[1], k.shape[1], row_start, causal_offset, rate, batch=q.shape[0],
               chunks=chunks)
  keys = sample_keys(rng, q.shape[0], q.shape[2]) if rate > 0 else None
  if _use_native(plan, q, k, v, keys):
    return _native_core(plan, q, k, v, _block_key_words(plan, keys))
  args = to_loop_layout(plan.chunks, q, k, v, keys)
  return from_loop_layout(plan.chunks, _attention_core(plan, *args))


def dropout_keep_mask(batch: int, heads: int, tq: int, tk: int, *, causal_offset: Optional[int],
                      row_start: int, dropout_rate: float, rng: jax.Array) -> jax.Array:
  """(B, H, Tq, Tk) boolean: where `attention` keeps a probability under dropout (False beyond
  a row block's keys, which the causal mask hides anyway)."""
  plan = _plan(tq, tk, row_start, causal_offset, float(dropout_rate), batch=batch, chunks=1)
  keys = sample_keys(rng, batch, heads)
  blocks = []
  for i, (r0, r1, kmax, _) in enumerate(plan.blocks):       # (B, H, rows, kmax) per row block
    keep = jax.vmap(lambda key: _keep(plan, i, key, (batch, r1 - r0, kmax)), 1, 1)(keys)
    blocks.append(jnp.pad(keep, ((0, 0), (0, 0), (0, 0), (0, tk - kmax))))
  return jnp.concatenate(blocks, axis=2)


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal_offset: Optional[int],
                    row_start: int = 0, dropout_rate: float = 0.0,
                    rng: Optional[jax.Array] = None, chunks: Optional[int] = None) -> jax.Array:
  """The simple form of `attention` (same arguments, same function): dropout(softmax(q k^T +
  mask)) v for all heads at once, with the same dropout masks, and gradients by autodiff. The
  fast paths are tested against it; `chunks` is accepted and ignored."""
  del chunks
  rate = float(dropout_rate) if rng is not None and dropout_rate > 0 else 0.0
  b, tq, h, _ = q.shape
  tk = k.shape[1]
  s = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(_acc_dtype(q))
  if causal_offset is not None:
    s = jnp.where(future_mask(tq, tk, row_start, causal_offset), s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  if rate > 0:
    keep = dropout_keep_mask(b, h, tq, tk, causal_offset=causal_offset, row_start=row_start,
                             dropout_rate=rate, rng=rng)
    p = jnp.where(keep, p / (1.0 - rate), 0.0)
  return jnp.einsum('bhqk,bkhd->bqhd', p.astype(v.dtype), v)


# The native CPU kernel (dmd_jax/csrc/attention_cpu.cc via cpu_kernels): the same function, with
# one query row's scores kept in L1 through every pass. 'auto' uses it for the head-loop sizes on
# a single CPU device (the FFI call is not partitioned, so a batch sharded over several devices
# would be gathered), float32, and hash or no dropout; 'on' also across devices (tests); 'off'
# never.
_NATIVE = {'mode': 'auto'}


@contextlib.contextmanager
def native_attention(mode: str):
  """Within this context, newly traced attention uses the native CPU kernel per `mode`
  ('auto', 'on', 'off'); 'on' raises if the kernel cannot be loaded."""
  if mode not in ('auto', 'on', 'off'):
    raise ValueError(f"native attention mode must be 'auto', 'on' or 'off', got {mode!r}")
  saved = dict(_NATIVE)
  _NATIVE['mode'] = mode
  try:
    yield
  finally:
    _NATIVE.update(saved)


def _use_native(plan: _Plan, q, k, v, keys) -> bool:
  mode = _NATIVE['mode']
  if mode == 'off' or not _LOOPS['map_heads']:
    return False
  from dmd_jax import cpu_kernels, rng as rng_lib
  fits = (jax.default_backend() == 'cpu' and all(x.dtype == jnp.float32 for x in (q, k, v))
          and (keys is None or jax.random.key_impl(keys) == jax.random.key_impl(
              jax.random.wrap_key_data(jnp.zeros(2, jnp.uint32), impl=rng_lib.HASH_IMPL))))
  if mode == 'on':
    if not fits:
      raise ValueError('native attention needs the CPU backend, float32 q/k/v and hash or no '
                       'dropout')
    if not cpu_kernels.load():
      raise RuntimeError(f'native attention unavailable: {cpu_kernels.kernel_status()}')
    return True
  return fits and plan.loop and jax.device_count() == 1 and cpu_kernels.load()


def _block_key_words(plan: _Plan, keys) -> jax.Array:
  """(B, H, row blocks, 2) uint32 words of each block's dropout key (as `_keep` folds them in),
  or a placeholder without dropout."""
  if keys is None:
    return jnp.zeros((1,), jnp.uint32)
  fold = lambda b: jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, b)))(keys)
  per_block = [jax.random.key_data(fold(b)) for b in range(len(plan.blocks))]
  return jnp.stack(per_block, axis=2)


def _native_attrs(plan: _Plan) -> dict:
  import numpy as np
  bounds = [b[0] for b in plan.blocks] + [plan.blocks[-1][1]]
  return dict(row_start=np.int64(plan.row_start),
              offset=np.int64(-1 if plan.offset is None else plan.offset),
              rate=np.float32(plan.rate),
              threshold=np.int64(min(round((1.0 - plan.rate) * 2.0 ** 32), 2 ** 32 - 1)),
              bounds=np.asarray(bounds, np.int64),
              kmaxs=np.asarray([b[2] for b in plan.blocks], np.int64))


def _native_forward(plan: _Plan, q, k, v, words):
  from dmd_jax.cpu_kernels import TARGETS
  b, tq, h, _ = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, h, tq, 2), q.dtype))   # row [max, 1 / normaliser]
  return jax.ffi.ffi_call(TARGETS['forward'][0], out_types, vmap_method='sequential')(
      q, k, v, words, **_native_attrs(plan))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _native_core(plan: _Plan, q, k, v, words):
  return _native_forward(plan, q, k, v, words)[0]


def _native_core_fwd(plan, q, k, v, words):
  out, stats = _native_forward(plan, q, k, v, words)
  return out, (q, k, v, words, out, stats)


def _native_core_bwd(plan, residuals, d_out):
  from dmd_jax.cpu_kernels import TARGETS
  q, k, v, words, out, stats = residuals
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(TARGETS['backward'][0], out_types, vmap_method='sequential')(
      q, k, v, words, out, stats, d_out.astype(q.dtype), **_native_attrs(plan))
  return dq, dk, dv, None


_native_core.defvjp(_native_core_fwd, _native_core_bwd)


def sample_keys(rng: jax.Array, batch: int, heads: int) -> jax.Array:
  """(B, H) dropout keys, one per sample and head: masks do not depend on how the batch is split
  into chunks or over devices."""
  per_head = jax.random.split(rng, heads)
  return jax.vmap(lambda b: jax.vmap(lambda k: jax.random.fold_in(k, b))(per_head))(
      jnp.arange(batch, dtype=jnp.uint32))


def to_loop_layout(chunks: int, q, k, v, keys):
  """(B, T, H, hd) arrays and (B, H) keys (None: no dropout) -> (H * chunks, B / chunks, ...):
  entry j * H + h holds head h of samples j, j + chunks, j + 2 chunks, ... (the chunk index is
  the inner factor of the batch, so a batch sharded over devices stays sharded in each chunk)."""
  b, h = q.shape[0], q.shape[2]
  c = b // chunks

  def split(x):   # (B, H, ...) -> (chunks * H, c, ...)
    x = x.reshape(c, chunks, h, *x.shape[2:])
    return jnp.moveaxis(x, 0, 2).reshape(chunks * h, c, *x.shape[3:])

  heads = [split(x.swapaxes(1, 2)) for x in (q, k, v)]
  if keys is None:
    keys = jnp.zeros((chunks * h,), jnp.uint32)
  else:
    keys = split(keys)
  return (*heads, keys)


def from_loop_layout(chunks: int, out: jax.Array) -> jax.Array:
  """Inverse of to_loop_layout for the (H * chunks, B / chunks, Tq, hd) output."""
  _, c, t, hd = out.shape
  out = out.reshape(chunks, -1, c, t, hd)           # (chunks, H, c, Tq, hd)
  return out.transpose(2, 0, 3, 1, 4).reshape(c * chunks, t, -1, hd)


class MultiheadAttention(nn.Module):
  """MulT's attention: packed in-projection (`in_proj_kernel` (E, 3E)), scaled q, additive mask,
  float32 softmax, dropout on the probabilities, output projection."""
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0

  @nn.compact
  def __call__(self, query, key, value, causal_offset: Optional[int], row_start: int,
               deterministic: bool):
    e, h = self.embed_dim, self.num_heads
    hd = e // h
    w = self.param('in_proj_kernel', nn.initializers.xavier_uniform(), (e, 3 * e))
    b = self.param('in_proj_bias', nn.initializers.zeros, (3 * e,))
    w, b = w.astype(query.dtype), b.astype(query.dtype)
    if query is key and key is value:           # self-attention: one packed matmul
      q, k, v = jnp.split(query @ w + b, 3, axis=-1)
    else:
      q = query @ w[:, :e] + b[:e]
      if key is value:                          # shared key/value input (eval mode)
        k, v = jnp.split(key @ w[:, e:] + b[e:], 2, axis=-1)
      else:
        k = key @ w[:, e:2 * e] + b[e:2 * e]
        v = value @ w[:, 2 * e:] + b[2 * e:]
    q = q * (hd ** -0.5)
    bsz, tq, tk = query.shape[0], query.shape[1], key.shape[1]
    drop = not deterministic and self.attn_dropout > 0
    out = attention(q.reshape(bsz, tq, h, hd), k.reshape(bsz, tk, h, hd),
                    v.reshape(bsz, tk, h, hd), causal_offset=causal_offset, row_start=row_start,
                    dropout_rate=self.attn_dropout,
                    rng=self.make_rng('dropout') if drop else None)
    return Linear(e, init='xavier', name='out_proj')(out.reshape(bsz, tq, e))


class TransformerEncoderLayer(nn.Module):
  """Pre-LN layer: x + Attn(LN0(x), LN0(k), LN0(v)); then x + FFN(LN1(x)).

  With `last_only` only the last query position is computed (its keys and values still span the
  whole input): the output is (B, 1, E), exactly the last row of the full layer's output.
  """
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, x_k, x_v, causal_offset: Optional[int], deterministic: bool,
               last_only: bool = False):
    ln0 = layer_norm('layer_norms_0')
    h = ln0(x)
    if x_k is None:
      hk = hv = h
    else:
      hk = ln0(x_k)
      hv = hk if x_v is x_k else ln0(x_v)
    row_start = 0
    if last_only:
      row_start, x, h = x.shape[1] - 1, x[:, -1:], h[:, -1:]
    a = MultiheadAttention(self.embed_dim, self.num_heads, self.attn_dropout,
                           name='self_attn')(h, hk, hv, causal_offset, row_start, deterministic)
    x = x + nn.Dropout(self.res_dropout)(a, deterministic=deterministic)
    h = layer_norm('layer_norms_1')(x)
    h = nn.relu(Linear(4 * self.embed_dim, init='xavier', name='fc1')(h))
    h = nn.Dropout(self.relu_dropout)(h, deterministic=deterministic)
    h = Linear(self.embed_dim, init='xavier', name='fc2')(h)
    return x + nn.Dropout(self.res_dropout)(h, deterministic=deterministic)


class TransformerEncoder(nn.Module):
  """MulT TransformerEncoder: self-attention when `x_kv` is None, else cross-modal attention with
  query `x` (target modality) and key = value = `x_kv` (source modality).

  `last_only=True` returns only the last time step, (B, 1, E), computing the final layer for that
  position alone (DMD reads nothing else from its self-attention and memory transformers).
  """
  embed_dim: int
  num_heads: int
  layers: int
  attn_dropout: float = 0.0
  relu_dropout: float = 0.0
  res_dropout: float = 0.0
  embed_dropout: float = 0.0
  attn_mask: bool = True
  last_only: bool = False

  @nn.compact
  def __call__(self, x_in: jax.Array, x_kv: Optional[jax.Array] = None, *,
               deterministic: bool = True) -> jax.Array:
    scale = math.sqrt(self.embed_dim)
    drop = nn.Dropout(self.embed_dropout)
    x = drop(scale * x_in + sinusoidal_positions(x_in), deterministic=deterministic)
    x_k = x_v = None
    if x_kv is not None:
      kv = scale * x_kv + sinusoidal_positions(x_kv)
      # Key and value are separate tensors in the reference, each with its own dropout mask.
      x_k = drop(kv, deterministic=deterministic)
      x_v = x_k if deterministic or self.embed_dropout == 0 else drop(kv, deterministic=False)
    tk = x.shape[1] if x_kv is None else x_kv.shape[1]
    offset = abs(tk - x.shape[1]) if self.attn_mask else None
    make = lambda **kw: TransformerEncoderLayer(self.embed_dim, self.num_heads, self.attn_dropout,
                                                self.relu_dropout, self.res_dropout, **kw)
    names = [f'layers_{i}' for i in range(self.layers)]
    if self.last_only:    # the final layer computes the last position only
      x = scan_layers(self, make, names[:-1], x, x_k, x_v, offset, deterministic=deterministic)
      x = make(name=names[-1])(x, x_k, x_v, offset, deterministic, last_only=True)
    else:
      x = scan_layers(self, make, names, x, x_k, x_v, offset, deterministic=deterministic)
    return layer_norm('layer_norm')(x)
