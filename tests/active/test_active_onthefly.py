"""On-the-fly active learning: LAMMPS MD halts at high σ, frames are labelled, the model
retrains and the MD goes on; restarts, restart points, thresholds, config errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from al_tools import CountingOracle, training_section


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
        "training": training_section(data_dir),
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
    from bayesrace.lammps import read_dump

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
    from bayesrace.active import active_config_from_dict, load_active_config, run_on_the_fly

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
    from bayesrace.lammps import last_trusted_frame

    frames = [{"step": s, "columns": {"c_u[1]": np.array([0.1, sigma])}} for s, sigma in
              ((0, 0.2), (10, 0.5), (20, 0.3), (30, 0.9))]
    assert last_trusted_frame(frames, 0.4)["step"] == 20
    assert last_trusted_frame(frames, 0.5)["step"] == 20  # at the threshold is trusted (fix halt needs >)
    assert last_trusted_frame(frames, 0.15)["step"] == 0  # none trusted: the segment's first frame


def test_on_the_fly_restart_from_halt_keeps_round_0_threshold(otf_run, psb3_small, tmp_path):
    """md.restart_from halt: the next segment continues from the halting frame itself; with
    threshold null, round 0's own threshold (from its posterior record) holds in every round."""
    from bayesrace.active import active_config_from_dict, run_on_the_fly
    from bayesrace.bayes import update_posterior_file
    from bayesrace.export import read_metadata
    from bayesrace.lammps import read_dump

    out, _, structure = otf_run
    posterior = tmp_path / "posterior.pt"
    update_posterior_file(out / "round_1" / "posterior.pt", posterior, thresholds={"atomic_force_std": 1e-4})
    values = _otf_values(psb3_small, tmp_path / "run", structure, posterior=str(posterior), threshold=None,
                         n_rounds=2)
    values["md"]["restart_from"] = "halt"
    values["acquired_repeats"] = 3
    del values["valid"]  # no recalibration: round 0's threshold is the posterior's own
    log = run_on_the_fly(active_config_from_dict(values), progress=False)
    first, second, third = log["rounds"]
    # each acquired frame three times in the fine-tuning data; n_labels counts distinct structures
    import ase.io

    assert len(ase.io.read(tmp_path / "run" / "round_2" / "train.xyz", ":")) == first["n_labels"] + 2 * 3
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


