"""Pool-based active learning: the loop end to end, kill safety, warm starts, oracles, config errors.

(The on-the-fly mode is tests/active/test_active_onthefly.py.)"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from al_tools import CountingOracle, training_section
from conftest import ROOT


def _al_values(data_dir, out, **overrides):
    values = {
        "mode": "pool",
        "out": str(out),
        "pool": str(data_dir / "train.xyz"),
        "n_initial": 8,
        "seed": 3,
        "strategy": "bald_f",
        "batch_size": 4,
        "n_rounds": 2,
        "training": training_section(data_dir),
        "test": {"test_id": str(data_dir / "test_id.xyz")},
        "oracle": {"kind": "tblite", "charge": 1.0},
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def two_round_run(psb3_small, tmp_path_factory):
    """The two-round loop with tblite labels, run once through the CLI for the module."""
    from bayesrace.cli import main

    out = tmp_path_factory.mktemp("al") / "run"
    config_path = out.parent / "al.yaml"
    config_path.write_text(yaml.safe_dump(_al_values(psb3_small, out)))
    assert main(["al", str(config_path), "--quiet"]) == 0
    return out, config_path


def test_two_round_loop_writes_learning_curve(two_round_run, psb3_small):
    from bayesrace.active import read_labelled
    from bayesrace.data import read_frames
    out, _ = two_round_run
    curve = json.loads((out / "learning_curve.json").read_text())
    assert [p["n_labels"] for p in curve["points"]] == [8, 12, 16]
    assert [p["n_acquired"] for p in curve["points"]] == [0, 4, 8]
    for point in curve["points"]:
        metrics = point["test"]["test_id"]
        assert metrics["forces_mae_eV_per_A"] > 0 and metrics["forces_rmse_eV_per_A"] >= metrics["forces_mae_eV_per_A"]
        assert np.isfinite(metrics["forces_nll"]) and np.isfinite(metrics["energy_rmse_eV"])
        assert point["time_s"]["train"] > 0
    assert curve["points"][1]["time_s"]["select"] > 0 and curve["points"][1]["time_s"]["label"] > 0
    assert (out / "learning_curve.png").stat().st_size > 1000

    # 16 distinct pool structures labelled, each once; the selections are disjoint from the initial picks
    state = json.loads((out / "state.json").read_text())
    picks = state["initial_picks"] + state["rounds"][0]["selected"] + state["rounds"][1]["selected"]
    assert len(set(picks)) == 16
    labelled = read_labelled(out / "labelled.xyz")
    assert sorted(labelled) == sorted(picks)
    assert len(read_frames(out / "labelled.xyz")) == 16
    # the labels are GFN2-xTB's on the pool geometry (the pool file's own labels came from the same method)
    pool = read_frames(psb3_small / "train.xyz")
    index = state["rounds"][1]["selected"][0]
    # (to SCF convergence: the generator restarts each SCF from the previous MD step's wavefunction)
    np.testing.assert_allclose(labelled[index].get_forces(), pool[index].forces, atol=2e-3)
    np.testing.assert_allclose(labelled[index].get_potential_energy(), pool[index].energy, atol=1e-4)
    assert labelled[index].info["al_round"] == 2
    # round 2 trains on initial + both batches
    assert len(read_frames(out / "round_2" / "train.xyz")) == 16

    # what each round picked: its σ's at the time and the pool's own tags (PSB3: temperature_K, config_type)
    for record in state["rounds"][:2]:
        assert [p["pool_index"] for p in record["picks"]] == record["selected"]
        for pick in record["picks"]:
            assert 0 < pick["max_force_sigma_epistemic"] <= pick["max_force_sigma"] and pick["n_atoms"] == 14
            assert "temperature_K" in pick["tags"] and "energy" not in pick["tags"]
    picked = curve["points"][1]["picked"]
    assert picked["n"] == 4 and sum(picked["tag temperature_K"].values()) == 4
    assert curve["points"][0]["picked"] == {}


def test_pick_summary_counts_tags_and_averages_many_valued_ones(tmp_path):
    import ase
    import ase.io

    from bayesrace.active._picks import pool_tags, summarize_picks

    frames = []
    for k in range(3):
        atoms = ase.Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74 + 0.01 * k]])
        atoms.info.update(energy=-1.0 - k, config_type="md" if k else "scan", temperature_K=300 + 100 * k)
        frames.append(atoms)
    ase.io.write(tmp_path / "pool.xyz", frames)
    tags = pool_tags(tmp_path / "pool.xyz")
    assert tags[2] == {"config_type": "md", "temperature_K": 500}  # the label is not a tag
    picks = [dict(pool_index=i, n_atoms=2, max_force_sigma=0.1 * (i + 1), max_force_sigma_epistemic=0.05,
                  energy_sigma_epistemic_meV_per_atom=1.0, tags=tags[i]) for i in range(3)]
    summary = summarize_picks(picks)
    assert summary["tag config_type"] == {"md": 2, "scan": 1}
    assert summary["tag temperature_K"] == {"300": 1, "400": 1, "500": 1}
    assert summary["mean_max_force_sigma"] == pytest.approx(0.2) and summary["n"] == 3
    many = [dict(p, tags={"frame_time": float(k)}) for k, p in enumerate(picks * 8)]  # 24 distinct values
    assert summarize_picks(many)["tag frame_time (mean)"] == pytest.approx(11.5)
    assert summarize_picks([]) == {}


def test_rounds_are_warm_started_from_the_previous_posterior(two_round_run):
    from bayesrace.active import load_active_config, round_training_config
    from bayesrace.bayes import load_posterior
    from bayesrace.train import initial_member_model, prepare_data

    out, config_path = two_round_run
    config = load_active_config(config_path)
    round_1 = round_training_config(config, 1, str(out / "round_1" / "train.xyz"))
    assert round_1.training.init_from == str(out / "round_0" / "posterior.pt")
    assert json.loads((out / "round_1" / "config.json").read_text())["training"]["init_from"] == \
        round_1.training.init_from
    data = prepare_data(round_1)
    previous = load_posterior(out / "round_0" / "posterior.pt")
    round_1_final = load_posterior(out / "round_1" / "posterior.pt")
    cold = round_training_config(config, 1, str(out / "round_1" / "train.xyz"))
    cold.training.init_from = None
    for member in range(2):
        warm = initial_member_model(round_1, data, member).state_dict()
        fresh = initial_member_model(cold, data, member).state_dict()
        before = previous.members[member].state_dict()
        after = round_1_final.members[member].state_dict()
        for name, value in before.items():
            torch.testing.assert_close(warm[name], value, rtol=0, atol=0)
        weights = [n for n, v in before.items() if v.is_floating_point() and v.numel() > 8]
        assert any(not torch.equal(fresh[n], before[n]) for n in weights)  # not a fresh initialisation
        assert any(not torch.equal(after[n], before[n]) for n in weights)  # and it trained on from there
    # the members differ from each other (member m starts from member m)
    first, second = (initial_member_model(round_1, data, m).state_dict() for m in range(2))
    assert any(not torch.equal(first[n], second[n]) for n in first if first[n].is_floating_point())


def test_init_shrink_mixes_the_warm_start_with_a_fresh_initialisation(two_round_run):
    """training.init_shrink λ: parameters λ × round 0's + (1 − λ) × the seeded fresh ones, buffers
    round 0's; round 0 of a loop drops it, and a loop without warm starts rejects it."""
    from bayesrace.active import load_active_config, round_training_config
    from bayesrace.bayes import load_posterior
    from bayesrace.train import ConfigError, initial_member_model, prepare_data

    out, config_path = two_round_run
    config = load_active_config(config_path)
    config.training = dict(config.training, training=dict(config.training.get("training", {}), init_shrink=0.3))
    shrunk = round_training_config(config, 1, str(out / "round_1" / "train.xyz"))
    assert shrunk.training.init_shrink == 0.3
    assert round_training_config(config, 0, str(out / "round_0" / "train.xyz")).training.init_shrink is None
    warm = round_training_config(config, 1, str(out / "round_1" / "train.xyz"))
    warm.training.init_shrink = None
    cold = round_training_config(config, 1, str(out / "round_1" / "train.xyz"))
    cold.training.init_from = cold.training.init_shrink = None
    data = prepare_data(shrunk)
    mixed = initial_member_model(shrunk, data, 1)
    previous = dict(initial_member_model(warm, data, 1).named_parameters())
    fresh = dict(initial_member_model(cold, data, 1).named_parameters())
    moved = 0
    for name, parameter in mixed.named_parameters():
        torch.testing.assert_close(parameter, 0.3 * previous[name] + 0.7 * fresh[name], rtol=1e-12, atol=1e-12)
        moved += not torch.equal(parameter, previous[name])
    assert moved > 0
    buffers = dict(load_posterior(out / "round_0" / "posterior.pt").members[1].named_buffers())
    for name, buffer in mixed.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)
    config.warm_start = False
    with pytest.raises(ConfigError, match="init_shrink .*warm_start is false"):
        round_training_config(config, 1, str(out / "round_1" / "train.xyz"))


