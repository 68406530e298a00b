"""The jitted steps of training and evaluation for a group of members (seeds, or sweep members)
trained together: every state carries a leading member axis, the train step is the single-member
step vmapped over it, and the device mesh has two axes, 'seed' (members spread over devices) and
'data' (each member's batch split over devices; jit over the mesh, the modern form of a pmapped
step). A group of one member is the plain data-parallel run.

Where the member state lives (`layout`): 'replicated' keeps each member's parameters, Adam moments
and accumulators whole on every device of its seed group (the data-parallel layout); 'fsdp'
shards each large leaf of the state over the group's 'data' devices (along its largest dimension
that the data axis divides; XLA gathers what a layer needs), which is what lets five seeds fit a
v5e-8, where gcd(5, 8) = 1 puts all five members on every chip (docs/tpu.md). Both compute the
same function; 'auto' (`choose_layout`) keeps 'replicated' on CPU and wherever the replicated
state takes at most a quarter of a chip's memory.

The platform of the mesh's devices decides every implementation choice of the programs
(`dmd_jax.model.target`), never the host's default backend.

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
from dmd_jax.model.target import devices_platform, family
from dmd_jax.schema import BATCH_KEYS, EVAL_KEYS, UNITS
from dmd_jax.training import optim
from dmd_jax.training.state import train_step

PyTree = Any


def seed_axis_size(members: int, devices: int, processes: int = 1) -> int:
  """How many device groups the members spread over: the largest count that divides both the
  members and the devices; 1 across several processes (each process then reads its block of
  every member's batch, see dmd_jax.data.pipeline)."""
  return 1 if processes > 1 else math.gcd(members, devices)


def group_mesh(devices, members: int) -> Mesh:
  """The ('seed', 'data') mesh a group of `members` trains on over `devices` (all of a run's
  devices, every process's): the seed axis as `seed_axis_size` gives it for those devices'
  process count. Training and the ahead-of-time compile (dmd_jax.training.aot) both use it."""
  devices = np.asarray(devices)
  processes = len({d.process_index for d in devices.flat})
  return make_mesh(devices, seed_axis_size(members, devices.size, processes))


def make_mesh(devices=None, seed_axis: int = 1) -> Mesh:
  """A ('seed', 'data') mesh of `devices` (default: all) with `seed_axis` device groups."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  if devices.size % seed_axis:
    raise ValueError(f'{devices.size} devices do not split into {seed_axis} seed groups')
  return Mesh(devices.reshape(seed_axis, -1), ('seed', 'data'))


LAYOUTS = ('auto', 'replicated', 'fsdp')
# leaves below this many elements per member stay whole under 'fsdp' (biases, LayerNorms, the
# MulT's small matrices): sharding them saves little and costs a gather each
FSDP_MIN_ELEMENTS = 2 ** 14


def member_spec(shape: Sequence[int], layout: str, data: int) -> P:
  """The PartitionSpec of a state leaf of `shape` (leading member axis) under `layout`, on a
  mesh whose 'data' axis has `data` devices."""
  large = len(shape) > 1 and math.prod(shape[1:]) >= FSDP_MIN_ELEMENTS
  if layout == 'fsdp' and data > 1 and large:
    fits = [i for i in range(1, len(shape)) if shape[i] % data == 0]
    if fits:
      dim = max(fits, key=lambda i: (shape[i], -i))
      return P('seed', *([None] * (dim - 1)), 'data')
  return P('seed')


def state_bytes(tree: PyTree) -> int:
  """Bytes of a (stacked or single) state tree, from shapes alone."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)
             if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))


