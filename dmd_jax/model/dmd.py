"""The DMD network (spec §2.4), batch-major, and how to initialise and apply it.

Inputs use the MMSA layout: `text` (B, 3, T_t) rows = token ids, attention mask, segment ids;
`audio` (B, T_a, d_a); `vision` (B, T_v, d_v). `DMD.__call__` returns every forward output of the
reference under its names, batch-major ((B, T', d) sequences, (B, D) vectors, (B, 1) logits),
plus the two GD-Units' normalised edges, both as (B, 6) lists in the reference's edge order
(`edge_list_homo`, `edge_list_hetero`) and as (B, 3, 3) matrices [source, target] in (l, v, a)
order (`edges_homo`, `edges_hetero`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmd_jax.schema import MODALITIES, UNITS
from dmd_jax.config import DMDConfig
from dmd_jax.model.batch import dummy_batch
from dmd_jax.model import precision, target
from dmd_jax.model.bert import BertModel
from dmd_jax.model.dictionary import Dictionary
from dmd_jax.model.gd_unit import GDUnit, edges_to_matrix
from dmd_jax.model.layers import Linear, conv1d
from dmd_jax.model.rng import dropout_key, init_key
from dmd_jax.model.transformer import TransformerEncoder


def _residual_head(x, width_hidden, width_out, names, rate, deterministic):
  """out(proj2(dropout(relu(proj1(x)))) + x) -> (logit, relu(proj1(x)), proj2(...) + x)."""
  p1, p2, out = names
  r = nn.relu(Linear(width_hidden, name=p1)(x))
  h = Linear(width_out, name=p2)(nn.Dropout(rate)(r, deterministic=deterministic)) + x
  return Linear(1, name=out)(h), r, h


class DMD(nn.Module):
  """Decoupled Multimodal Distilling network with its two GD-Units."""
  config: DMDConfig

  def _transformer(self, kind: str, name: str, last_only: bool = False) -> TransformerEncoder:
    """get_network(): width and attention dropout by transformer type (spec §2.5 item 6)."""
    cfg = self.config
    rate = {'l': cfg.attn_dropout, 'al': cfg.attn_dropout, 'vl': cfg.attn_dropout,
            'a': cfg.attn_dropout_a, 'la': cfg.attn_dropout_a, 'va': cfg.attn_dropout_a,
            'v': cfg.attn_dropout_v, 'lv': cfg.attn_dropout_v, 'av': cfg.attn_dropout_v,
            'mem': cfg.attn_dropout}[kind]
    mem = kind == 'mem'
    return TransformerEncoder(
        embed_dim=2 * cfg.d if mem else cfg.d, num_heads=cfg.num_heads,
        layers=max(cfg.nlevels, 3) if mem else cfg.nlevels, attn_dropout=rate,
        relu_dropout=cfg.relu_dropout, res_dropout=cfg.res_dropout,
        embed_dropout=cfg.embed_dropout, attn_mask=cfg.attn_mask, last_only=last_only,
        attention=cfg.attention, name=name)

  @nn.compact
  def __call__(self, text: jax.Array, audio: jax.Array, vision: jax.Array, *,
               train: bool = False, step=None) -> dict[str, jax.Array]:
    """`step` (the micro-step) only matters for DHMD with an annealed dictionary temperature."""
    cfg, det = self.config, not train
    _check_inputs(cfg, text, audio, vision)
    d, bsz = cfg.d, text.shape[0]
    drop = lambda rate, x: nn.Dropout(rate)(x, deterministic=det)
    out = {}

    # 1. Text encoder: all token states, no pooling; pads are not masked downstream.
    ids, mask, segments = (text[:, i].astype(jnp.int32) for i in range(3))
    hidden = BertModel(cfg.bert, name='text_model')(ids, mask, segments, deterministic=det)
    x = {'l': drop(cfg.text_dropout, hidden), 'a': audio, 'v': vision}

    # 2-5. Temporal projection, decoupling (one shared common encoder), reconstruction, cycle.
    encoder_c = conv1d(d, 1, 'encoder_c')
    s, c = {}, {}
    for m in MODALITIES:
      origin = conv1d(d, cfg.kernels[m], f'proj_{m}')(x[m])          # (B, T'_m, d)
      encoder_s = conv1d(d, 1, f'encoder_s_{m}')
      s[m], c[m] = encoder_s(origin), encoder_c(origin)
      channel_major = jnp.swapaxes(c[m], 1, 2).reshape(bsz, -1)       # index ch * T' + t
      recon = conv1d(d, 1, f'decoder_{m}')(jnp.concatenate([s[m], c[m]], axis=-1))
      out.update({f'origin_{m}': origin, f's_{m}': s[m], f'c_{m}': c[m], f'recon_{m}': recon,
                  f's_{m}_r': encoder_s(recon),
                  f'c_{m}_sim': Linear(d, name=f'align_c_{m}')(channel_major)})

    # 6-8. HomoGD heads on the time-major flatten of c_m; repr is the post-ReLU activation.
    for m in MODALITIES:
      flat = c[m].reshape(bsz, -1)                                      # index t * d + ch
      logit, r, _ = _residual_head(flat, d, flat.shape[-1],
                                   (f'proj1_{m}_low', f'proj2_{m}_low', f'out_layer_{m}_low'),
                                   cfg.output_dropout, det)
      out[f'logits_{m}_homo'], out[f'repr_{m}_homo'] = logit, r
      out[f'proj_s_{m}'] = Linear(d, name=f'proj_cosine_{m}')(s[m].reshape(bsz, -1))  # unused

    # 9. Self-attention on common features, last step, residual head.
    c_last = {m: self._transformer(m, f'self_attentions_c_{m}', True)(c[m], deterministic=det)[:, -1]
              for m in MODALITIES}
    c_fusion = jnp.concatenate([c_last[m] for m in MODALITIES], axis=-1)    # (B, 3d)
    out['logits_c'], _, _ = _residual_head(c_fusion, 3 * d, 3 * d,
                                           ('proj1_c', 'proj2_c', 'out_layer_c'),
                                           cfg.output_dropout, det)

    # 10-11. Cross-modal transformers on specific features (query = target modality), then the
    # memory transformers, last step, HeteroGD heads (repr taken after the residual add).
    last_h, cross_seq = {}, {}
    for m, (o1, o2) in (('l', 'av'), ('a', 'lv'), ('v', 'la')):
      cross = [self._transformer(m + o, f'trans_{m}_with_{o}')(s[m], s[o], deterministic=det)
               for o in (o1, o2)]
      cross_seq[m] = jnp.concatenate(cross, axis=-1)                     # (B, T'_m, 2d)
      h = self._transformer('mem', f'trans_{m}_mem', True)(cross_seq[m], deterministic=det)
      last_h[m] = out[f'last_h_{m}'] = h[:, -1]                          # (B, 2d)
    for m in MODALITIES:
      logit, _, rep = _residual_head(last_h[m], 2 * d, 2 * d,
                                     (f'proj1_{m}_high', f'proj2_{m}_high', f'out_layer_{m}_high'),
                                     cfg.output_dropout, det)
      out[f'logits_{m}_hetero'], out[f'repr_{m}_hetero'] = logit, rep

    # DHMD: each space's features re-expressed through its dictionary; per modality the GD-stage
    # feature and the dictionary embedding are concatenated and projected back to the feature's
    # width, so the fusion below keeps DMD's shapes (dmd_jax/model/dictionary.py).
    fuse_h, fuse_c = last_h, c_fusion
    if cfg.dhmd:
      spaces = (('homo', d, [c[m] for m in MODALITIES], c_last),
                ('hetero', 2 * d, [cross_seq[m] for m in MODALITIES], last_h))
      fused = {}
      for space, width, seqs, feats in spaces:
        dico = Dictionary(cfg.dictionary, width, name=f'dictionary_{space}')
        act, emb = dico(seqs, step)
        out[f'dict_act_{space}'], out[f'dict_emb_{space}'] = act, emb
        if cfg.dictionary.loss == 'infonce':
          out[f'dict_logit_scale_{space}'] = dico.variables['params']['logit_scale']
        fused[space] = {m: Linear(width, name=f'dict_fuse_{space}_{m}')(
            jnp.concatenate([feats[m], emb[:, i].astype(feats[m].dtype)], axis=-1))
            for i, m in enumerate(MODALITIES)}
      fuse_h = fused['hetero']
      fuse_c = jnp.concatenate([fused['homo'][m] for m in MODALITIES], axis=-1)

    # 12. Fusion: sigmoid gates replace the features, concatenated l, v, a, c.
    z = jnp.concatenate([jax.nn.sigmoid(Linear(2 * d, name=f'weight_{m}')(fuse_h[m]))
                         for m in MODALITIES] +
                        [jax.nn.sigmoid(Linear(3 * d, name='weight_c')(fuse_c))], axis=-1)
    out['output_logit'], _, _ = _residual_head(z, 9 * d, 9 * d, ('proj1', 'proj2', 'out_layer'),
                                               cfg.output_dropout, det)

    # GD-Units over nodes (l, v, a).
    for space, g in (('homo', cfg.gd_size_homo), ('hetero', cfg.gd_size_hetero)):
      logits = jnp.stack([out[f'logits_{m}_{space}'] for m in MODALITIES])
      reprs = jnp.stack([out[f'repr_{m}_{space}'] for m in MODALITIES])
      edges = GDUnit(g, cfg.gd_alpha, name=f'{space}_gd')(logits, reprs)
      out[f'edge_list_{space}'] = edges
      out[f'edges_{space}'] = edges_to_matrix(edges)
    return out


def _check_inputs(cfg: DMDConfig, text, audio, vision) -> None:
  """Shapes are static under jit, so a wrong input fails here with names, before tracing on."""
  t_len, a_len, v_len = cfg.seq_lens
  _, a_dim, v_dim = cfg.feature_dims
  expected = {'text': (3, t_len), 'audio': (a_len, a_dim), 'vision': (v_len, v_dim)}
  b = None
  for name, arr in (('text', text), ('audio', audio), ('vision', vision)):
    if arr.ndim != 3 or tuple(arr.shape[1:]) != expected[name]:
      raise ValueError(f"input '{name}' has shape {tuple(arr.shape)}, expected "
                       f"(B, {expected[name][0]}, {expected[name][1]}) for "
                       f"{cfg.dataset} {'aligned' if cfg.aligned else 'unaligned'} "
                       f"(seq_lens t/a/v={cfg.seq_lens}, feature_dims={cfg.feature_dims})")
    if b is not None and arr.shape[0] != b:
      raise ValueError(f"input '{name}' has batch size {arr.shape[0]}, 'text' has {b}")
    b = arr.shape[0]


# ---- initialising and applying the network ------------------------------------------------------

PyTree = Any


def init_params(config: DMDConfig, rng: jax.Array, *, jit: bool = True) -> PyTree:
  """Random parameters with the reference's initialisers (the text encoder included; load
  pretrained BERT weights over `params['text_model']` with `dmd_jax.load_bert`).

  `rng` is a key with uint32[2] data (`jax.random.key(seed)`); the draws use its data through
  `dmd_jax.model.rng.INIT_IMPL` (hashed keys and bits: compiling ~900 Threefry kernels made a
  bert-base-sized init cost 24-50 s on a 2-core CPU, now ~10 s). jit=False runs the initialisers
  op by op instead (same values; slower for a model of this size)."""
  b = dummy_batch(config, 1)
  key = init_key(rng)
  if not jit:
    return DMD(config).lazy_init(key, b['text'], b['audio'], b['vision'])['params']
  if isinstance(key, jax.core.Tracer):   # traced (eval_shape, an outer jit): no compile here
    return DMD(config).init(key, b['text'], b['audio'], b['vision'])['params']
  return _compiled_init(config, jax.typeof(key))(key)


@functools.lru_cache(maxsize=8)
def _compiled_init(config: DMDConfig, key_type) -> Any:
  """The initialiser of `config` compiled once per process: every further seed (the members of
  a group, sequential seeds, sweeps) reuses it instead of tracing and compiling it again."""
  b = dummy_batch(config, 1)
  init = jax.jit(lambda r: DMD(config).init(r, b['text'], b['audio'], b['vision'])['params'])
  # compiled for the device it runs on (jit's default device), with that platform's options
  platform = target.family(jax.devices()[0].platform)
  return init.trace(jax.ShapeDtypeStruct(key_type.shape, key_type.dtype)).lower().compile(
      target.compiler_options(platform))


def forward(params: PyTree, batch, config: DMDConfig, *, rng: Optional[jax.Array] = None,
            train: bool = False, step: Optional[jax.Array] = None) -> dict[str, jax.Array]:
  """Every forward output of the reference (batch-major) plus both edge matrices."""
  rngs = {'dropout': dropout_key(rng, config.dropout_rng)} if rng is not None else {}
  if train and rng is None and config.has_dropout:
    raise ValueError('train=True with non-zero dropout needs an rng key (rng=...)')
  audio, vision = batch['audio'], batch['vision']
  dtype = precision.compute_dtype(config)
  if dtype != jnp.float32:   # bf16 compute on a cast copy; gradients still reach f32 params
    params, audio, vision = precision.cast_floating((params, audio, vision), dtype)
  with precision.matmul_precision(config):
    out = DMD(config).apply({'params': params}, batch['text'], audio, vision, train=train,
                            step=step, rngs=rngs)
  return precision.cast_floating(out, jnp.float32)


def predict_step(config: DMDConfig, platform: str):
  """The jitted forward of a trained model for one device of `platform`: (params, batch) -> score
  (B,) and both edge matrices (B, 3, 3). `dmd_jax.Predictor` runs it; `python -m dmd_jax.aot`
  compiles it for a TPU chip."""
  config = target.for_platform(config, platform)

  def run(params, batch):
    out = forward(params, batch, config, train=False)
    return {'score': out['output_logit'].reshape(-1),
            **{f'edges_{u}': out[f'edges_{u}'] for u in UNITS}}
  return jax.jit(run, compiler_options=target.compiler_options(platform))