def test_on_the_fly_halts_on_the_epistemic_sigma_when_asked(otf_run, psb3_small, tmp_path):
    """md.halt_on epistemic: fix halt reads the members' disagreement (dump column c_u[2]), not
    the total σ; a threshold between the two stops the total-σ run at its first check and lets
    the epistemic one finish; without a threshold τ comes from the calibrated epistemic σ."""
    from bayesrace.active import active_config_from_dict, run_on_the_fly
    from bayesrace.lammps import read_dump

    out, _, structure = otf_run
    md = {"structure": str(structure), "n_steps": 12, "dump_every": 4, "thermostat": "nve", "temperature": 100.0}

    def run(name, threshold, halt_on, posterior=str(out / "round_1" / "posterior.pt"), **extra):
        values = _otf_values(psb3_small, tmp_path / name, structure, posterior=posterior,
                             threshold=threshold, n_rounds=0, md={**md, "halt_on": halt_on}, **extra)
        if "valid" not in extra:
            del values["valid"]
        return run_on_the_fly(active_config_from_dict(values), progress=False)

    free = run("free", 1e3, "epistemic")
    frames = read_dump(tmp_path / "free" / "round_0" / "md" / "frames.dump")
    epistemic = [float(f["columns"]["c_u[2]"].max()) for f in frames]
    total = [float(f["columns"]["c_u[1]"].max()) for f in frames]
    assert free["rounds"][0]["max_sigma"] == pytest.approx(max(epistemic)) and free["halt_on"] == "epistemic"
    assert all(np.all(f["columns"]["c_u[2]"] <= f["columns"]["c_u[1]"]) for f in frames)
    assert max(epistemic) < min(total)  # the aleatoric part is there: a threshold fits between
    between = 0.5 * (max(epistemic) + min(total))
    on_epistemic = run("epistemic", between, "epistemic")["rounds"][0]
    on_total = run("total", between, "total")["rounds"][0]
    assert not on_epistemic["halted"] and on_epistemic["step_reached"] == 12
    assert on_total["halted"] and on_total["step_reached"] == 4

    calibrated = run("calibrated", None, "epistemic", valid=str(psb3_small / "test_id.xyz"))["rounds"][0]
    assert calibrated["threshold"] == calibrated["calibration_epistemic_threshold"]
    assert 0 < calibrated["calibration_epistemic_threshold"] < calibrated["calibration_threshold"]

    # md.halt_on relative: fix halt reads c_u[6] = σ_epi / (|F| + 1 eV/Å) (<= σ_epi), τ by the same rule
    relative = run("relative", None, "relative", valid=str(psb3_small / "test_id.xyz"))["rounds"][0]
    frames = read_dump(tmp_path / "relative" / "round_0" / "md" / "frames.dump")
    assert relative["threshold"] == relative["calibration_relative_threshold"] > 0
    assert relative["max_sigma"] == pytest.approx(max(float(f["columns"]["c_u[6]"].max()) for f in frames))
    assert all(np.all((f["columns"]["c_u[6]"] > 0) & (f["columns"]["c_u[6]"] < f["columns"]["c_u[2]"]))
               for f in frames)

    # one member has no epistemic σ: refused, not a run that can never halt
    from bayesrace.bayes import load_posterior, save_posterior
    from bayesrace.train import ConfigError

    single = tmp_path / "single.pt"
    save_posterior(single, [load_posterior(out / "round_1" / "posterior.pt").members[0]], data_sha256="single")
    values = _otf_values(psb3_small, tmp_path / "single", structure, posterior=str(single), threshold=0.1, n_rounds=0,
                         md={**md, "halt_on": "epistemic"})
    with pytest.raises(ConfigError, match="needs a posterior of 2 or more members"):
        run_on_the_fly(active_config_from_dict(values), progress=False)
    # ... nor a feature distance without a density; with one, one member is enough
    values["md"]["halt_on"] = "feature"
    with pytest.raises(ConfigError, match="halt_on 'feature' needs a posterior with a feature density"):
        run_on_the_fly(active_config_from_dict(values), progress=False)
    trained = load_posterior(out / "round_1" / "posterior.pt")  # bayesrace train fitted its density
    assert trained.feature_density is not None
    density = {**trained.feature_density, "mean": trained.feature_density["mean"][:1],
               "whiten": trained.feature_density["whiten"][:1]}
    save_posterior(single, [trained.members[0]], data_sha256="single", feature_density=density)
    feature = run("feature", None, "feature", posterior=str(single), valid=str(psb3_small / "test_id.xyz"))
    frames = read_dump(tmp_path / "feature" / "round_0" / "md" / "frames.dump")
    distances = [float(f["columns"]["c_u[7]"].max()) for f in frames]
    assert feature["rounds"][0]["threshold"] == feature["rounds"][0]["calibration_feature_threshold"] > 0
    assert feature["rounds"][0]["max_sigma"] == pytest.approx(max(distances)) and min(distances) > 0
    below = run("feature_low", 0.5 * min(distances), "feature", posterior=str(single))["rounds"][0]
    assert below["halted"] and below["step_reached"] == 4


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
        ({"md": {"structure": "s.xyz", "halt_on": "aleatoric"}}, "md.halt_on is 'aleatoric'"),
        ({"md": {"structure": "s.xyz", "halt_on": "epistemic"}}, "md.halt_on 'epistemic' needs 'threshold'"),
        ({"md": {"structure": "s.xyz", "halt_on": "relative"}}, "md.halt_on 'relative' needs 'threshold' \\(unit-free"),
        ({"md": {"structure": "s.xyz", "halt_on": "feature"}}, "largest feature distance\\)"),
        ({"threshold_from": "control", "threshold": 0.1, "md": {"structure": "s.xyz", "control_temperature": 300.0}},
         "either 'threshold' \\(0.1\\) or threshold_from 'control'"),
        ({"threshold_from": "control", "md": {"structure": "s.xyz"}}, "needs md.control_temperature"),
        ({"threshold_from": "control_first", "md": {"structure": "s.xyz"}},
         "threshold_from 'control_first' needs md.control_temperature"),
        ({"threshold_from": "control", "md": {"structure": "s.xyz", "control_temperature": 300.0, "control_steps": 5}},
         "md.control_steps \\(5\\) must be >= md.dump_every \\(10\\)"),
        ({"md": {"structure": "s.xyz", "control_margin": 0.5}}, "md.control_margin must be >= 1"),
        ({"threshold_from": "guess"}, "threshold_from is 'guess'"),
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


