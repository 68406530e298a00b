"""Metrics to JSON lines and TensorBoard event files (written by process 0 only)."""

from __future__ import annotations

import json
import os
import time
from typing import Mapping

import jax
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class MetricWriter:
  """`write(step, {name: scalar})` appends one JSON line to `<logdir>/metrics.jsonl` and one
  TensorBoard event per scalar under `<logdir>/tensorboard/` (the `tensorboard` package; it needs
  no TensorFlow)."""

  def __init__(self, logdir: str):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(logdir, 'metrics.jsonl')
    self._events = None
    if not self.enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    self._events = EventFileWriter(os.path.join(logdir, 'tensorboard'))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in scalars.items()}
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **values}) + '\n')
    if self._events is not None:
      s = summary_pb2.Summary(value=[
          summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in values.items()])
      self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                   summary=s))
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
