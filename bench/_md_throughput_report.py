"""What bench/md_throughput.py's measurements say: ratios against the baselines of the same run
(M = 1, 1 rank, halo shell, SNAP), the installed plugin it ran, and the markdown report."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Optional


def plugin_info() -> Dict:
    """The installed bayesraceplugin.so LAMMPS loads: path, sha256 (12 hex digits), modification
    time, and whether it knows the ``halo`` keyword (other engineers reinstall it while we run)."""
    import time

    from bayesrace.lammps import plugin_directory

    try:
        path = Path(plugin_directory()) / "bayesraceplugin.so"
        blob = path.read_bytes()
    except (OSError, FileNotFoundError) as error:
        return {"error": str(error)}
    return {
        "path": str(path),
        "sha256": hashlib.sha256(blob).hexdigest()[:12],
        "modified": time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime)),
        "has_halo_keyword": b"halo_layer" in blob or b"'halo' needs" in blob,
    }


def _find(rows: List[Dict], **key) -> Optional[Dict]:
    return next((r for r in rows if "error" not in r and all(r.get(k) == v for k, v in key.items())), None)


def _ratio(numerator: Optional[Dict], denominator: Optional[Dict]) -> Optional[float]:
    """numerator's ms/step over denominator's (None when either is missing)."""
    if numerator is None or denominator is None:
        return None
    return numerator["ms_per_step"] / denominator["ms_per_step"]


def add_ratios(rows: List[Dict], snap_rows: List[Dict]) -> None:
    """Per row: cost against M = 1, speed-up and parallel efficiency against 1 rank (same halo),
    speed against halo shell (same M and ranks), and SNAP's parallel efficiency at the same ranks."""
    for row in snap_rows:
        if "error" in row:
            continue
        row["speedup_vs_one_rank"] = _ratio(_find(snap_rows, system=row["system"], ranks=1), row)
        row["parallel_efficiency"] = None if row["speedup_vs_one_rank"] is None else row["speedup_vs_one_rank"] / row["ranks"]
    for row in rows + snap_rows:
        if "error" in row or row.get("rank0_user_ms_per_step") is None:
            continue
        cpu_ms = row["rank0_user_ms_per_step"] + row["rank0_sys_ms_per_step"]
        # below 1: the rank waited for a core (a loaded machine) or for its peers
        row["rank0_cpu_share"] = cpu_ms / row["ms_per_step"]
        # throughput per CPU second (rank 0's CPU × ranks): what the case would give on idle cores
        row["atom_steps_per_cpu_s"] = row["atoms"] * 1000.0 / (cpu_ms * row["ranks"]) if cpu_ms > 0 else None
    for row in rows:
        if "error" in row:
            continue
        same = {"system": row["system"], "halo": row["halo"]}
        row["cost_vs_one_member"] = _ratio(row, _find(rows, members=1, ranks=row["ranks"], **same))
        row["speedup_vs_one_rank"] = _ratio(_find(rows, members=row["members"], ranks=1, **same), row)
        row["parallel_efficiency"] = None if row["speedup_vs_one_rank"] is None else row["speedup_vs_one_rank"] / row["ranks"]
        shell = _find(rows, system=row["system"], members=row["members"], ranks=row["ranks"], halo="shell")
        row["speed_vs_shell"] = _ratio(shell, row)
        snap = _find(snap_rows, system=row["system"], ranks=row["ranks"])
        row["snap_parallel_efficiency"] = snap.get("parallel_efficiency") if snap else None


