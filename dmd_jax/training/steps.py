"""The jitted steps of training and evaluation, data-parallel over a device mesh: parameters
replicated, batches split on the mesh's 'data' axis (jit over the mesh; the modern form of a
pmapped step), and `evaluate`, which runs a whole split through the eval step."""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dmd_jax.analysis.metrics import regression_metrics
from dmd_jax.config import DMDConfig
from dmd_jax.data.pipeline import Loader, global_batch
from dmd_jax.model import compiler_options, forward
from dmd_jax.schema import BATCH_KEYS, EVAL_KEYS, UNITS
from dmd_jax.training import optim
from dmd_jax.training.state import train_step


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), ('data',))


class Steps:
  """The train and eval steps, each jitted once over `mesh` (params replicated, batch split)."""

  def __init__(self, cfg: DMDConfig, mesh: Mesh):
    self.mesh = mesh
    self.replicated = NamedSharding(mesh, P())
    self.split = NamedSharding(mesh, P('data'))
    train = functools.partial(train_step, config=cfg, train=True)
    self.train = jax.jit(train, in_shardings=(self.replicated, self.split, self.replicated),
                         out_shardings=(self.replicated, self.replicated), donate_argnums=(0,),
                         compiler_options=compiler_options())

    def evaluate(params, batch):
      out = forward(params, batch, cfg, train=False)
      res = {'pred': out['output_logit'].reshape(-1), 'label': batch['labels'].reshape(-1),
             'mask': batch['mask'], 'index': batch['index'],
             **{u: out[f'edges_{u}'] for u in UNITS}}
      if cfg.dhmd:       # dictionary activations (B, 3, K) per space
        res.update({f'dict_{u}': out[f'dict_act_{u}'] for u in UNITS})
      return res

    self.eval = jax.jit(evaluate, in_shardings=(self.replicated, self.split),
                        out_shardings=self.replicated, compiler_options=compiler_options())

    def reset_window(state):
      return state.replace(opt_state=optim.reset_window(state.opt_state))

    def set_lr(state, lr):
      return state.replace(opt_state=optim.set_learning_rate(state.opt_state, lr))

    # Host-side edits of the state as jitted functions with the step's shardings: no transfer,
    # no recompilation of the train step, and valid across processes.
    self.reset_window = jax.jit(reset_window, out_shardings=self.replicated, donate_argnums=(0,))
    self.set_lr = jax.jit(set_lr, out_shardings=self.replicated, donate_argnums=(0,))
    self.key = jax.jit(jax.random.key, out_shardings=self.replicated)

  def replicate(self, tree):
    """Host values (or single-device arrays, the same on every process) onto the mesh."""
    return jax.device_put(jax.device_get(tree), self.replicated)

  def put(self, batch: Mapping[str, np.ndarray], keys=BATCH_KEYS) -> dict[str, jax.Array]:
    return global_batch({k: batch[k] for k in keys}, self.mesh)


def evaluate(steps: Steps, params, loader: Loader) -> tuple[dict, dict]:
  """Metrics over every sample of a split (padding masked out) and the predictions; every
  process gets the same numbers (the eval outputs are replicated).

  'Loss' is the mean L1 over all samples; the reference averages per-batch means (its last,
  smaller batch weighs more) and rounds to 4 places."""
  outs = [steps.eval(params, steps.put(batch, EVAL_KEYS)) for batch in loader.epoch(0)]
  host = jax.device_get(outs)
  cat = {k: np.concatenate([o[k] for o in host]) for k in host[0]}
  keep = cat.pop('mask') > 0
  preds = {k: v[keep] for k, v in cat.items()}
  metrics = regression_metrics(preds['pred'], preds['label'])
  metrics['Loss'] = float(np.mean(np.abs(preds['pred'] - preds['label']), dtype=np.float64))
  return metrics, preds
