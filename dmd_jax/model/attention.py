"""MulT attention: the plain form first, then the fast paths that compute the same function.

`attention(q, k, v, ..., config=AttentionConfig())` is softmax(q k^T + mask) v with dropout on
the probabilities, per head. `config.impl` picks how it is computed:
  * 'plain' (`plain_attention`): all heads at once, dropout(softmax(s)) v, gradients by autodiff.
    The definition the fast paths are tested against.
  * 'fast' (default): the same function with a hand-written backward that recomputes the
    probabilities from q, k and two saved numbers per row instead of storing (Tq, Tk) tensors.
    On CPU, above LOOP_MIN_SCORES scores per head and sample, heads run one at a time (lax.map)
    in batch chunks of about CHUNK_BYTES of scores (cache-resident), causal rows in ROW_BLOCKS
    blocks that read only the keys they may see; and on a single CPU device the native kernel
    (dmd_jax/model/csrc/attention_cpu.cc) keeps one query row's scores in L1 through every pass.

Dropout masks are drawn per (sample, head) and row block from a hash of the key, so every path,
chunking and device count draws the same masks (`dropout_keep_mask`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dmd_jax.config import AttentionConfig
from dmd_jax.model import kernels
from dmd_jax.model import rng as rng_lib
from dmd_jax.model.layers import Linear
from dmd_jax.model.target import platform_of

DEFAULT = AttentionConfig()


def future_mask(tq: int, tk: int, row_start: int = 0, offset: Optional[int] = None) -> jax.Array:
  """(tq, tk) boolean 'may attend' mask: key j is hidden from query i iff j - i >= 1 + offset,
  offset = |tk - tq| by default; rows are query positions row_start, row_start + 1, ..."""
  offset = abs(tk - tq) if offset is None else offset
  i = row_start + jnp.arange(tq)[:, None]
  j = jnp.arange(tk)[None, :]
  return (j - i) < 1 + offset


def _acc_dtype(x: jax.Array):
  """float32 for float32/bfloat16 inputs (float64 stays float64)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def sample_keys(rng: jax.Array, batch: int, heads: int) -> jax.Array:
  """(B, H) dropout keys, one per sample and head: masks do not depend on how the batch is split
  into chunks or over devices."""
  per_head = jax.random.split(rng, heads)
  return jax.vmap(lambda b: jax.vmap(lambda k: jax.random.fold_in(k, b))(per_head))(
      jnp.arange(batch, dtype=jnp.uint32))


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
                    rng: Optional[jax.Array] = None) -> jax.Array:
  """dropout(softmax(q k^T + mask)) v for all heads at once, with the masks of
  `dropout_keep_mask`; gradients by autodiff. Arguments as `attention`."""
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


# ---- the fast paths -----------------------------------------------------------------------------

# Attention over long sequences (the unaligned settings' 375/500 steps) is memory-bound: a layer's
# (B, heads, T, T) score tensor is ~160 MB at T = 500, and every softmax/dropout pass streams it
# through memory. On CPU, above LOOP_MIN_SCORES scores per head and sample, heads are processed one
# at a time (lax.map), and each head's batch in chunks of about CHUNK_BYTES of scores per device,
# so that a chunk's scores stay in cache; with a causal mask the query rows are cut into
# ROW_BLOCKS blocks that only read the keys they may see. The gradient is written by hand
# (`_attention_core`): the backward pass recomputes the scores from q and k and the saved
# per-row max and reciprocal normaliser, so no (T, T) tensor is stored between the passes and
# none of the forward's reductions is repeated.
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
          batch: int = 1, chunks: Optional[int] = None, config: AttentionConfig = DEFAULT) -> _Plan:
  n = _row_blocks(tq, tk, row_start, offset)
  bounds = [round(i * tq / n) for i in range(n + 1)]
  blocks = []
  for r0, r1 in zip(bounds, bounds[1:]):
    kmax = tk if offset is None else min(tk, row_start + r1 + offset)  # keys j < row + 1 + offset
    masked = offset is not None and row_start + r0 + 1 + offset < kmax  # the block hides some
    blocks.append((r0, r1, kmax, masked))
  if config.head_loop == 'auto':
    loop = tq * tk >= LOOP_MIN_SCORES and platform_of(config) == 'cpu'
  else:
    loop = config.head_loop == 'on'
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
    o = jnp.einsum('bqk,bkd->bqd', e.astype(vh.dtype), vh[:, :plan.blocks[b][2]],
                   preferred_element_type=r.dtype)
    outs.append((o * r).astype(vh.dtype))        # normalised in float32 under bf16 too
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


# ---- the native CPU kernel -----------------------------------------------------------------------
# The same function through the XLA FFI (dmd_jax/model/kernels.py builds and registers it). The
# FFI call is not partitioned, so a batch sharded over several devices would be gathered: 'auto'
# uses it on a single CPU device only.

