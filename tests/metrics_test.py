"""MMSA regression metrics on hand-computed cases."""

import numpy as np
import pytest

from dmd_jax.analysis.metrics import METRIC_NAMES, regression_metrics, weighted_f1

PRED = [2.6, -0.4, 0.0, 1.49, -2.51, 0.3]
TRUTH = [3.0, -1.0, 0.0, 1.0, -2.0, -0.2]


def test_known_values():
  m = regression_metrics(PRED, TRUTH)
  assert tuple(m) == METRIC_NAMES
  # Has0: truth >= 0 = TFTTFF, pred >= 0 = TFTTFT -> 5/6; F1: T 2*3/(3+4), F 2*2/(3+2)
  assert m['Has0_acc_2'] == 0.8333
  assert m['Has0_F1_score'] == round((3 * 6 / 7 + 3 * 4 / 5) / 6, 4)
  # Non0 drops the zero label: truth > 0 = TFTFF, pred > 0 = TFTFT -> 4/5, F1 0.8 per class
  assert m['Non0_acc_2'] == 0.8 and m['Non0_F1_score'] == 0.8
  # rounded classes: pred 3 -0 0 1 -3 0 vs truth 3 -1 0 1 -2 -0; with [-2, 2] clipping 5 agree
  assert m['Mult_acc_7'] == 0.6667 and m['Mult_acc_5'] == 0.8333
  assert m['MAE'] == 0.4167                       # (0.4 + 0.6 + 0 + 0.49 + 0.51 + 0.5) / 6
  assert m['Corr'] == round(float(np.corrcoef(PRED, TRUTH)[0, 1]), 4)


def test_rounding_is_half_to_even_and_clipped():
  m = regression_metrics([0.5, 1.5, 2.5, 9.0], [0.0, 2.0, 2.0, 3.0])
  assert m['Mult_acc_7'] == 1.0                   # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, 9 -> 3
  assert m['Mult_acc_5'] == 1.0


def test_weighted_f1_edge_cases():
  assert weighted_f1([True, True], [False, False]) == 0.0
  assert weighted_f1([True, False, False, False], [True, True, False, False]) == pytest.approx(
      (1 * 2 / 3 + 3 * 4 / 5) / 4)


def test_constant_predictions_and_bad_shapes():
  m = regression_metrics(np.zeros(4), [1.0, -1.0, 2.0, 0.0])
  assert np.isnan(m['Corr']) and m['Non0_acc_2'] == round(1 / 3, 4) and m['Has0_acc_2'] == 0.75
  with pytest.raises(ValueError, match='one size'):
    regression_metrics([1.0, 2.0], [1.0])
