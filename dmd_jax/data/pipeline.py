"""Input pipeline: a prepared MMSA dataset (data_prep) -> per-process batches, with grain.

Where a setting's prepared dataset lives: `dmd_jax.schema.dataset_path(data_dir, dataset, aligned)`;
`open_dataset(data_dir, dataset, aligned)` opens its splits.

    loader = Loader(open_split(path, 'train'), global_batch_size=16, train=True, seed=1111)
    for epoch in range(n_epochs):
      for batch in loader.epoch(epoch):   # epoch e's batches: a function of (seed, e) alone
        ...       # batch: text (b,3,50) audio vision labels (b,1) mask index

A loader holds no position: epoch e's batches depend only on the loader's seed, the split's
size, the global batch and e, so a run resumed after epoch e reads epoch e + 1 as an uninterrupted
one does (training keeps those numbers in its checkpoints and compares them at resume). Each
epoch has one global order of sample indices, the same for every process: a seeded
permutation for training (the last partial batch is dropped, as the reference never steps on it)
or the file order for evaluation (the last batch padded; `mask` is 0 on padding, so each sample
counts exactly once). Global batch k is positions [k*B, (k+1)*B) of that order; process p of P
reads only its block [k*B + p*B/P, k*B + (p+1)*B/P) of it. The global batches therefore do not
depend on how many processes share the work. The training steps assemble the processes' blocks
into one array sharded over their mesh's 'data' axis (`dmd_jax.training.train.RunSteps.put`).
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from dmd_jax.schema import FILE_NAMES, RECORD_KEYS, SPLITS, dataset_path

Batch = dict[str, np.ndarray]


def is_prepared(path: str | os.PathLike) -> bool:
  """Whether a prepared dataset (its TFDS dataset_info.json) is at `path`."""
  return os.path.isfile(os.path.join(os.path.expanduser(os.fspath(path)), 'dataset_info.json'))


def open_dataset(data_dir: str | os.PathLike, dataset: str, aligned: bool
                 ) -> tuple[str, dict[str, Any]]:
  """(path, every split as a random-access source) of a setting's prepared dataset in
  `data_dir` (where data_prep.mmsa writes it); a missing one is named with the command that
  prepares it."""
  path = dataset_path(data_dir, dataset, aligned)
  if not is_prepared(path):
    raise FileNotFoundError(
        f'no prepared {dataset} dataset at {path}; prepare it once with `python -m '
        f'data_prep.mmsa --dataset={dataset} --aligned={str(bool(aligned)).lower()} '
        f'--pickle=/path/to/{dataset.upper()}/Processed/{FILE_NAMES[bool(aligned)]} '
        f'--data_dir={data_dir}`')
  return path, {split: open_split(path, split) for split in SPLITS}


def open_split(path: str | os.PathLike, split: str):
  """Random-access source of one split of a prepared dataset directory (array_record shards)."""
  path = os.path.expanduser(os.fspath(path))
  if not is_prepared(path):
    raise FileNotFoundError(
        f'{path} is not a prepared dataset (no dataset_info.json); create it with '
        'python -m data_prep.mmsa --dataset=... --aligned=... --pickle=... --data_dir=DIR and '
        'pass DIR/mmsa/<dataset>_<alignment>/1.0.0')
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise KeyError(f'{path} has no split {split!r}; it has {sorted(builder.info.splits)}')
  if builder.info.file_format.value != 'array_record':
    raise ValueError(f'{path} is stored as {builder.info.file_format.value}; the grain pipeline '
                     "needs random access: prepare it with --file_format=array_record")
  return builder.as_data_source(split=split)


class Loader:
  """Deterministic batches of one split for this JAX process, epoch by epoch."""

  def __init__(self, source: Sequence[Mapping[str, Any]], global_batch_size: int, *,
               train: bool, seed: int = 0, process_index: int | None = None,
               process_count: int | None = None, device_count: int | None = None,
               num_threads: int = 4, prefetch: int = 4):
    self.source = source
    self.train = bool(train)
    self.seed = int(seed)
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    devices = jax.device_count() if device_count is None else int(device_count)
    if global_batch_size < 1 or global_batch_size % devices:
      raise ValueError(f'global batch size {global_batch_size} must be a positive multiple of '
                       f'the device count ({devices}); change config.batch_size')
    if global_batch_size % self.process_count:
      raise ValueError(f'global batch size {global_batch_size} must divide evenly over '
                       f'{self.process_count} processes')
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f'process_index {self.process_index} outside [0, {self.process_count})')
    self.global_batch_size = int(global_batch_size)
    self.local_batch_size = self.global_batch_size // self.process_count
    self.num_examples = len(source)
    if self.train:
      self.num_batches = self.num_examples // self.global_batch_size
      if self.num_batches == 0:
        raise ValueError(f'training split has {self.num_examples} examples, fewer than one '
                         f'global batch of {self.global_batch_size}')
    else:
      self.num_batches = -(-self.num_examples // self.global_batch_size)
    self._read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    self._zeros = None

  # -- the order --------------------------------------------------------------------------------
  def global_order(self, epoch: int) -> np.ndarray:
    """(num_batches, global_batch_size) sample indices of an epoch; -1 marks padding."""
    n, size = self.num_examples, self.num_batches * self.global_batch_size
    if self.train:
      order = np.random.default_rng([self.seed, epoch]).permutation(n)[:size]
    else:
      order = np.arange(size)
      order[order >= n] = -1
    return order.reshape(self.num_batches, self.global_batch_size)

  def local_order(self, epoch: int) -> np.ndarray:
    """(num_batches, local_batch_size): this process's block of every global batch."""
    b = self.local_batch_size
    return self.global_order(epoch)[:, self.process_index * b:(self.process_index + 1) * b]

  # -- reading ----------------------------------------------------------------------------------
  def _read(self, indices: np.ndarray) -> Batch:
    real = indices >= 0
    wanted = indices[real].tolist()           # only this process's own samples are read
    getitems = getattr(self.source, '__getitems__', None)
    records = list(getitems(wanted) if getitems else [self.source[i] for i in wanted])
    if not records:                            # a block made only of padding
      records = [self._zero_record()]
    slot = np.cumsum(real) - 1                 # position of each real sample among `records`

    def stack(key, dtype):
      x = np.stack([np.asarray(r[key], dtype) for r in records])[np.maximum(slot, 0)]
      return np.where(real.reshape((-1,) + (1,) * (x.ndim - 1)), x, dtype(0))  # zero padding

    return {'text': stack('text_bert', np.float32), 'audio': stack('audio', np.float32),
            'vision': stack('vision', np.float32), 'labels': stack('label', np.float32)[:, None],
            'mask': real.astype(np.float32), 'index': indices.astype(np.int32)}

  def _zero_record(self) -> dict[str, np.ndarray]:
    if self._zeros is None:
      self._zeros = {k: np.zeros_like(np.asarray(v)) for k, v in self.source[0].items()
                     if k in RECORD_KEYS}
    return self._zeros

  def epoch_dataset(self, epoch: int) -> grain.MapDataset:
    """An epoch's local batches as a grain MapDataset (random access: `ds[k]` is batch k)."""
    return grain.MapDataset.source(self.local_order(epoch)).map(self._read)

  def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
    """Batches `start`, `start`+1, ... of `epoch`, read ahead by grain threads."""
    ds = self.epoch_dataset(epoch)[start:]
    return iter(ds.to_iter_dataset(self._read_options))

  def __len__(self) -> int:
    return self.num_batches
