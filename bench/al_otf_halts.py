"""Are an on-the-fly run's halts false alarms? Each round's model on the frame it halted at.

For each halted round r of an on-the-fly run folder (``bench/al_otf.py --runs``), the round's
calibrated posterior predicts the frames labelled after its halt (``otf/labelled.xyz``,
``al_round == r + 1``: the halting frame and the other picks) and the hot test set
(``test_ood_hot.xyz``, 1000/1500 K). Per frame: mean and max atomic force error |ΔF_i|
(GFN2-xTB reference), the largest relative epistemic σ (the loop's halting statistic,
σ_epi,i / (|F_i| + 1 eV/Å)), and the central C=C torsion (PSB3 atoms 1-2-3-4). A halting
frame whose error sits in the hot set's upper tail is a real find; one near the hot set's
median is a false alarm of the σ. Prints a table and writes results.json / results.md.

    python bench/al_otf_halts.py /work/runs/otf1200_s1 --out bench/results/al_otf/1200K_..._seed1/halts
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import PSB3_DIR, command_line, git_commit, machine_info, write_json

TORSION_ATOMS = (1, 2, 3, 4)  # PSB3's central C=C, as in the data set's torsion scan


def per_frame(posterior, frames, atoms) -> dict:
    """Per frame: mean and max |ΔF_i| (eV/Å), max relative epistemic σ, C=C torsion folded onto 0–180°."""
    from bayesrace import keys
    from bayesrace.uq import predict_frames, reference_key

    prediction = predict_frames(posterior, frames)
    error = np.linalg.norm(prediction[keys.FORCES] - prediction[reference_key(keys.FORCES)], axis=1)
    relative = prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC] / (
        np.linalg.norm(prediction[keys.FORCES], axis=1) + keys.RELATIVE_FORCE_LEVEL)
    batch = prediction[keys.BATCH]
    rows = {"mean_error": [], "max_error": [], "max_relative_sigma": [], "torsion_deg": []}
    for index, structure in enumerate(atoms):
        mask = batch == index
        rows["mean_error"].append(float(error[mask].mean()))
        rows["max_error"].append(float(error[mask].max()))
        rows["max_relative_sigma"].append(float(relative[mask].max()))
        torsion = structure.get_dihedral(*TORSION_ATOMS)  # in [0, 360)
        rows["torsion_deg"].append(float(min(torsion, 360.0 - torsion)))
    return {name: np.array(values) for name, values in rows.items()}


def analyse(runs: Path, hot_path: Path) -> list:
    import ase.io

    from bayesrace import load_posterior, read_frames
    from bayesrace.uq import spearman

    log = json.loads((runs / "otf" / "otf_log.json").read_text())
    labelled_path = runs / "otf" / "labelled.xyz"
    labelled, labelled_atoms = read_frames(labelled_path), ase.io.read(labelled_path, ":")
    hot, hot_atoms = read_frames(hot_path), ase.io.read(hot_path, ":")
    rows = []
    for record in log["rounds"]:
        r = record["round"]
        picks = [i for i, a in enumerate(labelled_atoms) if a.info.get("al_round") == r + 1]
        halting = [i for i in picks if labelled_atoms[i].info.get("md_step") == record["step_reached"]]
        if not record.get("halted") or not halting:
            continue
        posterior = load_posterior(runs / "otf" / f"round_{r}" / "posterior_calibrated.pt")
        on_picks = per_frame(posterior, [labelled[i] for i in picks], [labelled_atoms[i] for i in picks])
        on_hot = per_frame(posterior, hot, hot_atoms)
        at_halt = {name: float(values[picks.index(halting[0])]) for name, values in on_picks.items()}
        rows.append(dict(
            round=r, halt_step=record["step_reached"], halt=at_halt,
            halt_mean_error_percentile=float((on_hot["mean_error"] < at_halt["mean_error"]).mean() * 100),
            picks_median_mean_error=float(np.median(on_picks["mean_error"])),
            hot_median_mean_error=float(np.median(on_hot["mean_error"])),
            hot_p90_mean_error=float(np.percentile(on_hot["mean_error"], 90)),
            hot_median_max_relative_sigma=float(np.median(on_hot["max_relative_sigma"])),
            hot_spearman_sigma_error=spearman(on_hot["mean_error"], on_hot["max_relative_sigma"]),
        ))
        print(table_row(rows[-1]), flush=True)
    return rows


HEADER = ("| round | halt step | halting frame: mean / max \\|ΔF_i\\| [meV/Å] | its max relative σ | "
          "its mean \\|ΔF_i\\| as a hot-set percentile | its \\|C=C torsion\\| [°] | picks' median mean \\|ΔF_i\\| | "
          "hot set: median / 90th pct mean \\|ΔF_i\\| | hot set: median max relative σ | hot set: Spearman(σ, error) |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def table_row(row: dict) -> str:
    halt = row["halt"]
    return (f"| {row['round']} | {row['halt_step']} | {halt['mean_error'] * 1e3:.0f} / {halt['max_error'] * 1e3:.0f} | "
            f"{halt['max_relative_sigma']:.3f} | {row['halt_mean_error_percentile']:.0f} | {halt['torsion_deg']:.0f} | "
            f"{row['picks_median_mean_error'] * 1e3:.0f} | {row['hot_median_mean_error'] * 1e3:.0f} / "
            f"{row['hot_p90_mean_error'] * 1e3:.0f} | {row['hot_median_max_relative_sigma']:.3f} | "
            f"{row['hot_spearman_sigma_error']:.2f} |")


def write_report(out: Path, record: dict) -> None:
    machine = record["machine"]
    lines = ["# On-the-fly halts: each round's model on the frame it halted at", "",
             f"Command: `{record['command']}`  ", f"Commit: {record['commit']}  ",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, load {' '.join(machine['load_at_start'])} "
             f"(1, 5, 15 min) at the start, torch {machine['torch']}", "",
             "|ΔF_i| is the norm of atom i's force error against GFN2-xTB; 'mean' averages it over the "
             "frame's atoms. The hot set is test_ood_hot.xyz (1000/1500 K, ASE Langevin).", "", HEADER]
    lines += [table_row(row) for row in record["rows"]]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, help="an al_otf.py --runs folder")
    parser.add_argument("--hot", type=Path, default=PSB3_DIR / "test_ood_hot.xyz")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md from results.json")
    args = parser.parse_args(argv)
    if args.report_only:
        write_report(args.out, json.loads((args.out / "results.json").read_text()))
        return 0
    record = dict(command=command_line("al_otf_halts.py", argv), commit=git_commit(), machine=machine_info())
    print(HEADER, flush=True)
    record.update(runs=str(args.runs), rows=analyse(args.runs, args.hot))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", record)
    write_report(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
