"""MMSA's regression metrics for MOSI / MOSEI (spec §6), in numpy.

`regression_metrics(pred, truth)` returns the eight values MMSA reports, each rounded to 4 places
as MMSA does: Has0_acc_2 / Has0_F1_score (negative vs non-negative), Non0_acc_2 / Non0_F1_score
(negative vs positive, zero-labelled samples left out: the DMD paper's Acc2 / F1), Mult_acc_5,
Mult_acc_7, MAE and Corr. F1 is sklearn's `average='weighted'` for two classes.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ('Has0_acc_2', 'Has0_F1_score', 'Non0_acc_2', 'Non0_F1_score', 'Mult_acc_5',
                'Mult_acc_7', 'MAE', 'Corr')


def class_2(pred) -> np.ndarray:
  """The 2-class label of a score as Non0_acc_2 (the paper's Acc2) reads a prediction:
  'positive' above 0, else 'negative'."""
  return np.where(np.asarray(pred) > 0, 'positive', 'negative')


def class_7(pred) -> np.ndarray:
  """The 7-class label of a score as Mult_acc_7 reads it: round(clip(score, -3, 3)), -3..3."""
  return np.round(np.clip(np.asarray(pred, np.float32), -3.0, 3.0)).astype(np.int64)


def weighted_f1(truth: np.ndarray, pred: np.ndarray) -> float:
  """Support-weighted mean of the per-class F1 of two boolean labelings (sklearn 'weighted';
  a class with no predicted or no true member has F1 0)."""
  truth, pred = np.asarray(truth, bool), np.asarray(pred, bool)
  if truth.size == 0:
    return float('nan')
  total = 0.0
  for c in (False, True):
    support = np.sum(truth == c)
    tp = np.sum((truth == c) & (pred == c))
    denom = support + np.sum(pred == c)        # 2TP / (2TP + FP + FN) = 2TP / (|true| + |pred|)
    total += support * (2.0 * tp / denom if denom else 0.0)
  return float(total / truth.size)


def _multiclass_acc(pred, truth, bound):
  return float(np.mean(np.round(np.clip(pred, -bound, bound)) ==
                       np.round(np.clip(truth, -bound, bound))))


def _pearson(p: np.ndarray, y: np.ndarray) -> float:
  p, y = p - p.mean(), y - y.mean()
  denom = np.sqrt(np.sum(p * p) * np.sum(y * y))
  return float(np.sum(p * y) / denom) if denom > 0 else float('nan')   # constant -> NaN


def regression_metrics(pred, truth) -> dict[str, float]:
  """The eight MMSA metrics of predictions against true scores (both flattened)."""
  p = np.asarray(pred, np.float32).reshape(-1)
  y = np.asarray(truth, np.float32).reshape(-1)
  if p.shape != y.shape or p.size == 0:
    raise ValueError(f'predictions {np.shape(pred)} and labels {np.shape(truth)} must be '
                     'non-empty and of one size')
  nonzero = y != 0
  out = {
      'Has0_acc_2': float(np.mean((p >= 0) == (y >= 0))),
      'Has0_F1_score': weighted_f1(y >= 0, p >= 0),
      'Non0_acc_2': (float(np.mean((p[nonzero] > 0) == (y[nonzero] > 0))) if nonzero.any()
                     else float('nan')),
      'Non0_F1_score': weighted_f1(y[nonzero] > 0, p[nonzero] > 0),
      'Mult_acc_5': _multiclass_acc(p, y, 2.0),
      'Mult_acc_7': _multiclass_acc(p, y, 3.0),
      'MAE': float(np.mean(np.abs(p - y)).astype(np.float64)),   # float32 mean, as MMSA
      'Corr': _pearson(p.astype(np.float64), y.astype(np.float64)),
  }
  return {k: round(v, 4) for k, v in out.items()}
