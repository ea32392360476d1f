"""Posterior kinds: SWAG moments and sampling against direct computations, IVON seeded
and resumable, and every kind trained briefly into a posterior whose predictive is sane."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from bayesrace import keys, load_config, load_posterior
from bayesrace.data import collate, read_frames, TypeMap, frames_to_graphs
from bayesrace.bayes import SwagCollector
from bayesrace.train import _loop as train_loop
from bayesrace.train import _progress as train_progress
from bayesrace.train import CHECKPOINT, train
from conftest import write_training_config

SAMPLES = 4


def run_config(tmp_path, data_dir, name, kind, training=None, **posterior):
    """A config for a short run of one posterior kind (ensemble members only for 'ensemble')."""
    return write_training_config(
        tmp_path / f"{name}.yaml",
        data_dir,
        tmp_path / name,
        data={"max_train": 12},
        training={"max_epochs": 2, "batch_size": 4, **(training or {})},
        posterior={"kind": kind, "samples": SAMPLES, **posterior},
        ensemble={"members": 2} if kind == "ensemble" else None,
    )


def history(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "member_0" / "metrics.jsonl").read_text().splitlines()]


def flat_members(posterior):
    return [torch.cat([p.detach().reshape(-1) for p in m.parameters()]) for m in posterior.members]


# ---------------------------------------------------------------- SWAG, no training


def direct_swag_moments(snapshots, rank):
    """Mean, second moment and the last `rank` deviations θ_t − mean(θ_1..θ_t), with numpy."""
    snapshots = np.asarray(snapshots)
    mean = snapshots.mean(axis=0)
    second = (snapshots**2).mean(axis=0)
    deviations = np.array([snapshots[t] - snapshots[: t + 1].mean(axis=0) for t in range(len(snapshots))])
    return mean, second, deviations[-rank:]


def test_swag_moments_match_a_direct_computation_on_a_tiny_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64)
    n_parameters = sum(p.numel() for p in model.parameters())
    rank = 3
    collector = SwagCollector(n_parameters, rank)
    seen = []
    for _ in range(7):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()
        vector = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        seen.append(vector.numpy().copy())
        collector.collect(vector)
    mean, second, deviations = direct_swag_moments(seen, rank)
    assert collector.count == 7
    np.testing.assert_allclose(collector.mean.numpy(), mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(collector.sq_mean.numpy(), second, rtol=0, atol=1e-12)
    np.testing.assert_allclose(collector.deviations.numpy(), deviations, rtol=0, atol=1e-12)
    np.testing.assert_allclose(collector.diagonal_variance.numpy(), np.clip(second - mean**2, 0, None), atol=1e-12)
    # round trip through the checkpoint form
    restored = SwagCollector.from_state_dict(collector.state_dict())
    assert restored.count == 7 and torch.equal(restored.deviations, collector.deviations)


def test_swag_samples_have_the_swag_covariance():
    rng = np.random.default_rng(3)
    rank = 3
    collector = SwagCollector(4, rank)
    snapshots = rng.normal(size=(6, 4)) * np.array([1.0, 0.5, 2.0, 0.1]) + np.array([1.0, -2.0, 0.0, 3.0])
    for snapshot in snapshots:
        collector.collect(torch.tensor(snapshot))
    mean, second, deviations = direct_swag_moments(snapshots, rank)
    expected = np.diag((second - mean**2) / 2) + deviations.T @ deviations / (2 * (rank - 1))

    generator = torch.Generator().manual_seed(0)
    n = 40000
    samples = torch.stack([collector.sample(generator) for _ in range(n)]).numpy()
    np.testing.assert_allclose(samples.mean(axis=0), mean, atol=4 * np.sqrt(np.diag(expected) / n).max())
    observed = np.cov(samples, rowvar=False)
    # standard error of a sample covariance of Gaussians: sqrt((C_ii C_jj + C_ij²)/n)
    tolerance = 5 * np.sqrt((np.outer(np.diag(expected), np.diag(expected)) + expected**2) / n)
    assert np.all(np.abs(observed - expected) < tolerance), (observed, expected)
    np.testing.assert_allclose(collector.covariance().numpy(), expected, atol=1e-12)


# ---------------------------------------------------------------- training each kind


def assert_sane_posterior(path, kind, n_members, valid_file):
    posterior = load_posterior(path)
    assert posterior.kind == kind
    assert len(posterior.members) == n_members
    frames = read_frames(str(valid_file))[:3]
    type_names = posterior.type_names
    batch = collate(frames_to_graphs(frames, TypeMap(type_names), posterior.cutoff), dtype=torch.float64)
    out = posterior(batch)
    for name in (keys.ENERGY, keys.FORCES, keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC,
                 keys.ATOMIC_FORCE_STD, keys.ATOMIC_FORCE_STD_EPISTEMIC):
        assert torch.isfinite(out[name]).all(), name
    if n_members > 1:
        assert (out[keys.ATOMIC_FORCE_STD_EPISTEMIC] > 0).all()
        assert (out[keys.ENERGY_VAR_EPISTEMIC] > 0).all()
    assert_deployable_reproduces(posterior, path, frames[0])
    return posterior


def assert_deployable_reproduces(posterior, path, frame):
    """The exported M weight sets give, through the C++ engine, the predictive mean and
    variance of the Python posterior, whatever kind made them."""
    import ase

    from bayesrace import _bayesrace_core as core
    from bayesrace.calculator import UNCERTAINTY_RESULTS, BayesRaceCalculator
    from bayesrace.export import export_posterior
    from deployable_tools import engine_results

    deployable = Path(path).with_name("deployable.pt")
    meta = export_posterior(posterior, deployable)
    assert meta[keys.META_N_MEMBERS] == len(posterior.members)
    assert meta[keys.META_POSTERIOR] == posterior.kind
    atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions)
    calculator = BayesRaceCalculator(posterior)
    atoms.calc = calculator
    calculator.calculate(atoms, ["energy", "forces"])
    got = engine_results(core.Engine(str(deployable)), atoms, posterior.cutoff)
    for name in ["energy", "forces"] + list(UNCERTAINTY_RESULTS):
        np.testing.assert_allclose(got[name], calculator.results[name], rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.fixture(scope="module")
def mve_run(psb3_small, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mve")
    return train(load_config(run_config(tmp_path, psb3_small, "mve", "mve")), progress=False)


def test_mve_and_ensemble(psb3_small, mve_run, tmp_path):
    mve = assert_sane_posterior(mve_run, "mve", 1, psb3_small / "valid.xyz")
    train(load_config(run_config(tmp_path, psb3_small, "ens", "ensemble")), progress=False)
    ensemble = assert_sane_posterior(tmp_path / "ens" / "posterior.pt", "ensemble", 2, psb3_small / "valid.xyz")
    # an MVE is an ensemble's member 0 (same seed, same training)
    for a, b in zip(mve.members[0].parameters(), ensemble.members[0].parameters()):
        assert torch.equal(a, b)


def test_swag_trains_collects_and_samples(psb3_small, tmp_path, monkeypatch):
    seen = []
    original = SwagCollector.collect

    def recording_collect(self, weights):
        seen.append(weights.detach().numpy().copy())
        original(self, weights)

    monkeypatch.setattr(SwagCollector, "collect", recording_collect)
    swag = {"start_epoch": 1, "collect_every": 1, "rank": 4, "lr": 0.002}
    config = run_config(tmp_path, psb3_small, "swag", "swag", training={"max_epochs": 3}, swag=swag)
    path = train(load_config(config), progress=False)
    posterior = assert_sane_posterior(path, "swag", SAMPLES, psb3_small / "valid.xyz")

    # 12 structures in batches of 4: 3 steps per epoch, collected in epochs 2 and 3
    assert len(seen) == 6
    state = torch.load(tmp_path / "swag" / "member_0" / CHECKPOINT, weights_only=False)["state"]
    mean, second, deviations = direct_swag_moments(seen, 4)
    np.testing.assert_allclose(state["swag"]["mean"].numpy(), mean, atol=1e-12)
    np.testing.assert_allclose(state["swag"]["sq_mean"].numpy(), second, atol=1e-12)
    np.testing.assert_allclose(state["swag"]["deviations"].numpy(), deviations, atol=1e-12)
    assert [entry["lr"] for entry in history(tmp_path / "swag")][1:] == [0.002, 0.002]
    summary = posterior.record_info["swag"]
    assert summary["snapshots"] == 6 and summary["rank"] == 4 and summary["start_epoch"] == 1
    # the samples scatter around the SWA mean, on the scale of the SWAG spread
    members = torch.stack(flat_members(posterior)).numpy()
    spread = np.sqrt(np.diag(np.diag(second - mean**2) / 2 + deviations.T @ deviations / 6))
    z = (members - mean) / np.where(spread > 0, spread, 1)
    assert np.all(np.abs(z[:, spread > 0]) < 8) and members.std(axis=0).max() > 0


def test_swag_resumes_exactly(psb3_small, tmp_path):
    swag = {"start_epoch": 1, "rank": 3}
    train(load_config(run_config(tmp_path, psb3_small, "straight", "swag", {"max_epochs": 3}, swag=swag)),
          progress=False)
    train(load_config(run_config(tmp_path, psb3_small, "split", "swag", {"max_epochs": 2}, swag=swag)),
          progress=False)
    train(load_config(run_config(tmp_path, psb3_small, "split", "swag", {"max_epochs": 3}, swag=swag)),
          progress=False)
    a = torch.load(tmp_path / "straight" / "member_0" / CHECKPOINT, weights_only=False)["state"]["swag"]
    b = torch.load(tmp_path / "split" / "member_0" / CHECKPOINT, weights_only=False)["state"]["swag"]
    assert a["count"] == b["count"] == 2
    for name in ("mean", "sq_mean", "deviations"):
        assert torch.equal(a[name], b[name]), name
    for x, y in zip(flat_members(load_posterior(tmp_path / "straight" / "posterior.pt")),
                    flat_members(load_posterior(tmp_path / "split" / "posterior.pt"))):
        assert torch.equal(x, y)


def test_ivon_is_seeded_resumable_and_samples_differ(psb3_small, tmp_path):
    ivon = {"start_epoch": 0, "lr": 0.1, "hess_init": 0.5, "train_samples": 2}  # IVON from the start
    first = train(load_config(run_config(tmp_path, psb3_small, "a", "ivon", ivon=ivon)), progress=False)
    # the same run again, from scratch, stopped after one epoch and resumed: identical
    train(load_config(run_config(tmp_path, psb3_small, "c", "ivon", {"max_epochs": 1}, ivon=ivon)), progress=False)
    resumed = train(load_config(run_config(tmp_path, psb3_small, "c", "ivon", ivon=ivon)), progress=False)
    posterior = assert_sane_posterior(first, "ivon", SAMPLES, psb3_small / "valid.xyz")
    members = flat_members(posterior)
    for x, y in zip(members, flat_members(load_posterior(resumed))):
        assert torch.equal(x, y)
    assert not torch.equal(members[0], members[1])
    assert [e["valid_loss"] for e in history(tmp_path / "a")] == [e["valid_loss"] for e in history(tmp_path / "c")]
    # a different seed gives other weights
    other_seed = write_training_config(
        tmp_path / "d.yaml", psb3_small, tmp_path / "d", seed=1, data={"max_train": 12},
        training={"max_epochs": 2, "batch_size": 4}, posterior={"kind": "ivon", "samples": SAMPLES, "ivon": ivon},
        ensemble=None,
    )
    different = flat_members(load_posterior(train(load_config(other_seed), progress=False)))
    assert not torch.equal(members[0], different[0])
    summary = posterior.record_info["ivon"]
    # default ess: half the training atoms (12 structures)
    n_atoms = sum(len(frame.positions) for frame in read_frames(str(psb3_small / "train.xyz"))[:12])
    assert summary["ess"] == n_atoms / 2 and summary["mean_weight_std"] > 0


WARM_IVON = {"start_epoch": 1, "lr": 0.05, "hess_init": 2.0, "train_samples": 2}


def test_ivon_warm_start_trains_like_the_mve_then_switches(psb3_small, mve_run, tmp_path, monkeypatch):
    started = []
    original = train_loop._start_ivon

    def recording_start(model, state, config, data):
        warm_best = {k: v.clone() for k, v in state["best_state"].items()}
        result = original(model, state, config, data)
        started.append((state["epoch"], warm_best, {k: v.clone() for k, v in model.state_dict().items()}))
        return result

    monkeypatch.setattr(train_loop, "_start_ivon", recording_start)
    config = run_config(tmp_path, psb3_small, "warm", "ivon", {"max_epochs": 3}, ivon=WARM_IVON)
    path = train(load_config(config), progress=False)
    posterior = assert_sane_posterior(path, "ivon", SAMPLES, psb3_small / "valid.xyz")

    # Adam (the MVE's optimizer, with its EMA) for epoch 1, IVON for epochs 2 and 3
    entries = history(tmp_path / "warm")
    assert [e["optimizer"] for e in entries] == ["adamw", "ivon", "ivon"]
    assert posterior.record_info["ivon"]["start_epoch"] == 1
    # the warm-start epoch is exactly the MVE's first epoch (same seed, same training)
    mve_first = history(Path(mve_run).parent)[0]
    assert {k: v for k, v in entries[0].items() if k not in ("elapsed_s", "optimizer")} == \
        {k: v for k, v in mve_first.items() if k != "elapsed_s"}
    # IVON's mean starts from the best validated (EMA) weights of the warm start
    assert len(started) == 1 and started[0][0] == 1
    _, warm_best, mean_at_switch = started[0]
    for name, value in warm_best.items():
        assert torch.equal(mean_at_switch[name], value), name
    checkpoint = torch.load(tmp_path / "warm" / "member_0" / CHECKPOINT, weights_only=False)
    assert checkpoint["optimizer_kind"] == "ivon" and checkpoint["ema"] is None
    assert checkpoint["state"]["ivon_start_epoch"] == 1 and checkpoint["ivon_step"] == 2 * 3  # 3 steps/epoch


class _Killed(Exception):
    pass


def test_ivon_resumes_exactly_across_the_switch(psb3_small, tmp_path, monkeypatch):
    straight = train(load_config(run_config(tmp_path, psb3_small, "straight", "ivon", {"max_epochs": 3},
                                            ivon=WARM_IVON)), progress=False)
    original_update = train_progress.EpochProgress.update
    # killed right after the checkpoint of epoch 1 (holds Adam's state; the switch comes on
    # resumption) and again after that of epoch 2 (holds IVON's)
    for kill_after in (1, 2):
        def killing_update(self, entry, kill_after=kill_after):
            original_update(self, entry)
            if entry["epoch"] == kill_after:
                raise _Killed

        monkeypatch.setattr(train_progress.EpochProgress, "update", killing_update)
        with pytest.raises(_Killed):
            train(load_config(run_config(tmp_path, psb3_small, "split", "ivon", {"max_epochs": 3}, ivon=WARM_IVON)),
                  progress=False)
        checkpoint = torch.load(tmp_path / "split" / "member_0" / CHECKPOINT, weights_only=False)
        assert checkpoint["optimizer_kind"] == ("adamw" if kill_after == 1 else "ivon")
    monkeypatch.setattr(train_progress.EpochProgress, "update", original_update)
    resumed = train(load_config(run_config(tmp_path, psb3_small, "split", "ivon", {"max_epochs": 3}, ivon=WARM_IVON)),
                    progress=False)
    for x, y in zip(flat_members(load_posterior(straight)), flat_members(load_posterior(resumed))):
        assert torch.equal(x, y)
    drop = ("elapsed_s",)
    assert [{k: v for k, v in e.items() if k not in drop} for e in history(tmp_path / "straight")] == \
        [{k: v for k, v in e.items() if k not in drop} for e in history(tmp_path / "split")]


def test_ivon_that_never_started_says_so(psb3_small, tmp_path):
    config = load_config(run_config(tmp_path, psb3_small, "late", "ivon", {"max_epochs": 3}, ivon=WARM_IVON))
    config.training.max_epochs = 1  # as if resumed with fewer epochs: training ends before the switch
    with pytest.raises(RuntimeError, match="IVON never trained"):
        train(config, progress=False)


def test_laplace_kind_samples_around_the_mve(psb3_small, mve_run, tmp_path):
    pytest.importorskip("bayesrace.bayes._laplace")
    config = run_config(tmp_path, psb3_small, "laplace", "laplace", laplace={"max_structures": 8})
    path = train(load_config(config), progress=False)
    posterior = assert_sane_posterior(path, "laplace", SAMPLES, psb3_small / "valid.xyz")
    assert posterior.record_info.get("laplace") is not None
    # the MVE it started from is the member an MVE run trains
    mve = load_posterior(mve_run).members[0]
    frames = read_frames(str(psb3_small / "valid.xyz"))[:3]
    batch = collate(frames_to_graphs(frames, TypeMap(mve.type_names), mve.cutoff), dtype=torch.float64)
    # antithetic samples: their mean energy is the MVE's (E is linear in the last-layer weights)
    torch.testing.assert_close(posterior(batch)[keys.ENERGY], mve(batch)[keys.ENERGY], rtol=0, atol=1e-8)