def test_on_the_fly_look_ahead_adds_candidates_past_the_halt(otf_run, psb3_small, tmp_path):
    """md.look_ahead: after a halt the MD goes on from the halting frame without halting (up
    to look_ahead_limit × τ); its frames join the round's candidates, the restart point is
    unchanged; at the limit the look-ahead stops. label_halting_frame: the halting frame is
    labelled whatever the strategy prefers."""
    import ase.io

    from bayesrace.active import active_config_from_dict, run_on_the_fly
    from bayesrace.lammps import read_dump

    out, _, structure = otf_run
    md = {"structure": str(structure), "n_steps": 40, "dump_every": 4, "thermostat": "nve", "temperature": 300.0,
          "look_ahead": 8, "look_ahead_limit": 1e9}

    def run(name, label_halting_frame=False, **md_changes):
        values = _otf_values(psb3_small, tmp_path / name, structure, posterior=str(out / "round_1" / "posterior.pt"),
                             n_rounds=1, md={**md, **md_changes}, label_halting_frame=label_halting_frame)
        return run_on_the_fly(active_config_from_dict(values), progress=False)

    log = run("ahead", label_halting_frame=True)
    first = log["rounds"][0]
    assert log["look_ahead"] == 8 and first["halted"] and first["step_reached"] == 4
    ahead = read_dump(tmp_path / "ahead" / "round_0" / "look_ahead" / "frames.dump")
    assert [f["step"] for f in ahead] == [4, 8, 12]  # from the halting frame, 8 steps on
    assert first["look_ahead_reached"] == 12 and not first["look_ahead_stopped"]
    assert first["n_look_ahead_candidates"] == 2
    assert [step for step, _ in first["look_ahead_trace"]] == [8, 12]
    assert [sigma for _, sigma in first["look_ahead_trace"]] == pytest.approx(
        [float(f["columns"]["c_u[1]"].max()) for f in ahead[1:]])  # halt_on total: column 1
    candidates = ase.io.read(tmp_path / "ahead" / "round_0" / "candidates.xyz", index=":")
    assert sorted(int(a.info["md_step"]) for a in candidates) == [0, 4, 8, 12]
    assert first["n_candidates"] == 4 and first["restart_step"] == 0  # the restart ignores the look-ahead
    assert first["selected"] == [4]  # label_halting_frame: the one label is the halting frame
    # the last round does not look ahead: nothing would label its candidates
    assert "look_ahead_reached" not in log["rounds"][1] or log["rounds"][1]["look_ahead_reached"] is None

    stopped = run("stopped", look_ahead_limit=1.000001)["rounds"][0]
    assert stopped["look_ahead_stopped"] and stopped["look_ahead_reached"] == 8