def test_killed_loop_resumes_without_relabelling(psb3_small, tmp_path):
    from bayesrace.active import FromPoolOracle, active_config_from_dict, read_labelled, run_pool_al
    from bayesrace.data import read_frames

    pool = read_frames(psb3_small / "train.xyz")
    values = _al_values(psb3_small, tmp_path / "run", n_initial=4, n_rounds=1, strategy="random",
                        training=training_section(psb3_small, members=1), oracle={"kind": "from_pool"}, test={})
    config = active_config_from_dict(values)
    first = CountingOracle(FromPoolOracle(pool), fail_after=6)  # 4 initial + 2 of the round-0 batch
    with pytest.raises(KeyboardInterrupt):
        run_pool_al(config, progress=False, oracle=first)
    assert len(first.calls) == 6 and len(read_labelled(tmp_path / "run" / "labelled.xyz")) == 6
    checkpoint = tmp_path / "run" / "round_0" / "member_0" / "checkpoint.pt"
    trained_at = checkpoint.stat().st_mtime_ns
    # a frame cut off by the kill is dropped, and that structure is labelled again
    with open(tmp_path / "run" / "labelled.xyz", "a") as handle:
        handle.write("14\nProperties=species:S:1:pos:R:3 pool_index=999\nC 0 0 0\n")

    second = CountingOracle(FromPoolOracle(pool))
    curve = run_pool_al(active_config_from_dict(values), progress=False, oracle=second)
    assert len(second.calls) == 2 and not set(second.calls) & set(first.calls)
    assert checkpoint.stat().st_mtime_ns == trained_at  # round 0 was not retrained
    assert [p["n_labels"] for p in curve["points"]] == [4, 8]
    labelled = read_labelled(tmp_path / "run" / "labelled.xyz")
    assert sorted(labelled) == sorted(first.calls + second.calls)

    # a finished run started again does nothing
    third = CountingOracle(FromPoolOracle(pool))
    run_pool_al(active_config_from_dict(values), progress=False, oracle=third)
    assert third.calls == []
    # a changed strategy in the same directory is refused
    from bayesrace.train import ConfigError

    with pytest.raises(ConfigError, match="strategy"):
        run_pool_al(active_config_from_dict({**values, "strategy": "bald_e"}), progress=False, oracle=third)


