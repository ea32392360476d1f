"""Pool-based active learning: the loop end to end, kill safety, warm starts, oracles, config errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT


def _training(data_dir, members=2, epochs=1):
    return {
        "seed": 0,
        "data": {"valid": str(data_dir / "valid.xyz")},
        "model": {"preset": "tiny"},
        "loss": {"kind": "nll_jef", "mse_warmup_epochs": 0},
        "training": {"batch_size": 4, "max_epochs": epochs, "lr": 0.005},
        "ensemble": {"members": members},
    }


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
        "training": _training(data_dir),
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


class CountingOracle:
    """Wraps an oracle, counts calls per pool index and can fail after n labels (a 'kill')."""

    def __init__(self, inner, fail_after=None):
        self.inner, self.fail_after, self.calls = inner, fail_after, []

    def label_one(self, atoms):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls.append(int(atoms.info["pool_index"]))
        return self.inner.label_one(atoms)


def test_killed_loop_resumes_without_relabelling(psb3_small, tmp_path):
    from bayesrace.active import FromPoolOracle, active_config_from_dict, read_labelled, run_pool_al
    from bayesrace.data import read_frames

    pool = read_frames(psb3_small / "train.xyz")
    values = _al_values(psb3_small, tmp_path / "run", n_initial=4, n_rounds=1, strategy="random",
                        training=_training(psb3_small, members=1), oracle={"kind": "from_pool"}, test={})
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
                            training=_training(psb3_small, members=2), oracle={"kind": "from_pool"},
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

    values = _al_values(psb3_small, tmp_path / "run", training={**_training(psb3_small), "trainig": {}})
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
                        training=_training(psb3_small, members=2), test={"scan": str(tmp_path / "scan.xyz")})
    curve = run_pool_al(active_config_from_dict(values, base_dir=tmp_path), progress=False)
    n_initial = len(ase.io.read(psb3_small / "valid.xyz", ":"))
    assert [p["n_labels"] for p in curve["points"]] == [n_initial, n_initial + 3]
    for point in curve["points"]:
        assert point["test"]["scan"]["energy_rmse_meV_per_atom"] > 0
        assert point["test"]["scan"]["forces_mae_eV_per_A"] is None
    assert json.loads((tmp_path / "run" / "round_1" / "config.json").read_text())["training"]["init_from"] is None


# ------------------------------------------------------------------ on-the-fly mode


def _otf_values(data_dir, out, structure, **overrides):
    values = {
        "mode": "on_the_fly",
        "out": str(out),
        "initial": str(data_dir / "valid.xyz"),
        "valid": str(data_dir / "test_id.xyz"),
        "strategy": "bald_f",
        "batch_size": 1,
        "n_rounds": 1,
        "threshold": 1e-4,  # far below any σ of a one-epoch model: every segment halts at its first check
        "candidate_fraction": 0.5,
        "training": _training(data_dir),
        "oracle": {"kind": "tblite", "charge": 1.0},
        "md": {"structure": str(structure), "temperature": 300.0, "timestep": 0.0005, "n_steps": 40,
               "dump_every": 4, "seed": 7, "thermostat": "langevin"},
    }
    values.update(overrides)
    return values


@pytest.fixture(scope="module")
def otf_run(psb3_small, tmp_path_factory):
    """Two rounds of on-the-fly AL through the CLI: round 0 halts, one frame is labelled by
    tblite, round 1 (warm-started, recalibrated, re-exported) continues the MD and halts again."""
    import ase.io

    from bayesrace.cli import main

    base = tmp_path_factory.mktemp("otf")
    structure = base / "start.xyz"
    first = ase.io.read(psb3_small / "test_id.xyz", 0)
    ase.io.write(structure, ase.Atoms(numbers=first.numbers, positions=first.positions))
    config_path = base / "otf.yaml"
    config_path.write_text(yaml.safe_dump(_otf_values(psb3_small, base / "run", "start.xyz")))
    assert main(["al", str(config_path), "--quiet"]) == 0
    return base / "run", config_path, structure


def test_on_the_fly_halts_labels_retrains_and_resumes(otf_run, psb3_small):
    import ase.io

    from bayesrace.active import TBLiteOracle, read_labelled
    from bayesrace.active import read_dump

    out, _, _ = otf_run
    log = json.loads((out / "otf_log.json").read_text())
    assert log["status"] == "n_rounds" and [r["round"] for r in log["rounds"]] == [0, 1]
    first, second = log["rounds"]
    # round 0 halts at its first check (step 4 > max σ 1e-4), round 1 starts where it stopped
    assert first["halted"] and first["start_step"] == 0 and first["step_reached"] == 4
    # no frame of round 0 was trusted (every σ > 1e-4): round 1 restarts from round 0's first frame
    assert first["restart_step"] == 0
    assert second["start_step"] == 0 and second["halted"] and second["step_reached"] == 4
    assert first["threshold"] == second["threshold"] == pytest.approx(1e-4)
    assert first["calibration_threshold"] > 0  # the calibration ran (its threshold is overridden by the config)
    assert first["max_sigma"] > 1e-4 and first["trace"][-1][0] == 4
    assert first["n_candidates"] == 2 and first["labels_added"] == 1 and second["labels_added"] == 0
    assert first["n_labels"] == 10 and second["n_labels"] == 11
    assert (out / "otf_sigma.png").stat().st_size > 1000

    # the restart frame is round 0's step-0 frame: same positions (up to the re-centring in the box)
    # and velocities, same step, no new velocities
    restart_frame = read_dump(out / "round_0" / "md" / "frames.dump")[0]
    resumed = read_dump(out / "round_1" / "md" / "frames.dump")[0]
    assert restart_frame["step"] == resumed["step"] == 0
    for column in ("xu", "yu", "zu", "vx", "vy", "vz"):
        np.testing.assert_allclose(resumed["columns"][column], restart_frame["columns"][column], rtol=0, atol=1e-10)
    assert "reset_timestep 0" in (out / "round_1" / "md" / "in.md").read_text()
    assert "velocity" not in (out / "round_1" / "md" / "in.md").read_text()

    # the labelled frame is one of round 0's candidates, labelled by GFN2-xTB on its geometry
    labelled = read_labelled(out / "labelled.xyz")
    state = json.loads((out / "state.json").read_text())
    assert list(labelled) == state["rounds"][0]["selected"] and state["rounds"][0]["selected"][0] in (0, 4)
    step = state["rounds"][0]["selected"][0]
    candidate = {a.info["pool_index"]: a for a in ase.io.read(out / "round_0" / "candidates.xyz", ":")}[step]
    np.testing.assert_allclose(labelled[step].positions, candidate.positions, atol=1e-10)
    assert not labelled[step].pbc.any()  # a molecule: labelled without periodic images
    reference = TBLiteOracle(charge=1.0).label([ase.Atoms(numbers=candidate.numbers,
                                                          positions=candidate.positions)])[0]
    np.testing.assert_allclose(labelled[step].get_forces(), reference.get_forces(), atol=1e-8)
    assert labelled[step].info["al_round"] == 1
    # round 1 trained on initial + the new frame, warm-started from round 0
    assert len(ase.io.read(out / "round_1" / "train.xyz", ":")) == 11
    assert json.loads((out / "round_1" / "config.json").read_text())["training"]["init_from"] == \
        str(out / "round_0" / "posterior.pt")
    from bayesrace.export import read_metadata

    assert read_metadata(out / "round_1" / "model.pt")["calibration"] != {}


def test_on_the_fly_restart_redoes_nothing_and_completes_below_threshold(otf_run, psb3_small, tmp_path):
    from bayesrace.active import active_config_from_dict, load_active_config
    from bayesrace.active import run_on_the_fly

    out, config_path, structure = otf_run
    dump = out / "round_1" / "md" / "frames.dump"
    written = dump.stat().st_mtime_ns
    counting = CountingOracle(None)
    log = run_on_the_fly(load_active_config(config_path), progress=False, oracle=counting)
    assert counting.calls == [] and dump.stat().st_mtime_ns == written and log["status"] == "n_rounds"

    # from a given posterior, a threshold far above every σ: one segment runs all steps, nothing is labelled
    values = _otf_values(psb3_small, tmp_path / "run", structure, posterior=str(out / "round_1" / "posterior.pt"),
                         threshold=1e3, n_rounds=3, md={"structure": str(structure), "n_steps": 12, "dump_every": 4,
                                                        "thermostat": "nve", "temperature": 100.0})
    del values["valid"]
    log = run_on_the_fly(active_config_from_dict(values), progress=False, oracle=counting)
    assert log["status"] == "completed" and len(log["rounds"]) == 1 and counting.calls == []
    record = log["rounds"][0]
    assert not record["halted"] and record["step_reached"] == 12 and [t[0] for t in record["trace"]] == [0, 4, 8, 12]
    assert record["n_candidates"] == 0


def test_last_trusted_frame_is_the_last_below_threshold():
    from bayesrace.active import last_trusted_frame

    frames = [{"step": s, "columns": {"c_u[1]": np.array([0.1, sigma])}} for s, sigma in
              ((0, 0.2), (10, 0.5), (20, 0.3), (30, 0.9))]
    assert last_trusted_frame(frames, 0.4)["step"] == 20
    assert last_trusted_frame(frames, 0.5)["step"] == 20  # at the threshold is trusted (fix halt needs >)
    assert last_trusted_frame(frames, 0.15)["step"] == 0  # none trusted: the segment's first frame


def test_on_the_fly_restart_from_halt_keeps_round_0_threshold(otf_run, psb3_small, tmp_path):
    """md.restart_from halt: the next segment continues from the halting frame itself; with
    threshold null, round 0's own threshold (from its posterior record) holds in every round."""
    from bayesrace.active import active_config_from_dict
    from bayesrace.export import read_metadata
    from bayesrace.active import read_dump, run_on_the_fly
    from bayesrace.bayes import update_posterior_file

    out, _, structure = otf_run
    posterior = tmp_path / "posterior.pt"
    update_posterior_file(out / "round_1" / "posterior.pt", posterior, thresholds={"atomic_force_std": 1e-4})
    values = _otf_values(psb3_small, tmp_path / "run", structure, posterior=str(posterior), threshold=None,
                         n_rounds=2)
    values["md"]["restart_from"] = "halt"
    del values["valid"]  # no recalibration: round 0's threshold is the posterior's own
    log = run_on_the_fly(active_config_from_dict(values), progress=False)
    first, second, third = log["rounds"]
    assert first["threshold"] == second["threshold"] == third["threshold"] == pytest.approx(1e-4)
    # round 1 picks among its own new frame (step 8) and round 0's candidate left unlabelled
    assert first["n_pooled_candidates"] == 2 and second["n_candidates"] == 1 and second["n_pooled_candidates"] == 2
    assert third["step_reached"] == 12 and third["n_labels"] == first["n_labels"] + 2
    # round 1's posterior carries no threshold of its own: its deployable gets round 0's
    assert read_metadata(tmp_path / "run" / "round_1" / "model.pt")["thresholds"]["atomic_force_std"] == \
        pytest.approx(1e-4)
    assert first["restart_step"] == first["step_reached"] == 4 and second["start_step"] == 4
    halt_frame = read_dump(tmp_path / "run" / "round_0" / "md" / "frames.dump")[-1]
    resumed = read_dump(tmp_path / "run" / "round_1" / "md" / "frames.dump")[0]
    assert halt_frame["step"] == resumed["step"] == 4
    for column in ("xu", "yu", "zu", "vx", "vy", "vz"):
        np.testing.assert_allclose(resumed["columns"][column], halt_frame["columns"][column], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"md": {"structure": "s.xyz", "thermostat": "nose"}}, "md.thermostat is 'nose'"),
        ({"md": {"structure": "s.xyz", "dump_every": 0}}, "md.dump_every must lie in"),
        ({"md": {"structure": "s.xyz", "n_steps": 10, "dump_every": 20}}, "md.dump_every must lie in"),
        ({"md": {"structure": "s.xyz", "timestep": -1.0}}, "md.timestep must be > 0"),
        ({"md": {"structure": "s.xyz", "ranks": 0}}, "md.ranks must be >= 1"),
        ({"md": {"structure": "s.xyz", "tempreature": 5}}, "unknown key 'tempreature' in section 'md'"),
        ({"md": {}}, "md.structure is required"),
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"candidate_fraction": 1.5}, "candidate_fraction must lie in"),
        ({"calibration_method": "beta"}, "calibration_method is 'beta'"),
        ({"initial": None}, "needs 'initial'"),
        ({"oracle": {"kind": "from_pool"}}, "from_pool' needs a pool"),
        ({"n_initial": 3}, "n_initial: key\\(s\\) of mode pool only"),
    ],
)
def test_on_the_fly_config_errors(tmp_path, change, message):
    from bayesrace.active import active_config_from_dict
    from bayesrace.train import ConfigError

    values = {"mode": "on_the_fly", "initial": "i.xyz", "training": {"model": {"preset": "tiny"}},
              "md": {"structure": "s.xyz"}}
    values.update(change)
    with pytest.raises(ConfigError, match=message):
        active_config_from_dict(values, base_dir=tmp_path)