def _use_native(plan: _Plan, q, k, v, keys, config: AttentionConfig) -> bool:
  """Whether the native kernel runs this call (see AttentionConfig.native): only in a program
  compiled for the CPU (`config.platform`), whatever the tracing host is."""
  mode = config.native
  if mode == 'off':
    return False
  fits = (platform_of(config) == 'cpu' and all(x.dtype == jnp.float32 for x in (q, k, v))
          and (keys is None or jax.random.key_impl(keys) == jax.random.key_impl(
              jax.random.wrap_key_data(jnp.zeros(2, jnp.uint32), impl=rng_lib.HASH_IMPL))))
  if mode == 'on':
    if not fits:
      raise ValueError('native attention needs the CPU backend, float32 q/k/v and hash or no '
                       'dropout')
    if not kernels.load():
      raise RuntimeError(f'native attention unavailable: {kernels.kernel_status()}')
    return True
  return fits and plan.loop and jax.device_count() == 1 and kernels.load()


def _block_key_words(plan: _Plan, keys) -> jax.Array:
  """(B, H, row blocks, 2) uint32 words of each block's dropout key (as `_keep` folds them in),
  or a placeholder without dropout."""
  if keys is None:
    return jnp.zeros((1,), jnp.uint32)
  fold = lambda b: jax.vmap(jax.vmap(lambda k: jax.random.fold_in(k, b)))(keys)
  per_block = [jax.random.key_data(fold(b)) for b in range(len(plan.blocks))]
  return jnp.stack(per_block, axis=2)


def _native_attrs(plan: _Plan) -> dict:
  bounds = [b[0] for b in plan.blocks] + [plan.blocks[-1][1]]
  return dict(row_start=np.int64(plan.row_start),
              offset=np.int64(-1 if plan.offset is None else plan.offset),
              rate=np.float32(plan.rate),
              threshold=np.int64(min(round((1.0 - plan.rate) * 2.0 ** 32), 2 ** 32 - 1)),
              bounds=np.asarray(bounds, np.int64),
              kmaxs=np.asarray([b[2] for b in plan.blocks], np.int64))


def _native_forward(plan: _Plan, q, k, v, words):
  b, tq, h, _ = q.shape
  out_types = (jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, h, tq, 2), q.dtype))   # row [max, 1 / normaliser]
  return jax.ffi.ffi_call(kernels.TARGETS['forward'][0], out_types, vmap_method='sequential')(
      q, k, v, words, **_native_attrs(plan))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _native_core(plan: _Plan, q, k, v, words):
  return _native_forward(plan, q, k, v, words)[0]


def _native_core_fwd(plan, q, k, v, words):
  out, stats = _native_forward(plan, q, k, v, words)
  return out, (q, k, v, words, out, stats)


def _native_core_bwd(plan, residuals, d_out):
  q, k, v, words, out, stats = residuals
  out_types = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
  dq, dk, dv = jax.ffi.ffi_call(kernels.TARGETS['backward'][0], out_types, vmap_method='sequential')(
      q, k, v, words, out, stats, d_out.astype(q.dtype), **_native_attrs(plan))
  return dq, dk, dv, None


_native_core.defvjp(_native_core_fwd, _native_core_bwd)


# ---- the entry point and the layer ---------------------------------------------------------------

def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal_offset: Optional[int],
              row_start: int = 0, dropout_rate: float = 0.0, rng: Optional[jax.Array] = None,
              chunks: Optional[int] = None, config: AttentionConfig = DEFAULT) -> jax.Array:
  """softmax(q k^T + mask) v with dropout on the probabilities, per head.

  Args:
    q: (B, Tq, H, hd), already scaled; k, v: (B, Tk, H, hd).
    causal_offset: None for no mask, else key j is hidden from query i iff
      j - i >= 1 + causal_offset; query i is at position row_start + i.
    dropout_rate, rng: dropout on the normalised probabilities (rng None = no dropout).
    chunks: batch chunks per head in the CPU head loop (None: by _batch_chunks; the result does
      not depend on it).
    config: which implementation (AttentionConfig; all compute the same function).
  Returns (B, Tq, H, hd).

  The normalisation is applied after the value product, out = (drop(e) v) / sum(e) with
  e = exp(s - max s): the same function as dropout(softmax(s)) v, one (Tq, Tk) pass fewer.
  """
  if config.impl == 'plain':
    return plain_attention(q, k, v, causal_offset=causal_offset, row_start=row_start,
                           dropout_rate=dropout_rate, rng=rng)
  rate = float(dropout_rate) if rng is not None and dropout_rate > 0 else 0.0
  plan = _plan(q.shape[1], k.shape[1], row_start, causal_offset, rate, batch=q.shape[0],
               chunks=chunks, config=config)
  keys = sample_keys(rng, q.shape[0], q.shape[2]) if rate > 0 else None
  if _use_native(plan, q, k, v, keys, config):
    return _native_core(plan, q, k, v, _block_key_words(plan, keys))
  args = to_loop_layout(plan.chunks, q, k, v, keys)
  return from_loop_layout(plan.chunks, _attention_core(plan, *args))


class MultiheadAttention(nn.Module):
  """MulT's attention: packed in-projection (`in_proj_kernel` (E, 3E)), scaled q, additive mask,
  float32 softmax, dropout on the probabilities, output projection."""
  embed_dim: int
  num_heads: int
  attn_dropout: float = 0.0
  config: AttentionConfig = DEFAULT

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
                    rng=self.make_rng('dropout') if drop else None, config=self.config)
    return Linear(e, init='xavier', name='out_proj')(out.reshape(bsz, tq, e))
