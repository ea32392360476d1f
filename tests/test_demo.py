"""The main job's optional on-the-fly active-learning step (bayesrace demo --al-rounds)."""

from __future__ import annotations

import json

import yaml


def test_demo_active_learning_round_halts_labels_retrains_and_reports(psb3_small, tmp_path):
    from bayesrace.train import config_from_dict
    from bayesrace.demo import AL_LABELS_PER_HALT, demo_config, run_demo_active_learning
    from bayesrace.train import train

    run_dir, report_dir = tmp_path / "run", tmp_path / "report"
    report_dir.mkdir()
    (report_dir / "report.md").write_text("# report\n")
    values = demo_config(psb3_small, run_dir, members=1, minutes=1.0)
    values["training"]["max_epochs"] = 1
    train(config_from_dict(values), progress=False)

    # a threshold below any σ: round 0 halts at its first check, 4 frames are labelled, round 1 retrains
    summary = run_demo_active_learning(psb3_small, run_dir, report_dir, rounds=1, ranks=1, members=1, quiet=True,
                                       steps=40, threshold=1e-4)
    assert summary["status"] == "n_rounds" and [r["round"] for r in summary["rounds"]] == [0, 1]
    first, second = summary["rounds"]
    assert first["halted"] and first["step_reached"] == 10 and first["labels_added"] == min(AL_LABELS_PER_HALT, 2)
    assert second["n_labels"] == first["n_labels"] + first["labels_added"]
    assert summary["cycle"]
    config = yaml.safe_load((tmp_path / "al.yaml").read_text())
    assert config["md"]["temperature"] > 600 and config["training_ranks"] == 1
    round_1 = json.loads((tmp_path / "al" / "round_1" / "config.json").read_text())
    assert round_1["training"]["init_from"] == str(tmp_path / "al" / "round_0" / "posterior.pt")
    assert round_1["loss"]["means"] == "frozen" and round_1["loss"]["refit_energy_zero"] is True
    assert set(summary["errors"]) == {"test_id", "ood_hot"} and set(summary["errors"]["ood_hot"]) == {0, 1}
    report = (report_dir / "report.md").read_text()
    assert report.startswith("# report\n") and "## On-the-fly active learning" in report
    assert "| 0 | 0 | 10 | True |" in report and (report_dir / "otf_sigma.png").stat().st_size > 1000


def test_a_cycle_needs_a_halt_with_labels_and_a_round_trained_on_them():
    from bayesrace.demo import shows_cycle

    halted = {"halted": True, "labels_added": 4}
    completed = {"halted": False, "labels_added": 0}
    assert shows_cycle([halted, completed]) and shows_cycle([halted, halted])
    assert not shows_cycle([completed])  # round 0 never halted
    assert not shows_cycle([halted])  # nothing was retrained
    assert not shows_cycle([{"halted": True, "labels_added": 0}, completed])  # a halt without labels
