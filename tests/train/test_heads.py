"""The variance heads' own training: the log-variance offsets and ``loss.means: frozen``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bayesrace import keys, load_config, load_posterior
from bayesrace.data import iterate_batches
from bayesrace.train import CHECKPOINT, train
from bayesrace.train import _loop
from bayesrace.train._data import prepare_data
from bayesrace.train._heads import fit_head_offsets
from bayesrace.train._losses import force_mahalanobis_and_logdet
from bayesrace.train._members import new_member_model
from conftest import write_training_config

FROZEN = {"kind": "nll_jef", "mse_warmup_epochs": 0, "means": "frozen", "heads_fraction": 0.5}


def history(run_dir, member=0):
    lines = (Path(run_dir) / f"member_{member}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def predictions(run_dir, frames):
    posterior = load_posterior(Path(run_dir) / "posterior.pt")
    member = posterior.members[0]
    member.eval()
    return [member(batch) for batch in frames]


def test_the_offsets_shift_the_variances_exactly_and_old_models_load_without_them(psb3_small, tmp_path):
    config = load_config(write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run"))
    data = prepare_data(config)
    model = new_member_model(config, data, 0)
    model.eval()
    batch = next(iter(iterate_batches(data.valid, 4, shuffle=False, dtype=torch.float64)))
    before = model(batch)
    legacy = {name: value for name, value in model.state_dict().items() if name != "head_log_variance_offset"}
    with torch.no_grad():
        model.head_log_variance_offset.copy_(torch.tensor([-1.5, 0.7], dtype=torch.float64))
    after = model(batch)
    assert torch.equal(after[keys.ENERGY], before[keys.ENERGY])
    assert torch.allclose(after[keys.ENERGY_VARIANCE], before[keys.ENERGY_VARIANCE] * torch.exp(torch.tensor(-1.5)),
                          rtol=1e-12)
    # the floor is added after the scale: (Σ − floor)·e^0.7 + floor
    floor = model.covariance_floor * torch.eye(3, dtype=torch.float64)
    expected = (before[keys.FORCE_COVARIANCE] - floor) * torch.exp(torch.tensor(0.7)) + floor
    assert torch.allclose(after[keys.FORCE_COVARIANCE], expected, rtol=1e-10)
    # a state dict saved before the offsets existed loads with zero offsets
    model.load_state_dict(legacy)
    assert torch.equal(model.head_log_variance_offset.detach(), torch.zeros(2, dtype=torch.float64))
    assert torch.equal(model(batch)[keys.ENERGY_VARIANCE], before[keys.ENERGY_VARIANCE])


def test_fitted_offsets_make_the_scaled_residuals_one_on_average(psb3_small, tmp_path):
    config = load_config(write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run"))
    data = prepare_data(config)
    model = new_member_model(config, data, 0)
    offsets = fit_head_offsets(model, data.train, config, rounds=3)
    assert abs(offsets["energy"]) > 0.1  # it moved (a random model's force residuals happen to sit near its σ)
    model.eval()
    energy, force, n_structures, n_atoms = 0.0, 0.0, 0, 0
    for batch in iterate_batches(data.train, 8, shuffle=False, dtype=torch.float64):
        pred = model(batch)
        energy += float(((pred[keys.ENERGY] - batch[keys.ENERGY]) ** 2 / pred[keys.ENERGY_VARIANCE]).sum().detach())
        mahalanobis, _ = force_mahalanobis_and_logdet(pred[keys.FORCES].detach() - batch[keys.FORCES],
                                                      pred[keys.FORCE_COVARIANCE].detach())
        force += float(mahalanobis.sum()) / 3.0
        n_structures += len(pred[keys.ENERGY])
        n_atoms += len(mahalanobis)
    assert energy / n_structures == pytest.approx(1.0, rel=1e-6)
    assert force / n_atoms == pytest.approx(1.0, rel=1e-2)  # the covariance floor makes it inexact


def test_frozen_means_are_exactly_the_mse_models_and_the_heads_learn(psb3_small, tmp_path):
    frozen = write_training_config(tmp_path / "f.yaml", psb3_small, tmp_path / "frozen", loss=FROZEN,
                                   training={"max_epochs": 6})
    train(load_config(frozen), progress=False)
    mse = write_training_config(tmp_path / "m.yaml", psb3_small, tmp_path / "mse",
                                loss={"kind": "mse", "mse_warmup_epochs": 0}, training={"max_epochs": 3})
    train(load_config(mse), progress=False)

    entries = history(tmp_path / "frozen")
    assert [entry["loss_kind"] for entry in entries] == ["mse"] * 3 + ["nll_jef"] * 3
    assert entries[-1]["valid_loss"] < entries[3]["valid_loss"]  # the heads learned
    # the MSE phase is the MSE run, epoch by epoch
    assert [e["valid_loss"] for e in entries[:3]] == [e["valid_loss"] for e in history(tmp_path / "mse")]

    data = prepare_data(load_config(frozen))
    frames = list(iterate_batches(data.valid, 4, shuffle=False, dtype=torch.float64))
    for a, b in zip(predictions(tmp_path / "frozen", frames), predictions(tmp_path / "mse", frames)):
        assert torch.equal(a[keys.ENERGY], b[keys.ENERGY])
        assert torch.equal(a[keys.FORCES], b[keys.FORCES])
        assert torch.isfinite(a[keys.ENERGY_VARIANCE]).all() and (a[keys.ENERGY_VARIANCE] > 0).all()


@pytest.mark.parametrize("budget, kinds", [
    ({"max_epochs": 3}, ["mse", "mse", "nll_jef"]),  # 0.2 of 3 epochs: still the last one
    ({"max_epochs": 50, "max_minutes": 0.0001}, ["mse", "nll_jef"]),  # out of time after one epoch
])
def test_the_heads_always_get_an_epoch(psb3_small, tmp_path, budget, kinds):
    config = write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run",
                                   loss={**FROZEN, "heads_fraction": 0.2}, training=budget)
    train(load_config(config), progress=False)
    assert [entry["loss_kind"] for entry in history(tmp_path / "run")] == kinds


def test_a_heads_phase_resumes_exactly(psb3_small, tmp_path, monkeypatch):
    straight = write_training_config(tmp_path / "s.yaml", psb3_small, tmp_path / "straight", loss=FROZEN,
                                     training={"max_epochs": 6})
    train(load_config(straight), progress=False)
    split = write_training_config(tmp_path / "r.yaml", psb3_small, tmp_path / "split", loss=FROZEN,
                                  training={"max_epochs": 6})
    finished = _loop._finished
    monkeypatch.setattr(_loop, "_finished", lambda state, config: state["epoch"] == 5 or finished(state, config))
    train(load_config(split), progress=False)  # stops after epoch 5, in the heads phase
    assert len(history(tmp_path / "split")) == 5
    monkeypatch.setattr(_loop, "_finished", finished)
    train(load_config(split), progress=False)
    assert [{**e, "elapsed_s": 0} for e in history(tmp_path / "split")] == \
        [{**e, "elapsed_s": 0} for e in history(tmp_path / "straight")]
    a = torch.load(tmp_path / "split" / "member_0" / CHECKPOINT, weights_only=False)["model"]
    b = torch.load(tmp_path / "straight" / "member_0" / CHECKPOINT, weights_only=False)["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_frozen_means_need_an_nll_loss_and_a_member_posterior(psb3_small, tmp_path):
    import yaml

    from bayesrace import ConfigError

    path = write_training_config(tmp_path / "a.yaml", psb3_small, tmp_path / "a", loss=FROZEN,
                                 posterior={"kind": "swag"},
                                 training={"max_epochs": 200})
    values = yaml.safe_load(path.read_text())
    del values["ensemble"]
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match="loss.means 'frozen'.*swag"):
        load_config(path)
    with pytest.raises(ConfigError, match="loss.means 'frozen'.*'mse'"):
        load_config(write_training_config(tmp_path / "b.yaml", psb3_small, tmp_path / "b",
                                          loss={**FROZEN, "kind": "mse"}))


def test_the_energy_zero_moves_to_the_median_of_the_distinct_structures(psb3_small, tmp_path):
    import dataclasses

    from bayesrace.train._heads import refit_energy_zero

    config = load_config(write_training_config(tmp_path / "c.yaml", psb3_small, tmp_path / "run"))
    data = prepare_data(config)
    model = new_member_model(config, data, 0)
    model.eval()
    graphs = data.train[:3]
    batch = next(iter(iterate_batches(graphs, 3, shuffle=False, dtype=torch.float64)))
    before = model(batch)
    with torch.no_grad():
        model.energy_shift += 1.0
    unit = model(batch)
    per_unit_shift = (unit[keys.ENERGY] - before[keys.ENERGY]).detach()  # Σ_i gate_i ≈ N
    with torch.no_grad():
        model.energy_shift -= 1.0
    # labels 0.01, 0.02 and 0.5 eV per unit of shift above the model; the last one ten times over:
    # the median of the distinct structures is 0.02 (of all copies it would be 0.5)
    residual = [0.01, 0.02, 0.5]
    labelled = [dataclasses.replace(g, energy=float(before[keys.ENERGY][i].detach() + residual[i] * per_unit_shift[i]))
                for i, g in enumerate(graphs)]
    move = refit_energy_zero(model, labelled + [labelled[2]] * 10, config)
    assert move == pytest.approx(0.02, abs=1e-12)
    after = model(batch)
    assert float(after[keys.ENERGY][1]) == pytest.approx(labelled[1].energy, abs=1e-9)
    # the shift rides on the isolation gate g = 1 − exp(−2 Σ b₁): forces see it through g's slope
    # alone, linearly, and (g ≈ 1 inside a molecule) by less than the move per Å
    force_move = (after[keys.FORCES] - before[keys.FORCES]).detach()
    assert torch.allclose(force_move, move * (unit[keys.FORCES] - before[keys.FORCES]).detach(), rtol=1e-6, atol=1e-12)
    assert 0 < float(force_move.abs().max()) < move


def test_refit_energy_zero_in_training_moves_energies_not_forces(psb3_small, tmp_path):
    frozen = write_training_config(tmp_path / "f.yaml", psb3_small, tmp_path / "frozen", loss=FROZEN,
                                   training={"max_epochs": 4})
    train(load_config(frozen), progress=False)
    refit = write_training_config(tmp_path / "r.yaml", psb3_small, tmp_path / "refit",
                                  loss={**FROZEN, "refit_energy_zero": True}, training={"max_epochs": 4})
    train(load_config(refit), progress=False)
    data = prepare_data(load_config(refit))
    frames = list(iterate_batches(data.train, 4, shuffle=False, dtype=torch.float64))
    residuals = {name: [] for name in ("frozen", "refit")}
    forces = {"refit": []}
    for name in residuals:
        for batch, pred in zip(frames, predictions(tmp_path / name, frames)):
            residuals[name].append(((batch[keys.ENERGY] - pred[keys.ENERGY]) / batch[keys.NUM_ATOMS]).detach())
            if name == "refit":
                reference = predictions(tmp_path / "frozen", [batch])[0]
                forces[name].append((pred[keys.FORCES] - reference[keys.FORCES]).detach())
    frozen_median, refit_median = (float(torch.cat(r).median()) for r in residuals.values())
    # forces move only through the gate's slope: by less than the energy zero's move per Å
    assert float(torch.cat(forces["refit"]).abs().max()) < 1.5 * abs(frozen_median)
    assert abs(frozen_median) > 1e-4  # a 2-epoch MSE phase leaves the energy zero off
    assert abs(refit_median) < 0.05 * abs(frozen_median)
