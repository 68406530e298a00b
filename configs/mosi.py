r"""CMU-MOSI with the released DMD hyper-parameters (spec §1.4); the base of every run config.

    python -m dmd_jax.main --config=configs/mosi.py --workdir=runs/mosi     # word-aligned (default)
    python -m dmd_jax.main --config=configs/mosi.py:unaligned --workdir=runs/mosi_u
    python -m dmd_jax.main --config=configs/mosi.py --workdir=W --config.text_encoder=/path/bert

Data: the prepared dataset DATA_DIR/mmsa/mosi_<alignment>/1.0.0 (python -m data_prep.mmsa).
"""

import dataclasses

import ml_collections

from dmd_jax.config import reference_config


def get_config(alignment: str = 'aligned') -> ml_collections.ConfigDict:
  return base_config('mosi', alignment)


def base_config(dataset: str, alignment: str) -> ml_collections.ConfigDict:
  """The run config of `dataset` with the released hyper-parameters (dmd_jax.config holds them;
  every model field below can be overridden with --config.model.<field>=...)."""
  if alignment not in ('aligned', 'unaligned'):
    raise ValueError(f"config argument must be 'aligned' or 'unaligned', got {alignment!r}")
  ref = reference_config(dataset, alignment == 'aligned')
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

  m = c.model = ml_collections.ConfigDict()
  m.d = ref.d                    # dst_feature_dim: width of every projection
  m.num_heads = ref.num_heads    # attention heads in every transformer
  m.nlevels = ref.nlevels        # transformer depth
  m.kernel_sizes = ref.kernel_sizes      # temporal Conv1d kernels (l, a, v)
  m.attn_dropout = ref.attn_dropout      # transformers l/al/vl and the *_mem ones
  m.attn_dropout_a = ref.attn_dropout_a  # transformers a/la/va
  m.attn_dropout_v = ref.attn_dropout_v  # transformers v/lv/av
  m.relu_dropout = ref.relu_dropout      # after the FFN ReLU
  m.embed_dropout = ref.embed_dropout    # on the scaled, position-embedded transformer inputs
  m.res_dropout = ref.res_dropout        # before each residual add
  m.output_dropout = ref.output_dropout  # inside every residual prediction head
  m.text_dropout = ref.text_dropout      # on the BERT output
  m.attn_mask = ref.attn_mask            # offset causal masks in every transformer
  m.dropout_rng = ref.dropout_rng        # 'hash': fast counter-based masks; 'threefry': JAX's
  m.compute_dtype = ref.compute_dtype    # 'bfloat16': bf16 matmuls, float32 params/losses
  # float32 matmuls on TPU/GPU: 'float32' (true float32, the reference's arithmetic) or
  # 'default' (the chip's native speed: one bf16 pass on TPU, TF32 on NVIDIA); docs/tpu.md
  m.matmul_precision = ref.matmul_precision
  # How attention and layer stacks are computed (same values either way; AttentionConfig):
  # impl 'fast' | 'plain', head_loop / native 'auto' | 'on' | 'off', layer_loop 'auto' | 'scan'
  # | 'unroll'.
  m.attention = ml_collections.ConfigDict(dataclasses.asdict(ref.attention))

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
  c.synthetic = None             # a ConfigDict(sizes, seed, weights) builds synthetic data if absent
  c.mode = 'train'               # 'train', 'eval' or 'smoke'
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
