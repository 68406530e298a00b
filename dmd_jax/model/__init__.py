"""The network: building blocks (layers), MulT attention (plain form first, fast paths beside
it) and transformer, the BERT text encoder, the GD-Units, DHMD's dictionary, and DMD itself with
`init_params` and `forward`, and the batch layout it reads (batch.py). Depends only on
dmd_jax.config and dmd_jax.schema.
"""

from dmd_jax.model.bert import BertModel, load_bert
from dmd_jax.model.dmd import DMD, forward, init_params, predict_step
from dmd_jax.model.gd_unit import GDUnit, edges_to_matrix
from dmd_jax.model.target import compiler_options

__all__ = ['BertModel', 'DMD', 'GDUnit', 'compiler_options', 'edges_to_matrix', 'forward',
           'init_params', 'load_bert', 'predict_step']
