"""The reference's optimizer semantics as an optax transformation (spec §4).

PyTorch reference, per mini-batch: `backward()` adds the gradient into `.grad` (summed, not
averaged), then `clip_grad_value_(params, 0.6)` clips the *running sum* elementwise; after every
`update_epochs` (= 10) mini-batches one Adam step is taken and `.grad` is zeroed at the next
window's first batch. A trailing partial window is never stepped.

`accumulate_clipped` reproduces exactly that around any inner transformation: it returns zero
updates until the window is complete, then the inner update of the clipped sum (or, through
`apply`, the updated parameters directly; the train step uses that).

The running sum and the inner state live on flat vectors, one per *segment* of the parameter
tree (`Segments`): every repeated layer (a path component `layer_<i>` or `layers_<i>`) is one
segment and all other parameters share one more. Not a tree of ~900 leaves: per-leaf Adam and
clipping made up ~30% of the train step's compile time. Not one vector either: turning a flat
vector back into parameter leaves takes one slice per leaf, and XLA compiles a kernel for each
distinct slice; in one vector every offset is distinct (~900 kernels, ~40% of all kernels of the
MOSI-unaligned train step), while the layers of one stack have identical segments whose slices
compile once.

A segment of at least ALIGN_MIN elements is padded with zeros to a multiple of ALIGN, so that its
vectors (the running sum and Adam's moments) can be sharded over any power-of-two data axis up
to ALIGN devices (the 'fsdp' state layout, dmd_jax/training/steps.py). The padding receives zero
gradients, keeps zero moments and zero updates, and is dropped by `unflatten`: the arithmetic on
the parameters is unchanged.
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


_LAYER = re.compile(r'layers?_\d+')
ALIGN, ALIGN_MIN = 1024, 2 ** 14


def padded_size(n: int) -> int:
  """The length of a segment vector holding `n` parameters (see the module docstring)."""
  return n if n < ALIGN_MIN else -(-n // ALIGN) * ALIGN


def _path_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]


class Segments:
  """Flattening of a parameter tree into per-segment vectors and back.

  A leaf's segment is its path up to the last `layer_<i>`/`layers_<i>` component; leaves outside
  any layer share the segment ''. Segments are ordered by first appearance in the tree's leaf
  order, and leaves keep that order inside their segment, so the layers of one stack get
  identically laid out vectors.
  """

  def __init__(self, tree: PyTree):
    leaves_with_path, self.treedef = jax.tree_util.tree_flatten_with_path(tree)
    self.shapes = [tuple(np.shape(x)) for _, x in leaves_with_path]
    members: dict[str, list[int]] = {}
    for i, (path, _) in enumerate(leaves_with_path):
      names = _path_names(path)
      cut = max((j + 1 for j, n in enumerate(names) if _LAYER.fullmatch(n)), default=0)
      members.setdefault('/'.join(names[:cut]), []).append(i)
    self.names = tuple(members)
    self.members = tuple(tuple(m) for m in members.values())

  def flatten(self, tree: PyTree) -> tuple[jax.Array, ...]:
    leaves = self.treedef.flatten_up_to(tree)
    out = []
    for m in self.members:
      parts = [jnp.ravel(leaves[i]) for i in m]
      n = sum(p.size for p in parts)
      if padded_size(n) > n:
        parts.append(jnp.zeros((padded_size(n) - n,), parts[0].dtype))
      out.append(jnp.concatenate(parts))
    return tuple(out)

  def unflatten(self, vectors) -> PyTree:
    if len(vectors) != len(self.members):
      raise ValueError(f'expected {len(self.members)} segment vectors, got {len(vectors)}')
    leaves = [None] * len(self.shapes)
    for vec, m in zip(vectors, self.members):
      sizes = [math.prod(self.shapes[i]) for i in m]
      if vec.shape != (padded_size(sum(sizes)),):
        raise ValueError(f'segment vector of shape {vec.shape}, expected '
                         f'({padded_size(sum(sizes))},)')
      start = 0
      for i, n in zip(m, sizes):
        leaves[i] = vec[start:start + n].reshape(self.shapes[i])
        start += n
    return self.treedef.unflatten(leaves)


class AccumulationState(NamedTuple):
  acc: tuple             # clipped running sum of this window's gradients, one vector per segment
  count: jax.Array       # micro-batches accumulated in the current window
  inner: optax.OptState


class Accumulator(NamedTuple):
  """An optax GradientTransformation (`init`, `update`) with a fused `apply`.

  `apply(grads, state, params) -> (new_params, new_state)` adds the update to the parameters
  inside the window-closing branch, so a micro-step that only accumulates leaves the parameters
  untouched: no zero update tree is built and added to every parameter (a full pass over the
  ~120M parameters per micro-step, and ~1,200 small kernels for XLA to compile).
  `api.TrainState.apply_gradients` uses it when present.
  """
  init: Any
  update: Any
  apply: Any


def accumulate_clipped(inner: optax.GradientTransformation, every_k: int,
                       clip: Optional[float]) -> Accumulator:
  """Sum gradients over `every_k` micro-batches, clipping the running sum to +-clip after each
  one (no clipping when clip is None or <= 0), and apply `inner` once per window."""
  if every_k < 1:
    raise ValueError(f'every_k (update_epochs) must be >= 1, got {every_k}')
  use_clip = clip is not None and clip > 0

  def init_fn(params):
    flat = Segments(params).flatten(params)
    return AccumulationState(jax.tree.map(jnp.zeros_like, flat), jnp.zeros([], jnp.int32),
                             inner.init(flat))

  def accumulate(grads, state):
    segments = Segments(grads)
    acc = jax.tree.map(jnp.add, tuple(state.acc), segments.flatten(grads))
    if use_clip:
      acc = jax.tree.map(lambda a: jnp.clip(a, -clip, clip), acc)
    return acc, state.count + 1, segments.unflatten

  def inner_step(acc, state, params):
    flat_params = None if params is None else Segments(params).flatten(params)
    updates, inner_state = inner.update(acc, state.inner, flat_params)
    return updates, AccumulationState(jax.tree.map(jnp.zeros_like, acc), jnp.zeros([], jnp.int32),
                                      inner_state)

  def update_fn(grads, state, params=None):
    acc, count, unravel = accumulate(grads, state)

    def step(_):
      updates, new_state = inner_step(acc, state, params)
      return unravel(updates), new_state

    def wait(_):
      return jax.tree.map(jnp.zeros_like, grads), AccumulationState(acc, count, state.inner)

    return jax.lax.cond(count >= every_k, step, wait, None)

  def apply_fn(grads, state, params):
    acc, count, unravel = accumulate(grads, state)

    def step(_):
      updates, new_state = inner_step(acc, state, params)
      return optax.apply_updates(params, unravel(updates)), new_state

    def wait(_):
      return params, AccumulationState(acc, count, state.inner)

    return jax.lax.cond(count >= every_k, step, wait, None)

  return Accumulator(init_fn, update_fn, apply_fn)


def reset_window(state: AccumulationState) -> AccumulationState:
  """Drops a partially accumulated window (what the reference does at each epoch's start)."""
  return state._replace(acc=jax.tree.map(jnp.zeros_like, state.acc),
                        count=jnp.zeros_like(state.count))


def reference_optimizer(learning_rate: float = 1e-4, update_epochs: int = 10,
                        grad_clip: Optional[float] = 0.6) -> Accumulator:
  """Adam with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, no weight decay) on all
  parameters, behind the clipped accumulation. The learning rate is an injected hyper-parameter
  so a plateau scheduler can change it (`set_learning_rate`)."""
  adam = optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, b1=0.9, b2=0.999,
                                              eps=1e-8)
  return accumulate_clipped(adam, update_epochs, grad_clip)


def set_learning_rate(state: AccumulationState, lr: float) -> AccumulationState:
  inner = state.inner
  hp = dict(inner.hyperparams, learning_rate=jnp.asarray(lr, jnp.float32))
  return state._replace(inner=inner._replace(hyperparams=hp))


def get_learning_rate(state: AccumulationState) -> float:
  return float(state.inner.hyperparams['learning_rate'])