# run_length's τ is looser (measured here: 1.05× the largest σ of a 50 K control, which 2000 K did not
# reach in 40 steps): a colder control keeps round 0's halt
@pytest.mark.parametrize("rule, control_steps, control_temperature", [("largest", 12, 50.0), ("run_length", 80, 5.0)])
def test_on_the_fly_threshold_from_a_control_run(otf_run, psb3_small, tmp_path, rule, control_steps,
                                                 control_temperature):
    """threshold_from control: each round runs its own model unhalted at the control temperature
    (round_<r>/control) and halts its segment at control_margin × that run's largest σ or, with
    control_rule run_length, × the level a run of n_steps exceeds control_false_halts times."""
    from bayesrace.active import active_config_from_dict, run_on_the_fly
    from bayesrace.active._control import run_length_level
    from bayesrace.lammps import read_dump

    out, _, structure = otf_run
    md = {"structure": str(structure), "n_steps": 40, "dump_every": 4, "thermostat": "langevin",
          "temperature": 2000.0, "halt_on": "relative", "control_temperature": control_temperature,
          "control_steps": control_steps,
          "control_margin": 1.1, "control_rule": rule, "control_false_halts": 0.2}
    values = _otf_values(psb3_small, tmp_path / "run", structure, posterior=str(out / "round_1" / "posterior.pt"),
                         threshold=None, threshold_from="control", n_rounds=1, md=md)
    log = run_on_the_fly(active_config_from_dict(values), progress=False)
    assert log["threshold_from"] == "control" and len(log["rounds"]) == 2  # round 0 halted at 2000 K
    for record in log["rounds"]:
        control = read_dump(tmp_path / "run" / f"round_{record['round']}" / "control" / "frames.dump")
        maxima = [float(f["columns"]["c_u[6]"].max()) for f in control]
        assert [f["step"] for f in control] == list(range(0, control_steps + 1, 4))  # never halts
        assert record["control_max_sigma"] == pytest.approx(max(maxima), rel=1e-12)
        level = max(maxima) if rule == "largest" else run_length_level(maxima, 10, 0.2)["level"]
        assert record["control_rule"] == rule and record["threshold"] == pytest.approx(1.1 * level, rel=1e-12)
        segment = read_dump(tmp_path / "run" / f"round_{record['round']}" / "md" / "frames.dump")
        over = [f["step"] for f in segment if f["step"] > record["start_step"]  # fix halt checks after steps
                and float(f["columns"]["c_u[6]"].max()) > record["threshold"]]
        assert record["halted"] == bool(over) and (not over or record["step_reached"] == over[0])
    # round 1's model (retrained on the label) has a control run and a threshold of its own
    assert log["rounds"][0]["threshold"] != log["rounds"][1]["threshold"]


def test_calibrate_command_sets_thresholds_from_a_control_run(otf_run, psb3_small, tmp_path, capsys):
    """bayesrace calibrate --control-md: after the calibration, the force σ thresholds become
    margin × the largest σ of an unhalted control run of the calibrated model; the energy
    threshold keeps the calibration's rule; missing companions are usage errors."""
    from bayesrace import cli, keys
    from bayesrace.bayes import read_posterior_record
    from bayesrace.lammps import read_dump

    out, _, structure = otf_run
    posterior, calibrated = out / "round_1" / "posterior.pt", tmp_path / "calibrated.pt"
    common = ["calibrate", str(posterior), str(psb3_small / "test_id.xyz"), "--out", str(calibrated), "--quiet"]
    assert cli.main(common + ["--control-md", str(structure)]) == 2
    assert "--control-md needs --control-temperature" in capsys.readouterr().err
    assert not calibrated.exists()  # refused before the calibration
    assert cli.main(common + ["--control-md", str(structure), "--control-temperature", "300",
                              "--control-steps", "12", "--control-margin", "1.2"]) == 0
    printed = capsys.readouterr().out
    thresholds = read_posterior_record(calibrated)["thresholds"]
    control = read_dump(tmp_path / "calibrated_control" / "control" / "frames.dump")
    assert [f["step"] for f in control] == [0, 10]  # dumped every 10 steps (at most n_steps)
    # the trained posterior has a feature density: its distance gets a control threshold too
    for key, column in ((keys.ATOMIC_FORCE_STD, "c_u[1]"), (keys.ATOMIC_FORCE_STD_EPISTEMIC, "c_u[2]"),
                        (keys.ATOMIC_FORCE_STD_RELATIVE, "c_u[6]"), (keys.ATOMIC_FEATURE_DISTANCE, "c_u[7]")):
        assert thresholds[key] == pytest.approx(1.2 * max(float(f["columns"][column].max()) for f in control),
                                                rel=1e-12)
        assert f"control threshold {key} = {thresholds[key]:.4g}" in printed
    assert thresholds[keys.ENERGY_STD_EPISTEMIC_PER_ATOM] > 0  # the calibration's, kept


