"""The YAML config: strict validation with messages that say what is valid."""

from __future__ import annotations

import re

import pytest

from bayesrace import ConfigError, load_config
from bayesrace.train import config_to_dict


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_valid_config_resolves_paths(tmp_path):
    config = load_config(write(tmp_path, "data:\n  train: data/train.xyz\nmodel:\n  preset: tiny\n  channels: 4\n"))
    assert config.data.train == str(tmp_path / "data" / "train.xyz")
    assert config.model.model_config().channels == 4
    assert config.model.model_config().n_layers == 2  # from the preset


def test_misspelt_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "data:\n  train: t.xyz\ntraining:\n  learning_rate: 0.01\n"))
    message = str(error.value)
    assert "learning_rate" in message and "section 'training'" in message and "lr" in message
    assert "config.yaml" in message


def test_unknown_top_level_key_suggests(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'ensemble'"):
        load_config(write(tmp_path, "data:\n  train: t.xyz\nensembel:\n  members: 2\n"))


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("data:\n  train: t.xyz\ntraining:\n  batch_size: four\n", "training.batch_size: expected an integer"),
        ("data:\n  train: t.xyz\nloss:\n  kind: nll_jeff\n", "loss.kind"),
        ("data:\n  train: t.xyz\nmodel:\n  preset: huge\n", "model.preset"),
        ("data:\n  train: t.xyz\nloss:\n  kind: nll_jef_equivariant\n", "model.covariance: equivariant"),
        ("model:\n  preset: tiny\n", "data.train is required"),
        ("data:\n  train: t.xyz\ndtype: float16\n", "dtype"),
        ("data: [1, 2]\n", "expected a mapping"),
        ("data:\n  train: t.xyz\nloss:\n  force_huber: 1.0\n", "bends the MSE force term, but loss.kind 'nll_jef'"),
        ("data:\n  train: t.xyz\nloss:\n  force_huber: -1\n", "loss.force_huber must be >= 0"),
        ("data:\n  train: t.xyz\nloss:\n  refit_energy_zero: true\n", "loss.refit_energy_zero acts at the start of the heads"),
    ],
)
def test_bad_values(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "data: [unclosed\n"))


# ---------------------------------------------------------------- posterior kinds

DATA = "data:\n  train: t.xyz\n"


