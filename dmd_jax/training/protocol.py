"""The reference's training protocol for one run, on the host (spec §4): after each epoch,
ReduceLROnPlateau on the validation L1 loss, the best-on-valid epoch, and early stopping.

    protocol = Protocol(Plateau(lr, patience=5), early_stop=10, max_epochs=200)
    lr, improved, stop = protocol.update(epoch, valid_loss)

A run of seeds together keeps one `Protocol` per member (dmd_jax.training.group). Its state goes
into every checkpoint (`meta()` / `restore`), so a resumed run decides as the uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


@dataclasses.dataclass
class Plateau:
  """torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min', threshold_mode='rel', cooldown=0),
  written out because optax's reduce_on_plateau counts and scales differently."""
  lr: float
  factor: float = 0.5
  patience: int = 5
  threshold: float = 1e-4
  best: float = math.inf
  num_bad_epochs: int = 0

  def step(self, value: float) -> float:
    if value < self.best * (1.0 - self.threshold):
      self.best, self.num_bad_epochs = value, 0
    else:
      self.num_bad_epochs += 1
    if self.num_bad_epochs > self.patience:
      new = self.lr * self.factor
      if self.lr - new > 1e-8:                      # torch's eps
        self.lr = new
      self.num_bad_epochs = 0
    return self.lr


@dataclasses.dataclass
class Protocol:
  """One run's per-epoch decisions: the learning rate, whether the epoch is the best on the
  validation loss so far (its parameters are kept), and whether to stop."""
  plateau: Plateau
  early_stop: int
  max_epochs: int
  best_valid: float = math.inf
  best_epoch: int = 0

  def update(self, epoch: int, valid_loss: float) -> tuple[float, bool, bool]:
    """(learning rate for the next epoch, improved, stop) after `epoch`."""
    lr = self.plateau.step(valid_loss)
    improved = valid_loss <= self.best_valid - 1e-6
    if improved:
      self.best_valid, self.best_epoch = valid_loss, epoch
    stop = epoch >= self.max_epochs or epoch - self.best_epoch >= self.early_stop
    return lr, improved, stop

  def meta(self) -> dict[str, Any]:
    """What a checkpoint stores of the protocol."""
    return {'best_valid': self.best_valid, 'best_epoch': self.best_epoch,
            'plateau': dataclasses.asdict(self.plateau)}

  def restore(self, meta: Mapping[str, Any]) -> None:
    self.best_valid, self.best_epoch = meta['best_valid'], meta['best_epoch']
    self.plateau = Plateau(**meta['plateau'])
