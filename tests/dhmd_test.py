"""DHMD: sparsemax, the dictionary, the matching losses, DMD recovered with the branch off, and a
short training run that exports dictionary activations."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import dmd_jax
from configs import mosei_dhmd, mosi_dhmd, smoke
from dmd_jax.model import dictionary
from dmd_jax.objective import dhmd, dmd as losses
from dmd_jax.training import experiment, inputs
from dmd_jax.training.run_config import load_run_config
from dmd_jax.config import DictionaryConfig, from_run_config


def test_sparsemax_known_value_simplex_and_sparsity():
  np.testing.assert_allclose(dictionary.sparsemax(jnp.array([1.0, 0.5, -1.0])), [0.75, 0.25, 0.0],
                             atol=1e-7)
  np.testing.assert_allclose(dictionary.sparsemax(jnp.zeros(4)), [0.25] * 4)
  z = jax.random.normal(jax.random.key(0), (64, 512)) * 3
  p = dictionary.sparsemax(z)
  assert np.all(np.asarray(p) >= 0)
  np.testing.assert_allclose(np.sum(p, axis=-1), 1.0, atol=1e-5)
  active = np.sum(np.asarray(p) > 0, axis=-1)
  assert active.max() < 50 and active.min() >= 1            # sparse, never empty
  # invariant to a shift, and the largest entry always kept
  np.testing.assert_allclose(dictionary.sparsemax(z + 7.0), p, atol=1e-5)
  assert np.all(np.asarray(p)[np.arange(64), np.argmax(z, axis=-1)] > 0)


def test_sparsemax_gradient_matches_finite_differences():
  z = jax.random.normal(jax.random.key(1), (5, 12)) * 2
  check_grads(dictionary.sparsemax, (z,), order=1, modes=('fwd', 'rev'), eps=1e-3, atol=1e-2,
              rtol=1e-2)
  w = jax.random.normal(jax.random.key(2), (5, 12))
  f = lambda x: jnp.sum(w * dictionary.sparsemax(x) ** 2)
  check_grads(f, (z,), order=1, modes=('rev',), eps=1e-3, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('pool,activation', [('max', 'sparsemax'), ('mean', 'softmax')])
def test_dictionary_outputs(pool, activation):
  cfg = DictionaryConfig(num_atoms=16, pool=pool, activation=activation, stop_gradient=True)
  seqs = [jax.random.normal(jax.random.key(i), (4, t, 8)) for i, t in enumerate((5, 7, 9))]
  module = dictionary.Dictionary(cfg, 8)
  params = jax.jit(module.init)(jax.random.key(3), seqs)
  act, emb = jax.jit(module.apply)(params, seqs)
  assert act.shape == (4, 3, 16) and emb.shape == (4, 3, 8)
  np.testing.assert_allclose(np.sum(act, -1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
  # stop_gradient: nothing flows back into the inputs, but the atoms do learn
  g_in = jax.jit(jax.grad(lambda s: jnp.sum(module.apply(params, s)[1] ** 3)))(seqs)
  assert all(not np.any(g) for g in g_in)
  g_p = jax.jit(jax.grad(lambda p: jnp.sum(module.apply(p, seqs)[1] ** 3)))(params)
  assert np.any(np.asarray(g_p['params']['atoms']))
  with pytest.raises(ValueError, match="modality 'v' has width 6"):
    module.apply(params, [seqs[0], seqs[1][..., :6], seqs[2]])


def test_temperature_fixed_and_annealed():
  fixed = DictionaryConfig(temperature=2.0)
  assert float(dictionary.temperature(fixed, 100)) == 2.0
  ann = DictionaryConfig(temperature=2.0, temperature_end=0.5, anneal_steps=10)
  assert [float(dictionary.temperature(ann, s)) for s in (0, 5, 10, 50)] == [2.0, 1.25, 0.5, 0.5]
  assert float(dictionary.temperature(ann)) == 0.5                 # eval: the final value


def _emb(b, seed=0):
  e = jax.random.normal(jax.random.key(seed), (b, 3, 8))
  return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def _acts(b, seed=0):
  return dictionary.sparsemax(jax.random.normal(jax.random.key(seed), (b, 3, 16)) * 3)


def _loss_fns():
  labels = lambda b: jnp.round(jnp.linspace(-3, 3, b)).reshape(b, 1)
  edges = lambda b: jax.nn.softmax(jax.random.normal(jax.random.key(9), (b, 6)), axis=-1)
  return {'label_hinge': lambda b, x: dhmd.label_margin(_emb(b) + x, labels(b), 0.15),
          'infonce': lambda b, x: dhmd.infonce(_emb(b) + x, jnp.log(1 / 0.07)),
          'edge_kl': lambda b, x: dhmd.edge_kl(jax.nn.softmax(_acts(b) + x), edges(b))}


@pytest.mark.parametrize('kind', ['label_hinge', 'infonce', 'edge_kl'])
def test_matching_losses_finite_differentiable_vectorised(kind):
  fn = _loss_fns()[kind]
  shape = (8, 3, 16) if kind == 'edge_kl' else (8, 3, 8)
  x = jnp.zeros(shape)
  value, grad = jax.value_and_grad(lambda x: fn(8, x))(x)
  assert np.isfinite(float(value)) and np.all(np.isfinite(grad)) and np.any(np.asarray(grad))
  # no Python loop over samples: the traced program has the same size at any batch size
  size = lambda b: len(jax.make_jaxpr(lambda x: fn(b, x))(jnp.zeros((b,) + shape[1:])).eqns)
  assert size(4) == size(32)


def test_matching_losses_known_values():
  e = _emb(6)
  # label_hinge is DMD's margin loss on the stacked embeddings
  labels = jnp.array([[1.0], [1.0], [-2.0], [-2.0], [0.0], [1.0]])
  out = {f'c_{m}_sim': e[:, i] for i, m in enumerate('lva')}
  np.testing.assert_allclose(dhmd.label_margin(e, labels, 0.15),
                             losses.margin_loss(out, labels, 0.15), rtol=1e-6)
  # infonce: identical modalities with orthogonal samples and a large scale -> ~0; random -> > 0
  eye = jnp.repeat(jnp.eye(6, 8)[:, None], 3, axis=1)
  assert float(dhmd.infonce(eye, jnp.log(100.0))) < 1e-6
  assert float(dhmd.infonce(e, jnp.log(1 / 0.07))) > 0.1
  # edge_kl: zero when every modality has the same activations, positive otherwise
  same = jnp.repeat(_acts(6)[:, :1], 3, axis=1)
  w = jnp.full((6, 6), 1 / 6)
  assert abs(float(dhmd.edge_kl(same, w))) < 1e-6
  assert float(dhmd.edge_kl(_acts(6), w)) > 0.1


def _tiny(dico=None):
  return dmd_jax.reference_config('mosi', aligned=True, bert=dmd_jax.BertConfig.tiny(), d=8,
                                  num_heads=2, nlevels=1, dictionary=dico)


def test_dhmd_parameters_are_dmd_plus_the_dictionaries():
  shapes = lambda cfg: jax.eval_shape(lambda r: dmd_jax.init_params(cfg, r), jax.random.key(0))
  dmd, dhmd = shapes(_tiny()), shapes(_tiny(DictionaryConfig(num_atoms=16)))
  extra = set(dhmd) - set(dmd)
  assert extra == {'dictionary_homo', 'dictionary_hetero'} | {
      f'dict_fuse_{s}_{m}' for s in ('homo', 'hetero') for m in 'lva'}
  assert jax.tree.map(lambda x: x.shape, {k: dhmd[k] for k in dmd}) == jax.tree.map(
      lambda x: x.shape, dmd)
  assert dhmd['dictionary_homo']['atoms'].shape == (16, 8)
  assert dhmd['dictionary_hetero']['atoms'].shape == (16, 16)
  assert set(shapes(_tiny(DictionaryConfig(enabled=False)))) == set(dmd)


def test_branch_off_reproduces_the_dmd_parity_fixture(parity_first):
  """A DHMD config with the dictionary switched off is the reference DMD, to parity tolerance.
  (The CI tier checks the first fixture; the slow tier every one.)"""
  _branch_off_matches(parity_first)


@pytest.mark.slow
def test_branch_off_reproduces_every_dmd_parity_fixture(parity):
  _branch_off_matches(parity)


def _branch_off_matches(parity):
  cfg = parity.config.replace(dictionary=DictionaryConfig(enabled=False))
  params = dmd_jax.import_reference(cfg, *(parity.path / f for f in
                                           ('dmd.npz', 'homo_gd.npz', 'hetero_gd.npz')))
  batch = {k: jnp.asarray(v) for k, v in parity.batch(0).items()}
  total, aux = jax.jit(lambda p, b: dmd_jax.compute_loss(p, b, cfg))(params, batch)
  ref = parity.npz('outputs.npz')
  for k in ('output_logit', 'logits_c', 'edges_homo', 'edges_hetero'):
    got, want = np.asarray(aux['outputs'][k]), ref[k]
    assert np.max(np.abs(got - want)) <= 1e-6 + 1e-5 * np.abs(want).max(), k
  ref_losses = parity.json('losses.json')
  assert set(aux['losses']) == set(ref_losses)             # no matching terms
  np.testing.assert_allclose(float(total), ref_losses['total'], rtol=1e-5)


def test_dhmd_run_configs_build():
  bert = dmd_jax.BertConfig.tiny()
  for module, dataset in ((mosi_dhmd, 'mosi'), (mosei_dhmd, 'mosei')):
    for alignment in ('aligned', 'unaligned'):
      cfg = from_run_config(module.get_config(alignment), bert)
      assert cfg.dataset == dataset and cfg.aligned == (alignment == 'aligned')
      assert cfg.dhmd and cfg.dictionary == DictionaryConfig()
  run = mosi_dhmd.get_config()
  run.model.dictionary.loss = 'cosine'
  with pytest.raises(ValueError, match="DictionaryConfig.loss: must be one of"):
    from_run_config(run, bert)
  run = mosi_dhmd.get_config()
  run.model.dictionary.unlock()
  run.model.dictionary.atoms = 3
  with pytest.raises(ValueError, match=r"config.model.dictionary has unknown key\(s\) \['atoms'\]"):
    from_run_config(run, bert)


@pytest.mark.parametrize('kind', ['infonce', 'edge_kl'])
def test_dhmd_objective_has_the_matching_terms(kind):
  cfg = _tiny(DictionaryConfig(num_atoms=16, loss=kind, weight=0.3))
  params = jax.eval_shape(lambda r: dmd_jax.init_params(cfg, r), jax.random.key(0))
  _, aux = jax.eval_shape(lambda p: dmd_jax.compute_loss(p, dmd_jax.random_batch(cfg, 4), cfg), params)
  assert {'homo_match', 'hetero_match'} <= set(aux['losses'])
  assert aux['outputs']['dict_act_homo'].shape == (4, 3, 16)
  assert aux['outputs']['dict_emb_hetero'].shape == (4, 3, 16)


@pytest.mark.slow
def test_short_dhmd_run_trains_and_exports_activations(tmp_path):
  run = smoke.get_config()
  run.data_dir = str(tmp_path / 'data')
  run.progress = False
  run.max_epochs = 2
  run.model.dictionary = mosi_dhmd.dictionary()
  run.model.dictionary.num_atoms = 16
  workdir = tmp_path / 'run'
  inputs.prepare_synthetic(run)
  experiment.run_training(run, str(workdir), progress=False, log=lambda *_: None)
  seed_dir = workdir / 'seed_1111'
  hist = [json.loads(l) for l in (seed_dir / 'metrics.jsonl').read_text().splitlines()]
  assert {'train/homo_match', 'train/hetero_match'} <= set(hist[0])
  assert hist[-1]['train/total'] < hist[0]['train/total']
  with np.load(seed_dir / 'dictionary_test.npz') as z:
    assert z['homo'].shape == (20, 3, 16) and z['hetero'].shape == (20, 3, 16)
    np.testing.assert_allclose(z['homo'].sum(-1), 1.0, atol=1e-5)
    assert sorted(z['index']) == list(range(20))
  summary = json.loads((seed_dir / 'dictionary_test_summary.json').read_text())
  assert summary['atoms'] == 16 and set(summary['homo']) == {'L', 'V', 'A'}
  top = summary['hetero']['V']['top_atoms']
  assert len(top) == 10 and top[0]['mean'] >= top[-1]['mean']
  assert (seed_dir / 'dictionary_test.png').stat().st_size > 0
  out = experiment.export_edges(load_run_config(str(workdir)), str(workdir), 'valid',
                                log=lambda *_: None)
  assert out['dictionary']['npz'].endswith('dictionary_valid.npz')
