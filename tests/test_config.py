"""The YAML config: strict validation with messages that say what is valid."""

from __future__ import annotations

import pytest

from bayesrace import ConfigError, load_config


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
