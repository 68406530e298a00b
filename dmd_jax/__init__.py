"""dmd_jax: Decoupled Multimodal Distilling (DMD, CVPR 2023) in JAX/Flax."""

from dmd_jax.api import (TrainState, build_model, check_batch, compute_loss, create_train_state,
                         dummy_batch, forward, init_params, make_train_step, random_batch,
                         train_step)
from dmd_jax.bert import BertModel, load_bert
from dmd_jax.checkpoint import (export_reference, import_reference, load_state_dict,
                                restore_params, save_params)
from dmd_jax.config import BertConfig, DMDConfig, reference_config
from dmd_jax.distill import EDGE_NAMES, edges_to_matrix
from dmd_jax.losses import dmd_losses
from dmd_jax.models import DMD
from dmd_jax.optim import accumulate_clipped, reference_optimizer, reset_window, set_learning_rate

__version__ = '0.1.0'
