r"""CMU-MOSI with the released DMD hyper-parameters (spec §1.4); the base of every run config.

    python -m dmd_jax.main --config=configs/mosi.py --workdir=runs/mosi     # word-aligned (default)
    python -m dmd_jax.main --config=configs/mosi.py:unaligned --workdir=runs/mosi_u
    python -m dmd_jax.main --config=configs/mosi.py --workdir=W --config.text_encoder=/path/bert

Data: the prepared dataset DATA_DIR/mmsa/mosi_<alignment>/1.0.0 (python -m data_prep.mmsa).
"""

import dataclasses
import typing

import ml_collections

from dmd_jax.config import run_model_fields


def config_dict(values) -> ml_collections.ConfigDict:
  """A dataclass instance (or a dict of values) as a ConfigDict, nested dataclasses included. A
  field whose value is None keeps its annotated type, so that --config.x=... can set it."""
  if dataclasses.is_dataclass(values):
    hints = typing.get_type_hints(type(values))
    values = {f.name: getattr(values, f.name) for f in dataclasses.fields(values)}
  else:
    hints = {}
  out = {}
  for name, value in values.items():
    if dataclasses.is_dataclass(value):
      value = config_dict(value)
    elif value is None:
      kinds = [t for t in typing.get_args(hints.get(name)) if t is not type(None)]
      value = ml_collections.FieldReference(None, field_type=kinds[0] if kinds else str)
    out[name] = value
  return ml_collections.ConfigDict(out)


def get_config(alignment: str = 'aligned') -> ml_collections.ConfigDict:
  return base_config('mosi', alignment)


def base_config(dataset: str, alignment: str) -> ml_collections.ConfigDict:
  """The run config of `dataset` with the released hyper-parameters (dmd_jax.config holds them;
  every model field below can be overridden with --config.model.<field>=...)."""
  if alignment not in ('aligned', 'unaligned'):
    raise ValueError(f"config argument must be 'aligned' or 'unaligned', got {alignment!r}")
  c = ml_collections.ConfigDict()
  c.dataset = dataset                   # 'mosi' or 'mosei'
  c.aligned = alignment == 'aligned'    # aligned_50.pkl (lengths 50/50/50) or unaligned_50.pkl
  # Text encoder: a local Hugging Face BERT directory (config.json + model.safetensors), a hub id
  # (needs network or a warm huggingface_hub cache), or 'random' for a randomly initialised
  # encoder of the sizes in `random_bert` (smoke runs and tests only).
  c.text_encoder = 'bert-base-uncased'
  c.random_bert = ml_collections.ConfigDict(dict(
      vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
      intermediate_size=3072))

  # The model: every field of dmd_jax.config.DMDConfig but the ones the lines above decide
  # (dataset, alignment, input sizes, text encoder), at the released values for this dataset,
  # which live there and only there. Set any with --config.model.<field>=..., e.g. d, num_heads,
  # nlevels, kernel_sizes, the dropout rates, the loss weights (gd_weight, decouple_weight,
  # margin_ort_weight, margin_scale), the GD-Units (gd_size_homo, gd_prior_homo, ...),
  # dropout_rng, compute_dtype, matmul_precision ('float32' or 'default', docs/tpu.md) and
  # attention.* (how attention and layer stacks are computed; the same values either way).
  c.model = config_dict(run_model_fields(dataset, alignment == 'aligned'))

  c.batch_size = 16              # reference batch size (train/valid/test)
  c.learning_rate = 1e-4         # Adam, one rate for every parameter (BERT included)
  c.update_epochs = 10           # gradient-accumulation window, in mini-batches
  c.grad_clip = 0.6              # elementwise clip of the running gradient sum; <= 0 disables
  c.patience = 5                 # ReduceLROnPlateau patience (epochs)
  c.early_stop = 10              # stop this many epochs after the best validation loss
  c.seeds = (1111, 1112, 1113, 1114, 1115)
  # 'together': the seeds (and sweep members) train in one compiled program, vmapped over a
  # leading member axis that the mesh's 'seed' axis spreads over devices; each runs the protocol
  # as if it ran alone (same steps up to float32 rounding: docs/training.md, reproducibility).
  # 'sequential': one after another.
  c.seed_mode = 'together'
  c.seeds_per_program = 0        # at most this many members per program (0: all); for memory
  # Where each member's parameters, Adam moments and accumulators live: 'replicated' (whole on
  # every device of its seed group), 'fsdp' (large leaves sharded over the group's data devices),
  # or 'auto' (fsdp where the replicated state would take over a quarter of a device's memory;
  # replicated on CPU). Same results either way; docs/tpu.md.
  c.state_layout = 'auto'
  # A grid of hyper-parameters trained along the same member axis: the values of each field
  # (empty = not swept), e.g. --config.sweep.learning_rate='(1e-4, 5e-5)'. Each grid point (times
  # every seed) gets its own folder and results table; sweep.md compares them.
  c.sweep = ml_collections.ConfigDict(dict(learning_rate=(), gd_weight=(), decouple_weight=(),
                                           margin_ort_weight=()))
  # JAX's persistent compilation cache: a second run, an eval or a resume of the same shapes
  # loads its compiled steps from here ('' = off; JAX_COMPILATION_CACHE_DIR takes precedence).
  c.compile_cache = '~/.cache/dmd_jax/xla'
  # after training, WORKDIR/bundle: the best seed as a self-contained model bundle for
  # python -m dmd_jax.predict (docs/predict.md); '' = none
  c.bundle = 'bundle'
  c.max_epochs = 200             # the reference has no cap; early stopping ends its runs

  c.data_dir = '~/tensorflow_datasets'   # holds mmsa/<dataset>_<alignment>/1.0.0 (data_prep.mmsa)
  c.synthetic = None             # ConfigDict(sizes, seed, weights): main makes that data if absent
  c.mode = 'train'               # dmd_jax.training.run_config.MODES: 'train', 'eval', 'smoke'
  c.eval_split = 'test'          # split written by mode=eval
  c.checkpoint = ''              # params dir for mode=eval (default: workdir/seed_<first>/best)
  c.log_every = 20               # train steps between device->host metric fetches
  c.keep_checkpoints = 2         # latest full-state checkpoints kept per seed (plus the best)
  c.progress = True              # progress bar with ETA (on a terminal; epoch lines always)
  c.figures = True               # per seed: edge heatmaps and history plots (PNG, SVG); false
                                 # skips matplotlib (the numbers are written either way)
  c.distributed = False          # jax.distributed.initialize() (multi-host)
  c.coordinator_address = ''     # host:port; empty = detect (Cloud TPU, SLURM)
  c.num_processes = 1
  c.process_id = 0

  c.smoke_steps = 4              # micro-batches run by mode=smoke
  return c