def _f(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _changes(lines: List[str]) -> str:
    if not lines:
        return "no uncommitted changes"
    folders = sorted({line[3:].split("/")[0] + ("/" if "/" in line[3:] else "") for line in lines})
    return f"{len(lines)} uncommitted changes in {', '.join(folders)} (listed in the JSON)"


def write_markdown(meta: Dict, rows: List[Dict], snap_rows: List[Dict]) -> str:
    machine, plugin, load = meta["machine"], meta["plugin"], meta.get("load_during_run", {})
    lines = [
        "# LAMMPS MD throughput of pair_style bayesrace",
        "",
        f"Command: `{meta['command']}` ({meta['date']}, {meta['wall_s']:.0f} s wall).",
        f"Commit `{meta['commit']}`; {_changes(meta['uncommitted_changes'])}.",
        f"Plugin `{plugin.get('path')}` (sha256 {plugin.get('sha256')}, built {plugin.get('modified')}); "
        f"LAMMPS reported: loaded {meta.get('lammps_plugins_loaded')}.",
        f"Model preset `{meta['preset']}` ({meta.get('dtype', 'float64')}, cutoff {meta['model']['cutoff']} Å, "
        f"{meta['model']['n_layers']} layers); {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}.",
        f"Load before: `{meta['uptime_before']}`; after: `{meta['uptime_after']}`"
        + (f"; 1-minute load during the run {load['load1_mean']} (min {load['load1_min']}, max {load['load1_max']})."
           if load else "."),
        "",
        "One torch thread per rank; NVE, 0.5 fs, after a 2-step warm-up; global uncertainty read every 10 steps.",
        "Baselines in the same run: M=1 (member cost), 1 rank (speed-up; efficiency = speed-up / ranks), halo",
        "shell (layer's speed-up), LAMMPS SNAP (a local potential's parallel efficiency on the same cells).",
        "Ghosts/rank: LAMMPS' Nghost average over ranks. Peak RSS: the largest process of the run (per rank).",
        "sys ms and minor faults per step: rank 0 over the timed run only (/proc/<pid>/stat before and after, divided",
        "by its force evaluations: steps + 1 for the run's setup). CPU share: rank 0's CPU (user + sys) per step over",
        "the wall time per step (< 1: it waited for a core; MPI polls while it waits for its peers, which counts as",
        "CPU). atom-steps per CPU s: atoms / (rank 0's CPU per step × ranks), roughly the throughput on idle cores",
        "(with 2 ranks it also counts MPI's polling).",
        "",
        "| system | atoms | M | halo | ranks | steps | ms/step | atom-steps/s | × M=1 | speed-up vs 1 rank | efficiency "
        "| SNAP efficiency | speed vs shell | ghosts/rank | peak RSS/rank [MiB] | sys ms/step | minor faults/step "
        "| CPU share | atom-steps per CPU s |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['system']} | | {r['members']} | {r['halo']} | {r['ranks']} | | failed "
                         "| | | | | | | | | | | | |")
            continue
        lines.append(
            f"| {r['system']} | {r['atoms']} | {r['members']} | {r['halo']} | {r['ranks']} | {r['steps']} | "
            f"{r['ms_per_step']:.2f} | {r['atom_steps_per_s']:.0f} | {_f(r['cost_vs_one_member'])} | "
            f"{_f(r['speedup_vs_one_rank'])} | {_f(r['parallel_efficiency'])} | {_f(r['snap_parallel_efficiency'])} | "
            f"{_f(r['speed_vs_shell'])} | {_f(r['ghosts_per_rank'], 0)} | {r['peak_rss_mib']:.0f} | "
            f"{_f(r.get('rank0_sys_ms_per_step'), 1)} | {_f(r.get('rank0_minor_faults_per_step'), 0)} | "
            f"{_f(r.get('rank0_cpu_share'))} | {_f(r.get('atom_steps_per_cpu_s'), 0)} |"
        )
    if snap_rows:
        snap = meta["snap"]
        lines += [
            "",
            f"## Baseline: LAMMPS SNAP (linear, twojmax {snap['twojmax']}, {snap['bispectrum']} bispectrum components, "
            f"cutoff {snap['cutoff']} Å)",
            "",
            f"Tiny random coefficients (the cost does not depend on them), atoms starting at rest (random forces from "
            f"300 K blow the cells apart); {snap['steps_per_bayesrace_step']}× the steps of the bayesrace cases.",
            "",
            "| system | atoms | ranks | steps | ms/step | atom-steps/s | speed-up vs 1 rank | efficiency | ghosts/rank "
            "| peak RSS/rank [MiB] | sys ms/step | minor faults/step | CPU share | atom-steps per CPU s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in snap_rows:
            if "error" in r:
                lines.append(f"| {r['system']} | | {r['ranks']} | | failed | | | | | | | | | |")
                continue
            lines.append(
                f"| {r['system']} | {r['atoms']} | {r['ranks']} | {r['steps']} | {r['ms_per_step']:.3f} | "
                f"{r['atom_steps_per_s']:.0f} | {_f(r['speedup_vs_one_rank'])} | {_f(r['parallel_efficiency'])} | "
                f"{_f(r['ghosts_per_rank'], 0)} | {r['peak_rss_mib']:.0f} | {_f(r.get('rank0_sys_ms_per_step'), 2)} | "
                f"{_f(r.get('rank0_minor_faults_per_step'), 0)} | {_f(r.get('rank0_cpu_share'))} | "
                f"{_f(r.get('atom_steps_per_cpu_s'), 0)} |"
            )
    failed = [r for r in rows + snap_rows if "error" in r]
    if failed:
        lines += ["", "## Failed cases", ""]
        for r in failed:
            last = [line for line in r["error"].splitlines() if line.strip()][-3:]
            lines.append(f"- {r['system']} {r['pair']} M={r['members']} halo={r['halo']} np={r['ranks']}: "
                         + " / ".join(f"`{line.strip()}`" for line in last))
    if meta.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"
