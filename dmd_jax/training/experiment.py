"""A whole experiment from a run config: data, text encoder, every seed, the results table;
evaluation and edge export of a trained run.

Used by `python -m dmd_jax.main` and `python -m dmd_jax.export_edges`; everything here is plain
functions of the run config (`configs/*.py`) and a workdir.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
from typing import Any, Mapping

import jax
from jax.sharding import Mesh
import numpy as np

from dmd_jax import schema
from dmd_jax.analysis import edges
from dmd_jax.analysis.metrics import METRIC_NAMES
from dmd_jax.provenance import git_commit
from dmd_jax.training import checkpoints
from dmd_jax.training.group import train_group
from dmd_jax.training.inputs import constant_baseline, open_data
from dmd_jax.training.outputs import write_json, write_predictions, write_text
from dmd_jax.training.run_config import (check_run_folder, model, setup_compile_cache,
                                         validate_run)
from dmd_jax.training.train import Member, cached_run_steps, evaluate, train_run



def sweep_members(run) -> list[tuple[str, dict]]:
  """(folder, hyper-parameters) of every member of `run.sweep` (the grid of its lists); one
  member with no folder and no overrides without a sweep."""
  sweep = {k: tuple(v) for k, v in (run.get('sweep') or {}).items() if v}
  if not sweep:
    return [('', {})]
  keys = sorted(sweep)
  return [(','.join(f'{k}={v:g}' for k, v in zip(keys, combo)),
           {k: float(v) for k, v in zip(keys, combo)})
          for combo in itertools.product(*(tuple(sweep[k]) for k in keys))]


def groups(run, workdir: str) -> list[list[Member]]:
  """Every (sweep member, seed) as a `Member`, cut into the groups that train together: all in
  one (`seed_mode='together'`, at most `seeds_per_program` per group when set), or one at a time
  (`seed_mode='sequential'`)."""
  members = [Member(seed, os.path.join(workdir, folder, f'seed_{seed}'), hparams)
             for folder, hparams in sweep_members(run) for seed in run.seeds]
  size = 1 if run.seed_mode == 'sequential' else (run.seeds_per_program or len(members))
  return [members[i:i + size] for i in range(0, len(members), size)]


def run_training(run, workdir: str, *, progress: bool = True, log=print) -> dict[str, Any]:
  """Every seed (and sweep member) of `run`, resuming whatever an interrupted run left in
  `workdir`; then the results table as results.{csv,json,md} (per sweep member, in its folder,
  plus sweep.{md,json} comparing the members)."""
  validate_run(run)
  for note in check_run_folder(run, workdir):
    log(f'note: {note} (stored -> this command; does not change results)')
  setup_compile_cache(run)
  data = open_data(run)
  baseline = constant_baseline(data)        # what every model must beat
  cfg, init = model(run)
  # The config that decides this run's results, written once its data and text encoder are
  # found: what `python -m dmd_jax.export_edges --workdir`, bundles and later commands read back.
  if not os.path.isfile(os.path.join(workdir, 'config.json')):
    write_text(os.path.join(workdir, 'config.json'), run.to_json_best_effort(indent=1))
  todo = groups(run, workdir)
  log(f'{run.dataset} {"aligned" if run.aligned else "unaligned"} from {data.path}; '
      f'{jax.device_count()} device(s) in {jax.process_count()} process(es); '
      f'global batch {run.batch_size}; seeds {list(run.seeds)}; '
      f'{sum(map(len, todo))} run(s) in {len(todo)} program(s); constant prediction (train '
      f"mean {baseline['train_mean']:.4f}): test MAE {baseline['test_MAE']:.4f}")
  results = {}
  for group in todo:
    if len(group) == 1 and run.get('state_layout', 'auto') != 'fsdp':
      rows = [train_run(run, cfg, init, group[0], data, progress=progress, log=log)]
    else:      # seeds together, sweeps, and a sharded member state: one vmapped program
      rows = train_group(run, cfg, init, group, data, progress=progress, log=log)
    results.update({m.workdir: row for m, row in zip(group, rows)})
  commit = git_commit()
  tables = {}
  for folder, _ in sweep_members(run):
    rows = [results[os.path.join(workdir, folder, f'seed_{seed}')] for seed in run.seeds]
    table = results_table(rows, run.dataset, run.aligned, commit)
    table['baseline'] = baseline
    write_table(table, os.path.join(workdir, folder))
    tables[folder] = table
  if len(tables) > 1:
    write_sweep_table(tables, workdir)
  return tables[''] if '' in tables else {'sweep': tables}


def results_table(rows, dataset: str, aligned: bool, commit: str) -> dict[str, Any]:
  names = list(METRIC_NAMES) + ['Loss']
  per_seed = [{'dataset': dataset, 'aligned': aligned, 'commit': commit, 'seed': r['seed'],
               'best_epoch': r['best_epoch'], **{m: r['test'][m] for m in names}} for r in rows]
  values = {m: np.array([r['test'][m] for r in rows], np.float64) for m in names}
  summary = {m: {'mean': float(np.mean(v)), 'std': float(np.std(v))} for m, v in values.items()}
  return {'dataset': dataset, 'aligned': aligned, 'commit': commit, 'split': 'test',
          'metrics': names, 'seeds': per_seed, 'mean_std': summary}


def write_sweep_table(tables: Mapping[str, Mapping[str, Any]], workdir: str) -> None:
  """sweep.{md,json}: per member, the mean ± std over seeds of the main test metrics."""
  names = ('Non0_acc_2', 'Non0_F1_score', 'Mult_acc_7', 'MAE', 'Corr')
  md = ['| member | seeds | ' + ' | '.join(names) + ' |', '|' + '---|' * (len(names) + 2)]
  for folder, t in tables.items():
    ms = t['mean_std']
    md.append(f"| {folder} | {len(t['seeds'])} | " + ' | '.join(
        f"{ms[m]['mean']:.4f} ± {ms[m]['std']:.4f}" for m in names) + ' |')
  write_text(os.path.join(workdir, 'sweep.md'), '\n'.join(md) + '\n')
  write_json(os.path.join(workdir, 'sweep.json'),
             {folder: t['mean_std'] for folder, t in tables.items()})


def write_table(table: Mapping[str, Any], workdir: str) -> None:
  names = table['metrics']
  head = ['dataset', 'aligned', 'commit', 'seed', 'best_epoch'] + names
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(head)
  for r in table['seeds']:
    w.writerow([r[k] for k in head])
  mean = table['mean_std']
  base = [table['dataset'], table['aligned'], table['commit']]
  w.writerow(base + ['mean', ''] + [f"{mean[m]['mean']:.4f}" for m in names])
  w.writerow(base + ['std', ''] + [f"{mean[m]['std']:.4f}" for m in names])
  md = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in table['seeds']:
    md.append('| ' + ' | '.join(f'{r[k]:.4f}' if isinstance(r[k], float) else str(r[k])
                                for k in head) + ' |')
  md.append('| ' + ' | '.join(map(str, base)) + ' | mean ± std | | ' + ' | '.join(
      f"{mean[m]['mean']:.4f} ± {mean[m]['std']:.4f}" for m in names) + ' |')
  if 'baseline' in table:
    b = table['baseline']
    md.append(f"\nConstant prediction (training mean {b['train_mean']:.4f}): test MAE "
              f"{b['test_MAE']:.4f}.")
  for name, text in (('results.csv', buf.getvalue()),
                     ('results.json', json.dumps(table, indent=1)),
                     ('results.md', '\n'.join(md) + '\n')):
    write_text(os.path.join(workdir, name), text)


def _split_from_checkpoint(run, workdir: str, split: str, seed: int, checkpoint: str):
  """(cfg, steps, params on the mesh, eval loader of `split`, data, checkpoint dir) for a trained
  run's checkpoint: `checkpoint`, else the best params of `seed` in `workdir`."""
  if split not in schema.SPLITS:
    raise ValueError(f'split must be one of {schema.SPLITS}, got {split!r}')
  setup_compile_cache(run)
  data = open_data(run)
  cfg, init = model(run)
  ckpt = checkpoint or os.path.join(workdir, f'seed_{seed}', 'best')
  if not os.path.isdir(ckpt):
    raise FileNotFoundError(f'checkpoint not found: {ckpt} (set --config.checkpoint=DIR, or '
                            'train first)')
  # a training run's own steps, when it ran in this process
  steps = cached_run_steps(cfg, Mesh(np.asarray(jax.devices()), ('data',)))
  params = jax.device_put(checkpoints.restore_any(ckpt, jax.eval_shape(init, 0)),
                          steps.replicated)
  # every sample of the split once, in file order (for 'train' too)
  return cfg, steps, params, data.eval_loader(split), data, ckpt