def test_calibrate_command_extrapolates_control_thresholds_to_a_run_length(otf_run, psb3_small, tmp_path, capsys):
    """--control-run-steps: each force σ threshold is margin × the run_length level of the control
    run's largest σ per dumped frame, for runs of that many steps checked every 10."""
    from bayesrace import cli, keys
    from bayesrace.active._control import run_length_level
    from bayesrace.bayes import read_posterior_record
    from bayesrace.lammps import read_dump

    out, _, structure = otf_run
    posterior, calibrated = out / "round_1" / "posterior.pt", tmp_path / "calibrated.pt"
    common = ["calibrate", str(posterior), str(psb3_small / "test_id.xyz"), "--out", str(calibrated), "--quiet",
              "--control-md", str(structure), "--control-temperature", "300", "--control-margin", "1.1"]
    assert cli.main(common + ["--control-steps", "100", "--control-run-steps", "20000"]) == 2
    assert "needs --control-steps >= 200" in capsys.readouterr().err
    assert cli.main(common + ["--control-steps", "200", "--control-run-steps", "20000",
                              "--control-false-halts", "0.05"]) == 0
    printed = capsys.readouterr().out
    thresholds = read_posterior_record(calibrated)["thresholds"]
    control = read_dump(tmp_path / "calibrated_control" / "control" / "frames.dump")
    assert len(control) == 21
    for key, column in ((keys.ATOMIC_FORCE_STD, "c_u[1]"), (keys.ATOMIC_FORCE_STD_EPISTEMIC, "c_u[2]"),
                        (keys.ATOMIC_FORCE_STD_RELATIVE, "c_u[6]")):
        maxima = [float(f["columns"][column].max()) for f in control]
        expected = 1.1 * run_length_level(maxima, 2000, 0.05)["level"]
        assert thresholds[key] == pytest.approx(expected, rel=1e-6)
        # a run 100× the control's: above the largest-σ rule (here the top 2 of 21 frames make the tail:
        # level = u + β ln(2000 · 2/21 / 0.05) ≥ u + 8β ≥ the largest, as β ≥ (largest − u) / 2)
        assert thresholds[key] >= 1.1 * max(maxima)
        assert f"control threshold {key} = {thresholds[key]:.4g}" in printed
    assert "in-distribution run of 20000 steps" in printed


def test_on_the_fly_control_first_keeps_round_0s_control_threshold(otf_run, psb3_small, tmp_path):
    """threshold_from control_first: round 0's control run sets τ and every later round halts at that
    same τ without a control run of its own (a more certain retrained model must not tighten it)."""
    from bayesrace.active import active_config_from_dict, run_on_the_fly

    out, _, structure = otf_run
    md = {"structure": str(structure), "n_steps": 40, "dump_every": 4, "thermostat": "langevin",
          "temperature": 2000.0, "halt_on": "relative", "control_temperature": 50.0, "control_steps": 12,
          "control_margin": 1.1, "control_rule": "largest"}
    values = _otf_values(psb3_small, tmp_path / "run", structure, posterior=str(out / "round_1" / "posterior.pt"),
                         threshold=None, threshold_from="control_first", n_rounds=1, md=md)
    log = run_on_the_fly(active_config_from_dict(values), progress=False)
    first, second = log["rounds"]  # round 0 halted at 2000 K
    assert first["threshold"] == pytest.approx(1.1 * first["control_max_sigma"], rel=1e-12)
    assert second["threshold"] == first["threshold"] and second["control_max_sigma"] is None  # no control run
    assert (tmp_path / "run" / "round_0" / "control").is_dir()
    assert not (tmp_path / "run" / "round_1" / "control").exists()
