"""The jitted steps of training and evaluation for a group of members (seeds, or sweep members)
trained together: every state carries a leading member axis, the train step is the single-member
step vmapped over it, and the device mesh has two axes, 'seed' (members spread over devices) and
'data' (each member's batch split over devices; jit over the mesh, the modern form of a pmapped
step). A group of one member is the plain data-parallel run.

`evaluate` runs a whole split through the eval step for every member at once.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmd_jax.analysis.metrics import regression_metrics
from dmd_jax.config import DMDConfig
from dmd_jax.data.pipeline import Loader
from dmd_jax.model import compiler_options, forward
from dmd_jax.schema import BATCH_KEYS, EVAL_KEYS, UNITS
from dmd_jax.training import optim
from dmd_jax.training.state import train_step

PyTree = Any


def seed_axis_size(members: int, devices: int, processes: int = 1) -> int:
  """How many device groups the members spread over: the largest count that divides both the
  members and the devices; 1 across several processes (each process then reads its block of
  every member's batch, see dmd_jax.data.pipeline)."""
  return 1 if processes > 1 else math.gcd(members, devices)


def make_mesh(devices=None, seed_axis: int = 1) -> Mesh:
  """A ('seed', 'data') mesh of `devices` (default: all) with `seed_axis` device groups."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  if devices.size % seed_axis:
    raise ValueError(f'{devices.size} devices do not split into {seed_axis} seed groups')
  return Mesh(devices.reshape(seed_axis, -1), ('seed', 'data'))


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Member trees -> one tree with a leading member axis."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def member(tree: PyTree, i: int) -> PyTree:
  """Member `i` of a stacked tree."""
  return jax.tree.map(lambda x: x[i], tree)


class Steps:
  """The group's train and eval steps, each jitted once over `mesh`."""

  def __init__(self, cfg: DMDConfig, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.members = NamedSharding(mesh, P('seed'))          # leading member axis
    self.batches = NamedSharding(mesh, P('seed', 'data'))  # (member, sample, ...)
    self.shared = NamedSharding(mesh, P('data'))           # one batch for every member (eval)
    one = functools.partial(train_step, config=cfg, train=True)
    # how often each step was traced (each trace is one compilation, or one load from the
    # persistent compilation cache): 1 per input shape
    self.traces = {'train': 0, 'eval': 0}

    def train(state, batch, rng, active):
      self.traces['train'] += 1
      new, metrics = jax.vmap(one)(state, batch, rng)
      # a finished member stops changing
      keep = lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
      return jax.tree.map(keep, new, state), metrics

    self.train = jax.jit(train, in_shardings=(self.members, self.batches, self.members,
                                              self.members),
                         out_shardings=(self.members, self.replicated), donate_argnums=(0,),
                         compiler_options=compiler_options())

    def evaluate(params, batch):
      self.traces['eval'] += 1
      out = forward(params, batch, cfg, train=False)
      res = {'pred': out['output_logit'].reshape(-1), 'label': batch['labels'].reshape(-1),
             'mask': batch['mask'], 'index': batch['index'],
             **{u: out[f'edges_{u}'] for u in UNITS}}
      if cfg.dhmd:       # dictionary activations (B, 3, K) per space
        res.update({f'dict_{u}': out[f'dict_act_{u}'] for u in UNITS})
      return res

    self.eval = jax.jit(jax.vmap(evaluate, in_axes=(0, None)),
                        in_shardings=(self.members, self.shared), out_shardings=self.replicated,
                        compiler_options=compiler_options())

    def reset_window(state):
      return state.replace(opt_state=optim.reset_window(state.opt_state))

    def set_lr(state, lrs):
      return state.replace(opt_state=optim.set_learning_rate(state.opt_state, lrs))

    def keep_best(best, params, improved):
      pick = lambda n, o: jnp.where(improved.reshape(improved.shape + (1,) * (n.ndim - 1)), n, o)
      return jax.tree.map(pick, params, best)

    # Host-side edits of the state as jitted functions with the step's shardings: no transfer,
    # no recompilation of the train step, and valid across processes.
    self.reset_window = jax.jit(reset_window, out_shardings=self.members, donate_argnums=(0,))
    self.set_lr = jax.jit(set_lr, out_shardings=self.members, donate_argnums=(0,))
    self.keep_best = jax.jit(keep_best, out_shardings=self.members, donate_argnums=(0,))
    self.keys = jax.jit(jax.vmap(jax.random.key), out_shardings=self.members)
    # one member's copy on every device (one compile per tree structure): what a checkpoint
    # stores, fetched to the host in one transfer (orbax would slice each device's shard of
    # every leaf op by op, ~15 s of small compiles in a fresh process)
    self._take = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree),
                         out_shardings=self.replicated)

  def host_member(self, tree: PyTree, i: int) -> PyTree:
    """Member `i` of a stacked device tree as numpy arrays (the same on every process)."""
    return jax.device_get(self._take(tree, np.int32(i)))

  def put_members(self, tree):
    """A stacked host tree (or arrays the same on every process) onto the mesh."""
    return jax.device_put(jax.device_get(tree), self.members)

  def put(self, batch: Mapping[str, np.ndarray], keys=BATCH_KEYS) -> dict[str, jax.Array]:
    """This process's blocks of every member's batch, (members, local batch, ...)."""
    return {k: jax.make_array_from_process_local_data(self.batches, batch[k]) for k in keys}

  def put_shared(self, batch: Mapping[str, np.ndarray], keys=EVAL_KEYS) -> dict[str, jax.Array]:
    """This process's block of one batch that every member reads."""
    return {k: jax.make_array_from_process_local_data(self.shared, batch[k]) for k in keys}


def evaluate(steps: Steps, params, loader: Loader,
             active: Optional[Sequence[bool]] = None) -> list[tuple[dict, dict]]:
  """Per member: metrics over every sample of a split (padding masked out) and the
  predictions; every process gets the same numbers (the eval outputs are replicated). Members
  marked inactive get None.

  'Loss' is the mean L1 over all samples; the reference averages per-batch means (its last,
  smaller batch weighs more) and rounds to 4 places."""
  outs = [steps.eval(params, steps.put_shared(batch)) for batch in loader.epoch(0)]
  host = jax.device_get(outs)
  keep = np.concatenate([o['mask'][0] for o in host]) > 0
  results = []
  for i in range(len(host[0]['pred'])):
    if active is not None and not active[i]:
      results.append(None)
      continue
    preds = {k: np.concatenate([o[k][i] for o in host])[keep] for k in host[0] if k != 'mask'}
    metrics = regression_metrics(preds['pred'], preds['label'])
    metrics['Loss'] = float(np.mean(np.abs(preds['pred'] - preds['label']), dtype=np.float64))
    results.append((metrics, preds))
  return results
