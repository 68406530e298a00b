r"""CMU-MOSI with the released DMD hyper-parameters (spec §1.4).

    python -m dmd_jax.main --config=configs/mosi.py --workdir=runs/mosi     # word-aligned (default)
    python -m dmd_jax.main --config=configs/mosi.py:unaligned --workdir=runs/mosi_u
    python -m dmd_jax.main --config=configs/mosi.py --workdir=W --config.text_encoder=/path/bert

Data: the prepared dataset DATA_DIR/mmsa/mosi_<alignment>/1.0.0 (python -m data_prep.mmsa).
"""

import ml_collections


def get_config(alignment: str = 'aligned') -> ml_collections.ConfigDict:
  if alignment not in ('aligned', 'unaligned'):
    raise ValueError(f"config argument must be 'aligned' or 'unaligned', got {alignment!r}")
  c = ml_collections.ConfigDict()
  c.dataset = 'mosi'                    # 'mosi' or 'mosei'
  c.aligned = alignment == 'aligned'    # aligned_50.pkl (lengths 50/50/50) or unaligned_50.pkl
  # Text encoder: a local Hugging Face BERT directory (config.json + model.safetensors), a hub id
  # (needs network or a warm huggingface_hub cache), or 'random' for a randomly initialised
  # encoder of the sizes in `random_bert` (smoke runs and tests only).
  c.text_encoder = 'bert-base-uncased'
  c.random_bert = ml_collections.ConfigDict(dict(
      vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
      intermediate_size=3072))

  m = c.model = ml_collections.ConfigDict()
  m.d = 50                       # dst_feature_dim: width of every projection
  m.num_heads = 10               # attention heads in every transformer
  m.nlevels = 4                  # transformer depth
  m.kernel_sizes = (5, 5, 5)     # temporal Conv1d kernels (l, a, v)
  m.attn_dropout = 0.3           # transformers l/al/vl and the *_mem ones
  m.attn_dropout_a = 0.2         # transformers a/la/va
  m.attn_dropout_v = 0.0         # transformers v/lv/av
  m.relu_dropout = 0.0           # after the FFN ReLU
  m.embed_dropout = 0.2          # on the scaled, position-embedded transformer inputs
  m.res_dropout = 0.0            # before each residual add
  m.output_dropout = 0.5         # inside every residual prediction head
  m.text_dropout = 0.5           # on the BERT output
  m.attn_mask = True             # offset causal masks in every transformer
  m.dropout_rng = 'hash'         # fast counter-based dropout masks; 'threefry' = JAX default
  m.compute_dtype = 'float32'    # 'bfloat16': bf16 matmuls, float32 params/optimizer/losses

  c.batch_size = 16              # reference batch size (train/valid/test)
  c.learning_rate = 1e-4         # Adam, one rate for every parameter (BERT included)
  c.update_epochs = 10           # gradient-accumulation window, in mini-batches
  c.grad_clip = 0.6              # elementwise clip of the running gradient sum; <= 0 disables
  c.patience = 5                 # ReduceLROnPlateau patience (epochs)
  c.early_stop = 10              # stop this many epochs after the best validation loss
  c.seeds = (1111, 1112, 1113, 1114, 1115)
  c.max_epochs = 200             # the reference has no cap; early stopping ends its runs

  c.data_dir = '~/tensorflow_datasets'   # holds mmsa/<dataset>_<alignment>/1.0.0 (data_prep.mmsa)
  c.synthetic = None             # a ConfigDict(sizes, seed, weights) builds synthetic data if absent
  c.mode = 'train'               # 'train', 'eval' or 'smoke'
  c.eval_split = 'test'          # split written by mode=eval
  c.checkpoint = ''              # params dir for mode=eval (default: workdir/seed_<first>/best)
  c.log_every = 20               # train steps between device->host metric fetches
  c.keep_checkpoints = 2         # latest full-state checkpoints kept per seed (plus the best)
  c.progress = True              # progress bar with ETA
  c.distributed = False          # jax.distributed.initialize() (multi-host)
  c.coordinator_address = ''     # host:port; empty = detect (Cloud TPU, SLURM)
  c.num_processes = 1
  c.process_id = 0

  c.smoke_steps = 4              # micro-batches run by mode=smoke
  return c
