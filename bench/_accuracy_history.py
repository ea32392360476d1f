"""The acac accuracy benchmark (bench/accuracy.py): its data set, and what the training
histories (``member_*/metrics.jsonl``) say: per-member summaries, the learning curve at fixed
times, the effect of the MSE -> NLL_JEF switch, and the learning-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from _common import ACAC_DIR

TRAIN_FILE = ACAC_DIR / "train_300K.xyz"
ISOLATED_FILE = ACAC_DIR / "isolated_atoms.xyz"
TEST_SETS = {"test_MD_300K": ACAC_DIR / "test_MD_300K.xyz", "test_MD_600K": ACAC_DIR / "test_MD_600K.xyz"}
N_ATOMS = 15  # acetylacetone, C5H8O2

# published MACE test RMSEs on this data set (long GPU training), for scale
MACE_REFERENCE = {"test_MD_300K": {"energy_rmse_meV": 1.0, "forces_rmse_meV_per_A": 5.0}}


def read_history(run_dir: Path, members: int) -> List[List[Dict]]:
    histories = []
    for member in range(members):
        path = run_dir / f"member_{member}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        histories.append(rows)
    return histories


def history_summary(rows: List[Dict]) -> Dict:
    if not rows:
        return {"epochs": 0}
    finite = all(
        math.isfinite(r[k]) for r in rows for k in ("train_loss", "valid_loss", "valid_force_rmse",
                                                    "valid_energy_rmse_per_atom")
    )
    switch = next((r["epoch"] for r in rows if r["loss_kind"] != rows[0]["loss_kind"]), None)
    forces = [r["valid_force_rmse"] for r in rows]
    # a jump of the validation force RMSE to more than twice its best so far: a sign of divergence
    jumps = [
        r["epoch"] for i, r in enumerate(rows) if i > 0 and r["valid_force_rmse"] > 2.0 * min(forces[:i])
    ]
    return {
        "epochs": len(rows),
        "elapsed_s": round(rows[-1]["elapsed_s"], 1),
        "s_per_epoch": round(rows[-1]["elapsed_s"] / len(rows), 2),
        "final_lr": rows[-1]["lr"],
        "loss_kinds": sorted({r["loss_kind"] for r in rows}),
        "first_epoch_of_second_loss": switch,
        "all_finite": finite,
        "valid_force_rmse_jumps_epochs": jumps,
        "best_valid_force_rmse_meV_per_A": round(1000 * min(forces), 2),
        "final_valid_force_rmse_meV_per_A": round(1000 * forces[-1], 2),
        "final_valid_energy_rmse_meV_per_atom": round(1000 * rows[-1]["valid_energy_rmse_per_atom"], 3),
    }


def curve_at(rows: List[Dict], minutes: float, key: str) -> Optional[float]:
    """Value of ``key`` at the last epoch that ended within ``minutes`` (None if none did)."""
    done = [r for r in rows if r["elapsed_s"] <= 60.0 * minutes + 1e-9]
    return done[-1][key] if done else None


def loss_switch_effect(rows: List[Dict]) -> Optional[Dict]:
    """What the switch MSE -> second loss did to the validation RMSEs of one member."""
    index = next((i for i, r in enumerate(rows) if r["loss_kind"] != rows[0]["loss_kind"]), None)
    if index is None or index == 0:
        return None
    before = rows[index - 1]
    after = rows[index:]
    peak_f = max(r["valid_force_rmse"] for r in after[:10])
    peak_e = max(r["valid_energy_rmse_per_atom"] for r in after[:10])
    back = next((r for r in after if r["valid_force_rmse"] <= before["valid_force_rmse"]), None)
    return {
        "switch_epoch": rows[index]["epoch"],
        "switch_minutes": round(before["elapsed_s"] / 60.0, 2),
        "force_rmse_before_meV_per_A": round(1000 * before["valid_force_rmse"], 1),
        "force_rmse_peak_meV_per_A": round(1000 * peak_f, 1),
        "energy_rmse_before_meV_per_atom": round(1000 * before["valid_energy_rmse_per_atom"], 2),
        "energy_rmse_peak_meV_per_atom": round(1000 * peak_e, 2),
        "epochs_to_recover_force_rmse": None if back is None else back["epoch"] - before["epoch"],
        "minutes_to_recover_force_rmse": None if back is None else round((back["elapsed_s"] - before["elapsed_s"]) / 60, 2),
    }


def per_doubling(rows: List[Dict], minutes: float, key: str = "valid_force_rmse") -> Optional[float]:
    """Factor by which ``key`` changed over the last doubling of training time (minutes/2 -> minutes)."""
    a, b = curve_at(rows, minutes / 2.0, key), curve_at(rows, minutes, key)
    return None if a is None or b is None or a <= 0 else round(b / a, 3)


def learning_curve_table(single: List[Dict], members: List[List[Dict]], marks: List[float]) -> List[Dict]:
    table = []
    for t in marks:
        row = {"minutes": t}
        f = curve_at(single, t, "valid_force_rmse")
        e = curve_at(single, t, "valid_energy_rmse_per_atom")
        row["single_force_rmse_meV_per_A"] = None if f is None else round(1000 * f, 2)
        row["single_energy_rmse_meV_per_atom"] = None if e is None else round(1000 * e, 3)
        fs = [curve_at(m, t, "valid_force_rmse") for m in members]
        es = [curve_at(m, t, "valid_energy_rmse_per_atom") for m in members]
        fs = [1000 * v for v in fs if v is not None]
        es = [1000 * v for v in es if v is not None]
        row["members_force_rmse_meV_per_A_mean"] = round(float(np.mean(fs)), 2) if fs else None
        row["members_force_rmse_meV_per_A_range"] = [round(min(fs), 2), round(max(fs), 2)] if fs else None
        row["members_energy_rmse_meV_per_atom_mean"] = round(float(np.mean(es)), 3) if es else None
        row["members_reporting"] = len(fs)
        table.append(row)
    return table


def plot_learning_curve(single: List[Dict], members: List[List[Dict]], path: Path, budget_minutes: float) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.3), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    series = [("single (MSE)", single, "k", "-")] + [
        (f"ensemble member {i} (MSE → NLL_JEF)", rows, f"C{i % 10}", "-") for i, rows in enumerate(members)
    ]
    for label, rows, colour, style in series:
        if not rows:
            continue
        t = np.array([r["elapsed_s"] for r in rows]) / 60.0
        f = 1000 * np.array([r["valid_force_rmse"] for r in rows])
        e = 1000 * np.array([r["valid_energy_rmse_per_atom"] for r in rows])
        width = 2.0 if colour == "k" else 1.0
        axes[0].plot(t, f, style, color=colour, linewidth=width, label=label)
        axes[1].plot(t, e, style, color=colour, linewidth=width, label=label)
        switch = next((i for i, r in enumerate(rows) if r["loss_kind"] != rows[0]["loss_kind"]), None)
        if switch is not None:
            axes[0].plot(t[switch], f[switch], "o", color=colour, markersize=4)
            axes[1].plot(t[switch], e[switch], "o", color=colour, markersize=4)
    axes[0].axhline(5.0, color="0.5", linestyle="--", linewidth=0.8, label="MACE test 300 K (~5 meV/Å)")
    axes[1].axhline(1.0 / N_ATOMS, color="0.5", linestyle="--", linewidth=0.8,
                    label="MACE test 300 K (~1 meV = 0.067 meV/atom)")
    for axis, ylabel in zip(axes, ("validation force RMSE [meV/Å]", "validation energy RMSE [meV/atom]")):
        axis.set_yscale("log")
        axis.set_xlabel("elapsed training time per member [min]")
        axis.set_ylabel(ylabel)
        axis.set_xlim(0, max([budget_minutes] + [r["elapsed_s"] / 60.0 for _, rows, _, _ in series for r in rows])
                      * 1.03)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[0].set_title("forces (EMA weights, 50 validation structures)")
    axes[1].set_title("energies (dots: switch MSE → NLL_JEF)")
    figure.savefig(path, dpi=120)
