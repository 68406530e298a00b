"""The training state and the pure train step: (state, batch, rng) -> (state, metrics).

    state = create_train_state(params, reference_optimizer())
    step = make_train_step(cfg)
    state, metrics = step(state, batch, jax.random.key(1))
"""

from __future__ import annotations

import functools
from typing import Any, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax

from dmd_jax.config import DMDConfig
from dmd_jax.model import compiler_options, precision
from dmd_jax.model.target import platform_of
from dmd_jax.objective import compute_loss
from dmd_jax.schema import UNITS

PyTree = Any
Batch = Mapping[str, jax.Array]


class TrainState(flax.struct.PyTreeNode):
  """Parameters and optimizer state; `step` counts micro-batches (optimizer updates happen once
  per accumulation window, inside `opt_state`). `loss_weights` overrides the objective's
  sweepable weights (dmd_jax.objective.LOSS_WEIGHTS) for this state, e.g. a sweep member's; empty
  means the config's."""
  step: jax.Array
  params: PyTree
  opt_state: optax.OptState
  loss_weights: dict = flax.struct.field(default_factory=dict)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

  def apply_gradients(self, grads: PyTree) -> 'TrainState':
    apply = getattr(self.tx, 'apply', None)     # optim.Accumulator: update fused into the step
    if apply is not None:
      params, opt_state = apply(grads, self.opt_state, self.params)
    else:
      updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
      params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def create_train_state(params: PyTree, tx: optax.GradientTransformation,
                       loss_weights: Mapping[str, float] | None = None) -> TrainState:
  weights = {k: jnp.float32(v) for k, v in (loss_weights or {}).items()}
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                    loss_weights=weights, tx=tx)


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, config: DMDConfig,
               train: bool = True) -> tuple[TrainState, dict[str, jax.Array]]:
  """One micro-batch: forward, every loss, backward, clipped accumulation, and the Adam update
  when the window completes. Pure; dropout keys are `fold_in(rng, step)`."""
  key = jax.random.fold_in(rng, state.step)
  grad_fn = jax.value_and_grad(compute_loss, has_aux=True)
  with precision.matmul_precision(config):     # the backward's products too
    (_, aux), grads = grad_fn(state.params, batch, config, rng=key, train=train, step=state.step,
                             weights=state.loss_weights)
  metrics = dict(aux['losses'])
  for space in UNITS:   # batch moments: epoch statistics without another pass over the data
    e = aux['outputs'][f'edges_{space}']                   # (B, 3, 3) per sample
    metrics[f'edges_{space}_sum'] = jnp.sum(e, axis=0)
    # squared deviations from the batch's own mean (a plain sum of squares would cancel: the
    # edges' variance is ~1e-4 of their square)
    metrics[f'edges_{space}_m2'] = jnp.sum(jnp.square(e - jnp.mean(e, axis=0)), axis=0)
  return state.apply_gradients(grads), metrics


def make_train_step(config: DMDConfig, *, train: bool = True, donate: bool = True):
  """`train_step` jitted once for `config` on the default device (the state is donated unless
  donate=False)."""
  fn = functools.partial(train_step, config=config, train=train)
  return jax.jit(fn, donate_argnums=(0,) if donate else (),
                 compiler_options=compiler_options(platform_of(config.attention)))