def test_training_under_mpirun_equals_serial(psb3_small, tmp_path):
    """training_ranks 2: each round trains under mpirun (members spread over the ranks), warm
    start included, and reaches the same weights, picks and metrics as the serial loop."""
    import torch

    from bayesrace.active import active_config_from_dict, run_pool_al
    from bayesrace.bayes import load_posterior

    runs = {}
    for ranks in (1, 2):
        values = _al_values(psb3_small, tmp_path / f"ranks{ranks}", n_initial=4, n_rounds=1, batch_size=2,
                            training=training_section(psb3_small, members=2), oracle={"kind": "from_pool"},
                            training_ranks=ranks)
        runs[ranks] = run_pool_al(active_config_from_dict(values), progress=False)
    assert (tmp_path / "ranks2" / "round_1" / "train_config.yaml").is_file()
    assert not (tmp_path / "ranks1" / "round_1" / "train_config.yaml").exists()
    for r in (0, 1):
        serial = load_posterior(tmp_path / "ranks1" / f"round_{r}" / "posterior.pt")
        parallel = load_posterior(tmp_path / "ranks2" / f"round_{r}" / "posterior.pt")
        assert len(parallel.members) == 2
        for a, b in zip(serial.members, parallel.members):
            for key, value in a.state_dict().items():
                assert torch.equal(value, b.state_dict()[key]), (r, key)
    state = {k: json.loads((tmp_path / f"ranks{k}" / "state.json").read_text()) for k in (1, 2)}
    assert [r.get("selected") for r in state[1]["rounds"]] == [r.get("selected") for r in state[2]["rounds"]]
    assert [p["test"] for p in runs[1]["points"]] == [p["test"] for p in runs[2]["points"]]