def device_memory(device) -> Optional[int]:
  """A device's memory in bytes as its runtime reports it (None where it does not: CPUs)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  return (stats or {}).get('bytes_limit')


def choose_layout(layout: str, mesh: Mesh, member_bytes: int, members: int,
                  device_bytes: Optional[int]) -> str:
  """The member-state layout of a group: `layout` unless 'auto'. 'auto' -> 'fsdp' where the
  replicated state (members / seed groups members of `member_bytes` each on every device)
  would take more than a quarter of a device's `device_bytes` (the rest is left for activations,
  gradients and the optimizer's temporaries) on a mesh with more than one data device; else
  'replicated'. CPUs (no device memory limit) keep 'replicated'."""
  if layout not in LAYOUTS:
    raise ValueError(f'state layout must be one of {LAYOUTS}, got {layout!r}')
  if layout != 'auto':
    return layout
  platform = devices_platform(mesh.devices.flat)
  if platform == 'cpu' or mesh.shape['data'] == 1 or not device_bytes:
    return 'replicated'
  per_device = member_bytes * (members // mesh.shape['seed'])
  return 'fsdp' if per_device > device_bytes / 4 else 'replicated'


def stack(trees: Sequence[PyTree]) -> PyTree:
  """Member trees -> one tree with a leading member axis."""
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def member(tree: PyTree, i: int) -> PyTree:
  """Member `i` of a stacked tree."""
  return jax.tree.map(lambda x: x[i], tree)


def check_platform(cfg: DMDConfig, platform: str) -> DMDConfig:
  """`cfg`, when its implementation choices are made for `platform` (the devices a program is
  compiled for; 'auto' means this process's default backend, as `target.platform_of` reads it);
  else a named error. A run's config is made for its devices by `run_config.model(run, devices)`
  (`config.from_run_config(run, bert, platform)` underneath)."""
  made_for = cfg.attention.platform
  if made_for == 'auto':
    made_for = family(jax.default_backend())
  if made_for != platform:
    raise ValueError(
        f"the model config is made for {made_for} (attention.platform="
        f"{cfg.attention.platform!r}) but these steps compile for {platform} devices: make it "
        f"for them (run_config.model(run, devices), or from_run_config(..., platform="
        f"'{platform}'))")
  return cfg


class Steps:
  """The group's train and eval steps, each jitted once over `mesh`, with the member state in
  `layout` ('replicated' or 'fsdp', see above). `cfg` must be made for the mesh's platform
  (`check_platform`)."""

  def __init__(self, cfg: DMDConfig, mesh: Mesh, layout: str = 'replicated'):
    if layout not in LAYOUTS[1:]:
      raise ValueError(f"Steps: layout must be 'replicated' or 'fsdp', got {layout!r}")
    self.mesh, self.layout = mesh, layout
    self.platform = devices_platform(mesh.devices.flat)
    cfg = self.config = check_platform(cfg, self.platform)
    options = compiler_options(self.platform)
    self.replicated = NamedSharding(mesh, P())
    self.members = NamedSharding(mesh, P('seed'))          # leading member axis
    self.batches = NamedSharding(mesh, P('seed', 'data'))  # (member, sample, ...)
    self.shared = NamedSharding(mesh, P('data'))           # one batch for every member (eval)
    one = functools.partial(train_step, config=cfg, train=True)
    # how often each step was traced (each trace is one compilation, or one load from the
    # persistent compilation cache): 1 per input shape
    self.traces = {'train': 0, 'eval': 0}
    place = self.constrain

    def train(state, batch, rng, active):
      self.traces['train'] += 1
      new, metrics = jax.vmap(one)(place(state), batch, rng)
      # a finished member stops changing
      keep = lambda n, o: jnp.where(active.reshape(active.shape + (1,) * (n.ndim - 1)), n, o)
      return place(jax.tree.map(keep, new, state)), metrics

    # The state's shardings follow the inputs (placed by put_members) and are pinned inside by
    # `constrain`, so one jit serves any state structure (optimizer, sweep weights) and layout.
    self.train = jax.jit(train, in_shardings=(None, self.batches, self.members, self.members),
                         out_shardings=(None, self.replicated), donate_argnums=(0,),
                         compiler_options=options)

    def evaluate(params, batch):
      self.traces['eval'] += 1
      out = forward(params, batch, cfg, train=False)
      res = {'pred': out['output_logit'].reshape(-1), 'label': batch['labels'].reshape(-1),
             'mask': batch['mask'], 'index': batch['index'],
             **{u: out[f'edges_{u}'] for u in UNITS}}
      if cfg.dhmd:       # dictionary activations (B, 3, K) per space
        res.update({f'dict_{u}': out[f'dict_act_{u}'] for u in UNITS})
      return res

    self.eval = jax.jit(lambda params, batch: jax.vmap(evaluate, in_axes=(0, None))(
        place(params), batch), in_shardings=(None, self.shared), out_shardings=self.replicated,
        compiler_options=options)

    def reset_window(state):
      return place(state.replace(opt_state=optim.reset_window(state.opt_state)))

    def set_lr(state, lrs):
      return place(state.replace(opt_state=optim.set_learning_rate(state.opt_state, lrs)))

    def keep_best(best, params, improved):
      pick = lambda n, o: jnp.where(improved.reshape(improved.shape + (1,) * (n.ndim - 1)), n, o)
      return place(jax.tree.map(pick, params, best))

    # Host-side edits of the state as jitted functions with the step's shardings: no transfer,
    # no recompilation of the train step, and valid across processes.
    self.reset_window = jax.jit(reset_window, donate_argnums=(0,))
    self.set_lr = jax.jit(set_lr, donate_argnums=(0,))
    self.keep_best = jax.jit(keep_best, donate_argnums=(0,))
    self.keys = jax.jit(jax.vmap(jax.random.key), out_shardings=self.members)
    # one member's copy on every device (one compile per tree structure): what a checkpoint
    # stores, fetched to the host in one transfer (orbax would slice each device's shard of
    # every leaf op by op, ~15 s of small compiles in a fresh process)
    self._take = jax.jit(lambda tree, i: jax.tree.map(lambda x: x[i], tree),
                         out_shardings=self.replicated)

  def sharding(self, tree: PyTree) -> PyTree:
    """The NamedSharding of every leaf of a stacked member tree (arrays or ShapeDtypeStructs)."""
    data = self.mesh.shape['data']

    def spec(x):
      # mesh axes of size 1 written as None (trailing ones dropped): the form XLA hands outputs
      # back in, so the state's sharding is equal before and after a step and the train step
      # compiles once, not a second time for its own output
      axes = [a if a is not None and self.mesh.shape[a] > 1 else None
              for a in member_spec(x.shape, self.layout, data)]
      while axes and axes[-1] is None:
        axes.pop()
      return NamedSharding(self.mesh, P(*axes))
    return jax.tree.map(spec, tree)

  def constrain(self, tree: PyTree) -> PyTree:
    """`tree` (inside a jitted function) pinned to the layout's shardings."""
    return jax.lax.with_sharding_constraint(tree, self.sharding(tree))

  def host_member(self, tree: PyTree, i: int) -> PyTree:
    """Member `i` of a stacked device tree as numpy arrays (the same on every process)."""
    return jax.device_get(self._take(tree, np.int32(i)))

  def put_members(self, tree):
    """A stacked host tree (or arrays the same on every process) onto the mesh, in the layout."""
    tree = jax.device_get(tree)
    return jax.device_put(tree, self.sharding(tree))

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
