"""TFDS builder for the MMSA pickles of CMU-MOSI / CMU-MOSEI, and `prepare`, which runs it safely.

    from dmd_jax.data.builder import prepare
    prepare('MOSI/Processed/unaligned_50.pkl', 'mosi', aligned=False, data_dir='~/tfds')
    # -> ~/tfds/mmsa/mosi_unaligned/1.0.0/{mmsa-train.array_record-00000-of-00001, ...}

The dataset is read back with `tfds.builder_from_directory(path)` (no import of this module
needed), e.g. by `dmd_jax.data.pipeline`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle

from dmd_jax.data import mmsa_format
from dmd_jax import lock, schema
from dmd_jax.data.mmsa_format import MmsaSource

FILE_FORMATS = ('array_record', 'tfrecord')
VERSION = schema.DATASET_VERSION
# Examples are keyed in file order and spread over TFDS's 128-bit key space, so with shuffling
# disabled the splits keep the pickle's order and, once TFDS spills to disk, each of its 1000
# sort buckets holds a thousandth of a split instead of all of it.
_KEY_SPACE = 2 ** 128
# TFDS keeps up to 1 GB of serialised examples in memory before spilling; with the whole pickle
# already in memory that would be a second copy of much of it.
_SPILL_BYTES = 64 << 20

_CITATION = """\
@inproceedings{li2023decoupled,
  title={Decoupled Multimodal Distilling for Emotion Recognition},
  author={Li, Yong and Wang, Yuanzhi and Cui, Zhen},
  booktitle={CVPR}, year={2023}}"""


class MmsaConfig(tfds.core.BuilderConfig):
  """One dataset x alignment setting."""

  def __init__(self, *, dataset: str, aligned: bool, **kwargs):
    super().__init__(name=mmsa_format.setting_name(dataset, aligned), version=VERSION,
                     description=f"{dataset.upper()} ({'word-aligned' if aligned else 'unaligned'}"
                                 f", MMSA '{mmsa_format.FILE_NAMES[aligned]}')", **kwargs)
    self.dataset = dataset
    self.aligned = aligned


class Mmsa(tfds.core.GeneratorBasedBuilder):
  """CMU-MOSI / CMU-MOSEI features from an MMSA pickle (BERT ids, acoustic, visual, score)."""

  VERSION = tfds.core.Version(VERSION)
  BUILDER_CONFIGS = [MmsaConfig(dataset=d, aligned=a)
                     for d in mmsa_format.DATASETS for a in (True, False)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = ('Give the MMSA pickle to data_prep.prepare(...) or '
                                  'python -m data_prep.mmsa --pickle=PATH.')

  def __init__(self, *, source: MmsaSource | None = None, **kwargs):
    self._source = source
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    shapes = mmsa_format.expected_shapes(cfg.dataset, cfg.aligned)
    bytes_enc = tfds.features.Encoding.BYTES
    feats = {
        'text_bert': tfds.features.Tensor(shape=shapes['text_bert'], dtype=np.int32,
                                          doc='rows: word-piece ids, attention mask, segment ids'),
        'audio': tfds.features.Tensor(shape=shapes['audio'], dtype=np.float32,
                                      encoding=bytes_enc, doc='acoustic features (-inf -> 0)'),
        'vision': tfds.features.Tensor(shape=shapes['vision'], dtype=np.float32,
                                       encoding=bytes_enc, doc='visual features'),
        'label': tfds.features.Scalar(dtype=np.float32, doc='sentiment score in [-3, 3]'),
        'id': tfds.features.Text(doc='"videoID$_$clipID"'),
        'raw_text': tfds.features.Text(doc='transcript'),
    }
    with_lengths = (self._source.has_lengths if self._source is not None else not cfg.aligned)
    if with_lengths:
      feats['audio_length'] = tfds.features.Scalar(dtype=np.int32, doc='valid audio frames')
      feats['vision_length'] = tfds.features.Scalar(dtype=np.int32, doc='valid video frames')
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(feats),
        supervised_keys=None,
        homepage='https://github.com/thuiar/MMSA',
        citation=_CITATION,
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the pickle is local; nothing to download
    src = self._source
    if src is None:
      raise ValueError('Mmsa needs the loaded pickle: build it with data_prep.prepare(...) or '
                       'python -m data_prep.mmsa --pickle=PATH')
    md = self.info.metadata
    md['source_file'] = os.path.basename(src.path)
    md['source_sha256'] = src.sha256
    md['sha256_matches_mmsa'] = src.hash_matches
    md['nonfinite'] = src.nonfinite
    md['nonfinite_counts'] = src.nonfinite_counts
    md['num_examples'] = src.num_examples()
    return {split: self._generate_examples(split) for split in mmsa_format.SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    n = self._source.num_examples()[split]
    step = _KEY_SPACE // n
    for i in range(n):
      yield i * step, self._source.example(split, i)
    self._source.release(split)


class _LocalBucket(tfds_shuffle._Bucket):  # pylint: disable=protected-access
  """TFDS's spill bucket on plain local files, without TensorFlow.

  TFDS writes a split that outgrows its memory buffer into 1000 bucket files through
  `tf.io.gfile`, so without TensorFlow a large split failed with `ModuleNotFoundError:
  tensorflow`. Same records (16-byte key, 8-byte size, data) and the same order; the file is
  opened per record in append mode, so 1000 buckets hold no open files (records are whole
  examples, 10-300 kB each, so the open is negligible)."""

  def add(self, key, data: bytes):
    os.makedirs(os.path.dirname(self._path), exist_ok=True)
    with open(self._path, 'ab') as f:
      f.write(tfds_shuffle._hkey_to_bytes(key))  # pylint: disable=protected-access
      f.write(struct.pack('=Q', len(data)))
      f.write(data)
    self._length += 1
    self._size += len(data)

  def flush(self):
    pass

  def read_values(self):
    if not os.path.exists(self._path):
      return
    with open(self._path, 'rb') as f:
      while head := f.read(tfds_shuffle.HKEY_SIZE_BYTES):
        size = struct.unpack('=Q', f.read(8))[0]
        yield tfds_shuffle._read_hkey(head), f.read(size)  # pylint: disable=protected-access

  def del_file(self):
    if os.path.exists(self._path):
      os.remove(self._path)


@contextlib.contextmanager
def _local_spill(nbytes: int):
  """While building: spill to disk beyond `nbytes` of a split, through `_LocalBucket`."""
  old = tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle._Bucket  # pylint: disable=protected-access
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(old[0], nbytes)
  tfds_shuffle._Bucket = _LocalBucket  # pylint: disable=protected-access
  try:
    yield
  finally:
    tfds_shuffle.MAX_MEM_BUFFER_SIZE, tfds_shuffle._Bucket = old  # pylint: disable=protected-access


def require_tensorflow() -> None:
  try:
    import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ImportError(
        "file_format='tfrecord' needs TensorFlow, which is not installed: "
        "pip install tensorflow-cpu (or pip install 'dmd_jax[tfrecord]'); the default "
        "file_format='array_record' needs no TensorFlow") from e


def prepare(pickle_path: str | os.PathLike, dataset: str, aligned: bool,
            data_dir: str | os.PathLike, *, file_format: str = 'array_record',
            num_shards: int | None = None, nonfinite: str = 'error', check_sha256: bool = True,
            overwrite: bool = False, log=None) -> str:
  """Convert one MMSA pickle into a sharded TFDS dataset; returns the dataset directory.

  The pickle is validated completely before anything is written. One process at a time
  prepares a setting in a data dir (a lock; a second one waits, saying for whom, through `log`).
  The dataset is built in a staging folder beside its place and moved there when complete, so
  an existing dataset (`overwrite`) stays readable until the new one replaces it, and a failure
  or a kill leaves what was there. Leftovers of a killed preparation are removed by the next.
  `num_shards` (per split) defaults to TFDS's size-based choice.
  """
  if file_format not in FILE_FORMATS:
    raise ValueError(f'file_format must be one of {FILE_FORMATS}, got {file_format!r}')
  if file_format == 'tfrecord':
    require_tensorflow()
  if num_shards is not None and num_shards < 1:
    raise ValueError(f'num_shards must be >= 1, got {num_shards}')
  dataset, aligned = mmsa_format.check_setting(dataset, aligned)
  out = schema.dataset_path(data_dir, dataset, aligned)
  if os.path.exists(out) and not overwrite:
    with contextlib.suppress(lock.Busy):   # unless another process is preparing it now
      with lock.hold(os.path.dirname(out) + '.lock', f'the prepared dataset {out}'):
        _remove_leftovers(out)
    raise FileExistsError(f'{out} already exists; pass overwrite=True (--overwrite) to rebuild')

  source = mmsa_format.load_source(pickle_path, dataset, aligned, nonfinite=nonfinite,
                                   check_sha256=check_sha256)
  sizes = source.num_examples()
  if num_shards is not None and num_shards > min(sizes.values()):
    raise ValueError(f'num_shards={num_shards} exceeds the smallest split ({min(sizes.values())} '
                     f'examples in {min(sizes, key=sizes.get)!r})')

  root = os.path.expanduser(os.fspath(data_dir))
  config_dir = os.path.dirname(out)
  # Folders this call creates are removed again on failure, if nothing else has come into them.
  created = [p for p in (root, os.path.dirname(config_dir), config_dir) if not os.path.exists(p)]
  log = log or (lambda msg: mmsa_format.log.warning('%s', msg))
  try:
    with lock.hold(config_dir + '.lock', f'the prepared dataset {out}', wait=True, log=log):
      _remove_leftovers(out)
      if os.path.exists(out) and not overwrite:
        raise FileExistsError(f'{out} already exists (prepared by another process while this '
                              'one waited, or restored from an interrupted --overwrite); pass '
                              'overwrite=True (--overwrite) to rebuild')
      _build(source, file_format, num_shards, out, staging=_staging(out) + f'{os.getpid()}')
  except BaseException:
    for p in reversed(created):
      with contextlib.suppress(OSError):
        os.rmdir(p)
    raise
  mmsa_format.log.info('%s: %s examples (train/valid/test) written as %s to %s', source.path,
                       '/'.join(str(sizes[s]) for s in mmsa_format.SPLITS), file_format, out)
  return out


def _staging(out: str) -> str:
  """The prefix of the folders a build of `out` stages in (a pid follows)."""
  return os.path.join(os.path.dirname(os.path.dirname(out)),
                      f'.building-{os.path.basename(os.path.dirname(out))}-')


def _build(source: MmsaSource, file_format: str, num_shards: int | None, out: str,
           staging: str) -> None:
  """Builds the dataset under `staging` (a TFDS data dir of its own), then swaps it into `out`:
  the previous version is moved aside, the new one moved in, the previous one removed; a
  failure before the swap leaves `out` untouched."""
  previous = out + '.previous'
  try:
    builder = Mmsa(config=source.name, data_dir=staging, file_format=file_format, source=source)
    config = tfds.download.DownloadConfig(num_shards=num_shards, try_download_gcs=False)
    with _local_spill(_SPILL_BYTES):
      builder.download_and_prepare(download_dir=os.path.join(staging, '.downloads'),
                                   download_config=config)
    built = schema.dataset_path(staging, source.dataset, source.aligned)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if os.path.exists(out):
      os.replace(out, previous)
    os.replace(built, out)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  shutil.rmtree(previous, ignore_errors=True)


def _remove_leftovers(out: str) -> None:
  """What a killed preparation of `out` left (called holding its lock): its staging folders,
  TFDS scratch folders, and a previous version moved aside (restored if the new one never
  arrived)."""
  prefix = _staging(out)
  parent = os.path.dirname(prefix)
  if os.path.isdir(parent):
    for name in os.listdir(parent):
      if os.path.join(parent, name).startswith(prefix):
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
  previous = out + '.previous'
  if os.path.isdir(previous):
    if os.path.exists(out):
      shutil.rmtree(previous, ignore_errors=True)
    else:
      os.replace(previous, out)
  config_dir = os.path.dirname(out)
  if os.path.isdir(config_dir):
    for name in os.listdir(config_dir):
      if name == '.downloads' or '.incomplete' in name:
        shutil.rmtree(os.path.join(config_dir, name), ignore_errors=True)