def test_ase_oracle_by_import_path_in_parallel_workers():
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from bayesrace.active import OracleSection, label_structures, make_oracle

    oracle = make_oracle(OracleSection(kind="ase", calculator="ase.calculators.emt.EMT", workers=2))
    structures = []
    for k in range(3):
        atoms = bulk("Cu", cubic=True)
        atoms.rattle(0.05, seed=k)
        atoms.info["pool_index"] = k
        structures.append(atoms)
    received = []
    label_structures(oracle, structures, received.append, workers=2)
    assert sorted(a.info["pool_index"] for a in received) == [0, 1, 2]
    for labelled in received:
        reference = structures[labelled.info["pool_index"]].copy()
        reference.calc = EMT()
        np.testing.assert_allclose(labelled.get_forces(), reference.get_forces(), atol=1e-12)
        assert labelled.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-12)


def test_tblite_oracle_matches_the_psb3_labels(psb3_small):
    from bayesrace.active import TBLiteOracle
    from bayesrace.data import read_frames

    frame = read_frames(psb3_small / "test_id.xyz")[0]
    import ase

    atoms = ase.Atoms(numbers=frame.numbers, positions=frame.positions)
    labelled = TBLiteOracle(charge=1.0).label([atoms])[0]
    np.testing.assert_allclose(labelled.get_forces(), frame.forces, atol=2e-3)
    assert labelled.get_potential_energy() == pytest.approx(frame.energy, abs=1e-4)
    # a different charge is a different Hamiltonian
    neutral = TBLiteOracle(charge=0.0, uhf=1).label([atoms])[0]
    assert abs(neutral.get_potential_energy() - frame.energy) > 0.1


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mode": "online"}, "expected one of \\['pool', 'on_the_fly'\\]"),
        ({"mode": "on_the_fly"}, "pool, n_initial: key\\(s\\) of mode pool only"),
        ({"md": {"n_steps": 10}}, "md: key\\(s\\) of mode on_the_fly only"),
        ({"strategie": "bald_f"}, "unknown key 'strategie' in the top level \\(did you mean 'strategy'"),
        ({"oracle": {"kind": "tblite", "chrage": 1}}, "unknown key 'chrage' in section 'oracle'"),
        ({"oracle": {"kind": "dft"}}, "oracle.kind is 'dft'"),
        ({"oracle": {"kind": "ase"}}, "needs oracle.calculator"),
        ({"initial": "x.xyz"}, "exactly one of 'initial'"),
        ({"strategy": "entropy"}, "strategy is 'entropy'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"n_rounds": "two"}, "n_rounds: expected an integer"),
    ],
)
def test_config_errors(tmp_path, change, message):
    from bayesrace.active import active_config_from_dict
    from bayesrace.train import ConfigError

    values = {"pool": "pool.xyz", "n_initial": 2, "training": {"model": {"preset": "tiny"}}}
    values.update(change)
    with pytest.raises(ConfigError, match=message):
        active_config_from_dict(values, base_dir=tmp_path)


