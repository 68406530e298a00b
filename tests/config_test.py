"""Run configs: the released hyper-parameters have one home (dmd_jax.config), every model field
can be set from the command line, and a run stored before a field was listed decides the same
model."""

import dataclasses
import json
import subprocess
import sys

import pytest

from configs import mosei, mosi, mosi_dhmd
from dmd_jax.config import (BertConfig, DictionaryConfig, DMDConfig, RUN_DERIVED_FIELDS,
                            from_run_config, reference_config)
from dmd_jax.training import run_config
from helpers import cpu_env

REPO = __import__('pathlib').Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('module,dataset', [(mosi, 'mosi'), (mosei, 'mosei')])
@pytest.mark.parametrize('aligned', [True, False])
def test_run_configs_build_the_released_model(module, dataset, aligned):
  run = module.get_config('aligned' if aligned else 'unaligned')
  assert from_run_config(run, BertConfig()) == reference_config(dataset, aligned)
  settable = {f.name for f in dataclasses.fields(DMDConfig)} - set(RUN_DERIVED_FIELDS)
  assert set(run.model) == settable - {'dictionary'}


def _parse(*flags):
  """The DMDConfig a command line's --config flags give (parsed as the commands parse them)."""
  code = f"""
import dataclasses, json, sys
from absl import flags
from ml_collections import config_flags
from dmd_jax.config import BertConfig, from_run_config
cfg = config_flags.DEFINE_config_file('config', None, 'run config', lock_config=True)
sys.argv = {['prog', *flags]!r}     # config_flags reads the overrides from sys.argv
flags.FLAGS(sys.argv)
run = cfg.value
bert = BertConfig.from_dict(dict(run.random_bert))
print(json.dumps(dataclasses.asdict(from_run_config(run, bert))))
"""
  return subprocess.run([sys.executable, '-c', code], cwd=REPO, env=cpu_env(), capture_output=True,
                        text=True, timeout=120, check=False)


def test_every_model_field_is_set_from_the_command_line():
  res = _parse('--config=configs/mosi.py', '--config.model.gd_weight=0.2',
               '--config.model.decouple_weight=0.3', '--config.model.margin_scale=0.25',
               '--config.model.gd_size_homo=16', '--config.model.gd_reg=5.0',
               "--config.model.w_losses_homo=(2.0,20.0)", '--config.model.attention.impl=plain',
               '--config.text_encoder=random')
  assert res.returncode == 0, res.stderr[-2000:]
  got = json.loads(res.stdout.strip().splitlines()[-1])
  assert (got['gd_weight'], got['decouple_weight'], got['margin_scale'], got['gd_size_homo'],
          got['gd_reg'], got['w_losses_homo'], got['attention']['impl']) == (
              0.2, 0.3, 0.25, 16, 5.0, [2.0, 20.0], 'plain')
  res = _parse('--config=configs/mosi.py', '--config.model.gd_wieght=0.2')
  assert res.returncode != 0 and 'gd_wieght' in res.stderr


def test_dictionary_defaults_have_one_home_and_every_switch_is_settable():
  run = mosi_dhmd.get_config()
  assert from_run_config(run, BertConfig()).dictionary == DictionaryConfig()
  run.model.dictionary.temperature_end = 0.5     # None by default: still a float field
  run.model.dictionary.anneal_steps = 100
  d = from_run_config(run, BertConfig()).dictionary
  assert (d.temperature_end, d.anneal_steps, d.annealed) == (0.5, 100, True)


def test_a_run_stored_with_fewer_model_fields_decides_the_same_model(tmp_path):
  run = mosi.get_config()
  stored = json.loads(run.to_json_best_effort())
  for name in ('gd_weight', 'margin_scale', 'gd_size_homo', 'w_losses_homo'):
    del stored['model'][name]                    # as an older version stored it
  (tmp_path / 'config.json').write_text(json.dumps(stored))
  assert run_config.check_run_folder(run, str(tmp_path)) == []
  run.model.margin_scale = 0.3
  with pytest.raises(run_config.RunFolderMismatch, match=r'model.margin_scale 0.15 -> 0.3'):
    run_config.check_run_folder(run, str(tmp_path))


def test_modes_are_listed_once():
  for mode in run_config.MODES:
    run_config.validate_run(dict(mosi.get_config(), mode=mode))
  with pytest.raises(ValueError, match=r"config.mode='fit': must be one of \('train', 'eval', "):
    run_config.validate_run(dict(mosi.get_config(), mode='fit'))