def run_eval(run, workdir: str, *, log=print) -> dict[str, Any]:
  """Metrics and a predictions CSV for `run.eval_split` from `run.checkpoint` (a params
  checkpoint dir: a seed's `best/`, or one written by `python -m dmd_jax.import_reference`),
  by default the best params of the first seed in `workdir`."""
  validate_run(run)
  split = run.eval_split
  _, steps, params, loader, data, ckpt = _split_from_checkpoint(run, workdir, split,
                                                                run.seeds[0], run.checkpoint)
  metrics, preds = evaluate(steps, params, loader)
  out = os.path.join(workdir, f'eval_{split}')
  write_predictions(out + '_predictions.csv', preds, data.ids(split, preds['index']))
  write_json(out + '_metrics.json', {'checkpoint': os.path.abspath(ckpt), 'split': split,
                                     **metrics})
  log(f'{split} from {ckpt}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
  return metrics


def _best_epoch(workdir: str, seed: int) -> str:
  path = os.path.join(workdir, f'seed_{seed}', 'result.json')
  if not os.path.isfile(path):
    return ''
  with open(path) as f:
    return f", epoch {json.load(f).get('best_epoch')}"


def export_edges(run, workdir: str, split: str = 'test', seed: int | None = None,
                 checkpoint: str = '', log=print) -> dict[str, Any]:
  """Per-sample edges of a split from a checkpoint (default: the best params of `seed`, the
  run's first seed by default), with aggregates and heatmaps, into WORKDIR/edges/."""
  seed = run.seeds[0] if seed is None else seed
  cfg, steps, params, loader, data, _ = _split_from_checkpoint(run, workdir, split, seed,
                                                               checkpoint)
  _, per_sample = evaluate(steps, params, loader)
  out = edges.write_export(os.path.join(workdir, 'edges'), per_sample,
                           data.ids(split, per_sample['index']), cfg, split,
                           title=f'checkpoint {checkpoint}' if checkpoint else
                           f"seed {seed}'s best parameters{_best_epoch(workdir, seed)}")
  for u in edges.UNITS:
    v = edges.edge_vector(np.asarray(out['stats'][u]['mean']))
    log(f'{u}: ' + ', '.join(f'{e} {x:.3f}' for e, x in zip(edges.EDGE_LABELS, v)))
  log(f"wrote {out['npz']}, {out['summary']} and {', '.join(out['figures'])}")
  return out