def test_posterior_defaults_keep_existing_configs(tmp_path):
    config = load_config(write(tmp_path, DATA))
    assert config.posterior.kind == "ensemble" and config.ensemble.members == 4 and config.n_members == 4
    assert config.training.ema_decay == 0.99
    config = load_config(write(tmp_path, DATA + "ensemble:\n  members: 3\n"))
    assert config.n_members == 3
    swag = load_config(write(tmp_path, DATA + "posterior:\n  kind: swag\n"))
    assert swag.n_members == 1 and swag.posterior.swag.rank == 20 and swag.posterior.ivon is None
    ivon = load_config(write(tmp_path, DATA + "posterior:\n  kind: ivon\n  ivon:\n    lr: 0.2\n"))
    # the EMA applies to IVON's Adam warm start; start_epoch stays None (2/3 of max_epochs)
    assert ivon.training.ema_decay == 0.99 and ivon.posterior.ivon.start_epoch is None
    assert ivon.posterior.ivon.resolved_start_epoch(ivon.training.max_epochs) == 133
    assert ivon.posterior.ivon.lr == 0.2 and ivon.posterior.ivon.ess is None
    laplace = load_config(write(tmp_path, DATA + "posterior:\n  kind: laplace\n  samples: 6\n"))
    assert laplace.posterior.laplace.prior_precision is None and laplace.posterior.samples == 6
    # validation fills the defaults in once: validating again changes nothing
    before = config_to_dict(ivon)
    ivon.validate()
    assert config_to_dict(ivon) == before


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("posterior:\n  kind: swag\n  ivon:\n    lr: 0.1\n", "posterior.ivon applies only to posterior.kind 'ivon'"),
        ("posterior:\n  kind: ensemble\n  swag:\n    rank: 5\n", "posterior.swag applies only to posterior.kind 'swag'"),
        ("posterior:\n  kind: ivon\n  laplace: {}\n", "posterior.laplace applies only"),
        ("posterior:\n  kind: swag\nensemble:\n  members: 2\n", "ensemble.members applies only to posterior.kind 'ensemble'"),
        ("posterior:\n  kind: mve\nensemble:\n  members: 1\n", "ensemble.members applies only"),
        ("posterior:\n  kind: ivon\n  ivon:\n    start_epoch: 200\n", "posterior.ivon.start_epoch must lie in"),
        ("posterior:\n  kind: ivon\n  ivon:\n    start_epoch: -1\n", "posterior.ivon.start_epoch must lie in"),
        ("posterior:\n  kind: bayes\n", "posterior.kind is 'bayes'"),
        ("posterior:\n  kind: swag\n  swag:\n    ranks: 5\n", "unknown key 'ranks' in section 'posterior.swag'"),
        ("posterior:\n  kind: swag\n  swag:\n    start_epoch: 300\n", "posterior.swag.start_epoch must lie in"),
        ("posterior:\n  kind: laplace\n  samples: 5\n", "must be even"),
        ("posterior:\n  kind: ivon\n  ivon:\n    hess_init: 0\n", "posterior.ivon.hess_init must be > 0"),
        ("posterior:\n  kind: ivon\n  ivon:\n    train_samples: 0\n", "posterior.ivon.train_samples"),
        ("posterior:\n  kind: swag\n  samples: 0\n", "posterior.samples must be >= 1"),
        ("ensemble:\n  members: 0\n", "ensemble.members must be >= 1"),
        ("training:\n  ema_decay: 1.5\n", "training.ema_decay must lie in"),
    ],
)
def test_bad_posterior_settings(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.").replace("(", r"\(")):
        load_config(write(tmp_path, DATA + text))


# ---------------------------------------------------------------- pydantic-checked fields


def test_out_of_range_value_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.yaml: training\.lr must be > 0, got -0\.1$"):
        load_config(write(tmp_path, DATA + "training:\n  lr: -0.1\n"))


def test_unknown_nested_key_suggests_the_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'rnak' in section 'posterior\.swag' \(did you mean 'rank'\?\)"):
        load_config(write(tmp_path, DATA + "posterior:\n  kind: swag\n  swag:\n    rnak: 5\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("training:\n  lr: fast\n", "training.lr: expected a number, got str 'fast'"),
        ("training:\n  threads: true\n", "training.threads: expected an integer, got bool True"),
        ("data:\n  train: t.xyz\n  test:\n    a: 5\n", "data.test.a: expected a string, got int 5"),
        ("data:\n  train: t.xyz\n  reference_energies: 5\n",
         "data.reference_energies: expected a string or a mapping with a number per key, got int 5"),
    ],
)
def test_wrong_type_names_the_key_and_the_type(tmp_path, text, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, text if text.startswith("data") else DATA + text))


def test_empty_section_takes_the_defaults(tmp_path):
    config = load_config(write(tmp_path, DATA + "training:\nloss:\n"))
    assert config.training.lr == 5e-3 and config.loss.kind == "nll_jef"
    assert isinstance(load_config(write(tmp_path, DATA + "training:\n  lr: 1\n")).training.lr, float)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"md": {"structure": "s.xyz", "timestep": 0}}, "md.timestep must be > 0, got 0"),
        ({"candidate_fraction": 0}, "candidate_fraction must lie in (0, 1], got 0"),
        ({"oracle": {"workers": "2"}}, "oracle.workers: expected an integer, got str '2'"),
        ({"md": {"structure": "s.xyz", "thermostate": "nve"}}, "(did you mean 'thermostat'?)"),
    ],
)
def test_active_config_errors_name_the_key(tmp_path, change, message):
    from bayesrace.active import active_config_from_dict

    values = {"mode": "on_the_fly", "initial": "i.xyz", "training": {"model": {"preset": "tiny"}},
              "md": {"structure": "s.xyz"}, **change}
    with pytest.raises(ConfigError, match=re.escape(message)):
        active_config_from_dict(values, base_dir=tmp_path)


def test_exponent_without_a_dot_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML's default) reads 1e-5 as a string; a config means the number
    config = load_config(write(tmp_path, DATA + "training:\n  lr: 1e-3\n  min_lr: 1E-6\nloss:\n  energy_weight: 2e0\n"))
    assert (config.training.lr, config.training.min_lr, config.loss.energy_weight) == (1e-3, 1e-6, 2.0)
