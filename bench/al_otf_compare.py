"""Several on-the-fly runs side by side: how far MD got against labels spent and CPU time.

Each run is ``name=PATH``, PATH a ``bench/al_otf.py --out`` folder (its results.json) or a run
folder still in progress (``--runs``: its otf/otf_log.json, no evaluation yet). Plots the step
reached after each round against the labels acquired so far and against the loop's cumulative
wall time (training, MD, control runs, labelling), and writes a table with the hot-set force MAE
of round 0 and of the last round where the run was evaluated.

    python bench/al_otf_compare.py warm=bench/results/al_otf/1200K_..._seed1 \\
        fresh=/work/runs/otf1200_fresh_s1 --out bench/results/al_otf/compare_1200K_seed1
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _common import command_line, git_commit, machine_info, write_json


def load_run(path: Path) -> dict:
    """The rounds (and, when finished, settings and evaluation) of one on-the-fly run."""
    for candidate in (path / "results.json", path / "otf" / "otf_log.json", path):
        if candidate.is_file():
            data = json.loads(candidate.read_text())
            if "rounds" not in data:
                raise SystemExit(f"{candidate}: no 'rounds' list; expected an al_otf results.json or otf_log.json")
            runs_dir = data.get("settings", {}).get("runs") or (path if candidate.parent.name == "otf" else None)
            return {"source": str(candidate), "rounds": data["rounds"], "n_steps": data.get("n_steps")
                    or data.get("settings", {}).get("steps"), "evaluation": data.get("evaluation", {}),
                    "status": data.get("status"), "validation": data.get("settings", {}).get("validation", []),
                    "runs_dir": Path(runs_dir) if runs_dir else None}
    raise SystemExit(f"{path}: neither results.json nor otf/otf_log.json found")


def members_training_s(runs_dir, round_index: int):
    """The members' own training seconds of one round (each member's last ``elapsed_s``, which
    carries over a resume from checkpoint); None when the run folder is not on this machine."""
    if runs_dir is None or round_index == 0:  # round 0's model is the base, not counted
        return None
    files = sorted((Path(runs_dir) / "otf" / f"round_{round_index}").glob("member_*/metrics.jsonl"))
    if not files:
        return None
    total = 0.0
    for path in files:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        total += json.loads(lines[-1])["elapsed_s"] if lines else 0.0
    return total


def progress(run: dict) -> dict:
    """Per round: labels acquired before its MD segment, cumulative wall s after it, step reached.

    A round resumed after a kill records only the resumed part of its training; where the run
    folder is at hand, the members' own cumulative training seconds replace it when larger."""
    labels, seconds, steps, total_labels, total_s = [], [], [], 0, 0.0
    for entry in run["rounds"]:
        if "step_reached" not in entry:
            break  # a round still running
        times = dict(entry.get("time_s", {}))
        members_s = members_training_s(run.get("runs_dir"), entry["round"])
        if members_s is not None:
            times["train"] = max(times.get("train", 0.0), members_s)
        total_s += sum(times.values())
        labels.append(total_labels)
        seconds.append(total_s)
        steps.append(entry["step_reached"])
        total_labels += entry.get("labels_added", 0)
    return {"labels": labels, "wall_s": seconds, "step": steps, "labels_total": total_labels}


def hot_mae(run: dict) -> tuple:
    """Hot-set force MAE [meV/Å] of round 0 and of the last evaluated round (None where not evaluated)."""
    evaluated = sorted(run["evaluation"], key=int)
    if not evaluated:
        return None, None, None
    mae = lambda key: 1000 * run["evaluation"][key]["test_ood_hot"]["forces_mae_eV_per_A"]
    return mae(evaluated[0]), mae(evaluated[-1]), int(evaluated[-1])


def table(runs: dict, tracks: dict) -> list:
    lines = ["| run | status | MD segments | labels | step reached / requested | loop wall [h] | hot F MAE [meV/Å] "
             "round 0 → last | validation runs (seed: step) |", "|---|---|---:|---:|---|---:|---|---|"]
    for name, run in runs.items():
        track = tracks[name]
        first, last, last_round = hot_mae(run)
        mae = f"{first:.0f} → {last:.0f} (round {last_round})" if first is not None else "not evaluated"
        validation = ", ".join(f"r{v['round']} s{v['seed']}: {v['step_reached']}" for v in run["validation"]) or "—"
        lines.append(f"| {name} | {run['status'] or 'running'} | {len(track['step'])} | {track['labels_total']} | "
                     f"{track['step'][-1] if len(track['step']) else 0} / {run['n_steps']} | "
                     f"{track['wall_s'][-1] / 3600 if len(track['wall_s']) else 0:.2f} | {mae} | {validation} |")
    return lines


def plot(runs: dict, tracks: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_labels, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, track in tracks.items():
        by_labels.step(track["labels"], track["step"], where="post", marker="o", label=name)
        by_time.plot([s / 3600 for s in track["wall_s"]], track["step"], marker="o", label=name)
    n_steps = max(run["n_steps"] or 0 for run in runs.values())
    for axis, xlabel in ((by_labels, "labels acquired before the segment"), (by_time, "loop wall time [h]")):
        axis.axhline(n_steps, color="grey", linestyle=":", label="requested length")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("MD step reached")
        axis.grid(alpha=0.3)
    by_labels.legend(fontsize=8)
    figure.suptitle("On-the-fly runs: progress per round")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="name=PATH, PATH an al_otf --out or --runs folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        name, separator, path = item.partition("=")
        if not separator or not name:
            raise SystemExit(f"run {item!r}: expected name=PATH")
        runs[name] = load_run(Path(path))
    args.out.mkdir(parents=True, exist_ok=True)
    tracks = {name: progress(run) for name, run in runs.items()}
    plot(runs, tracks, args.out / "progress.png")
    lines = table(runs, tracks)
    print("\n".join(lines))
    header = ["# On-the-fly runs compared (bench/al_otf_compare.py)", "",
              f"Command: `{command_line('al_otf_compare.py', argv)}`  ",
              f"Commit: {git_commit()}  ", "",
              *(f"- {name}: `{run['source']}`" for name, run in runs.items()), "",
              "Loop wall time sums each round's training, calibration, export, MD, control run, selection "
              "and labelling; base training is not in it. A round's training counts the members' own "
              "cumulative training seconds where the run folder is at hand (so a round resumed after a "
              "kill is not undercounted). Plot: `progress.png`.", ""]
    (args.out / "results.md").write_text("\n".join(header + lines) + "\n")
    write_json(args.out / "results.json", {"command": command_line("al_otf_compare.py", argv),
                                           "commit": git_commit(), "machine": machine_info(),
                                           "runs": {name: {"source": runs[name]["source"], **track}
                                                    for name, track in tracks.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