def test_cli_reports_config_errors_and_training_section_errors(tmp_path, psb3_small):
    config_path = tmp_path / "al.yaml"
    config_path.write_text(yaml.safe_dump({"mode": "on_the_fly", "initial": "i.xyz", "training": {"seed": 0},
                                           "md": {"structure": "s.xyz", "thermostat": "berendsen"}}))
    result = subprocess.run([sys.executable, "-m", "bayesrace.cli", "al", str(config_path)], capture_output=True,
                            text=True, env={"PYTHONPATH": str(ROOT / "python"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    assert "bayesrace al: error:" in result.stderr and "md.thermostat is 'berendsen'" in result.stderr

    from bayesrace.active import active_config_from_dict, run_pool_al
    from bayesrace.train import ConfigError

    values = _al_values(psb3_small, tmp_path / "run", training={**training_section(psb3_small), "trainig": {}})
    with pytest.raises(ConfigError, match="training: unknown key 'trainig'"):
        run_pool_al(active_config_from_dict(values), progress=False)


def test_warm_start_rejects_other_elements_or_architecture(two_round_run, psb3_small, tmp_path):
    from bayesrace.train import config_from_dict
    from bayesrace.train import initial_member_model, prepare_data

    out, _ = two_round_run
    values = {"out": str(tmp_path / "x"), "data": {"train": str(psb3_small / "valid.xyz"),
                                                   "valid": str(psb3_small / "valid.xyz")},
              "model": {"preset": "tiny", "channels": 4}, "ensemble": {"members": 1},
              "training": {"init_from": str(out / "round_0" / "posterior.pt")}}
    config = config_from_dict(values)
    with pytest.raises(RuntimeError, match="model.channels"):
        initial_member_model(config, prepare_data(config), 0)
    config.training.init_from = str(tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match="training.init_from: .*missing.pt"):
        initial_member_model(config, prepare_data(config), 0)


def test_initial_file_and_unlabelled_pool_with_energy_bald(psb3_small, tmp_path):
    """An initial labelled file, a pool without labels (tblite labels it), bald_e top-k."""
    import ase.io

    from bayesrace.active import active_config_from_dict, run_pool_al

    from ase.calculators.singlepoint import SinglePointCalculator

    unlabelled = [ase.Atoms(numbers=a.numbers, positions=a.positions) for a in ase.io.read(psb3_small / "train.xyz", ":12")]
    ase.io.write(tmp_path / "pool.xyz", unlabelled)
    # a test set with energies only (like a scan or NEB path): energy metrics, no force metrics
    energy_only = []
    for atoms in ase.io.read(psb3_small / "test_ood_torsion.xyz", ":4"):
        copy = ase.Atoms(numbers=atoms.numbers, positions=atoms.positions)
        copy.calc = SinglePointCalculator(copy, energy=atoms.get_potential_energy())
        energy_only.append(copy)
    ase.io.write(tmp_path / "scan.xyz", energy_only)
    values = _al_values(psb3_small, tmp_path / "run", pool="pool.xyz", n_initial=None, initial=str(psb3_small / "valid.xyz"),
                        n_rounds=1, strategy="bald_e", batch_aware=False, batch_size=3, warm_start=False,
                        training=training_section(psb3_small, members=2), test={"scan": str(tmp_path / "scan.xyz")})
    curve = run_pool_al(active_config_from_dict(values, base_dir=tmp_path), progress=False)
    n_initial = len(ase.io.read(psb3_small / "valid.xyz", ":"))
    assert [p["n_labels"] for p in curve["points"]] == [n_initial, n_initial + 3]
    for point in curve["points"]:
        assert point["test"]["scan"]["energy_rmse_meV_per_atom"] > 0
        assert point["test"]["scan"]["forces_mae_eV_per_A"] is None
    assert json.loads((tmp_path / "run" / "round_1" / "config.json").read_text())["training"]["init_from"] is None
