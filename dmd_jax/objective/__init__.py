"""The objective: each DMD loss term (dmd.py), DHMD's matching losses (dhmd.py), and the weighted
total with `compute_loss(params, batch, config)` (total.py). Reads the model's outputs; nothing
here knows about optimisers or data files.
"""

from dmd_jax.objective.total import LOSS_WEIGHTS, compute_loss, dmd_losses

__all__ = ['LOSS_WEIGHTS', 'compute_loss', 'dmd_losses']
