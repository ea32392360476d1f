#!/usr/bin/env python
"""The energy zero of a warm-started active-learning round: how far one round shifts it, and
what sets the shift (epochs, repeats of the acquired frames).

The hot on-the-fly runs (bench/al_otf.py, 10 epochs a round, acquired frames ×10) shifted the
mean energy error on the in-distribution test set by +7 to +47 meV/atom over their rounds while
the force errors fell. This reproduces one such round without MD or labelling: a base ensemble
trained on PSB3's 300 K frames (as al_otf's round 0), then one round warm-started from it on
those frames plus 80 of test_ood_hot's 1000–1500 K frames (GFN2-xTB labels, the loop's kind of
acquired frames) repeated ``R`` times, for ``E`` epochs at the rounds' learning rate, for each
variant ``R:E``. Each posterior is scored on test_id, the 300 K training frames, the 80 acquired
frames and the other hot frames: force MAE, energy RMSE and the signed mean energy error per atom.

    python bench/al_round_drift.py [--variants 10:10 10:30 3:10] [--acquired 80] [--runs DIR] [--out DIR]

A variant ``R:E:h<δ>:z`` also sets loss.force_huber = δ eV/Å (``h``) and loss.refit_energy_zero
(``z``). ``--acquired-file`` takes the acquired frames from a file instead (e.g. the halting
and look-ahead frames an on-the-fly run labelled); hot_rest is then the whole hot set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_DIR, PSB3_DIR, cli_command, command_line, git_commit, uptime, write_config  # noqa: E402
from al_otf import training_section, write_300k_data  # noqa: E402

N_ACQUIRED = 80


class _Settings:
    """The on-the-fly benchmark's settings (its 1200 K and 800 K runs) for training_section."""
    means = "frozen"
    warmup = 2
    preset = "small"
    seed = 0
    refit_energy_zero = False  # the base's; a variant's flags set them for its round
    force_huber = 0.0

    def __init__(self, members: int):
        self.members = members


def train(config: dict, path: Path) -> float:
    """``bayesrace train`` unless the posterior exists; the wall seconds it took (0 if it existed)."""
    if (Path(config["out"]) / "posterior.pt").is_file():
        return 0.0
    started = time.perf_counter()
    subprocess.run(cli_command("train", write_config(config, path), quiet=True), check=True)
    return time.perf_counter() - started


def main(argv=None) -> int:
    import ase.io
    import torch

    from bayesrace.bayes import load_posterior
    from bayesrace.data import read_frames
    from bayesrace.uq import predict_frames, set_metrics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["10:10", "10:30", "3:10"],
                        help="R:E — acquired frames repeated R times, E epochs")
    parser.add_argument("--members", type=int, default=2)
    parser.add_argument("--acquired", type=int, default=N_ACQUIRED,
                        help=f"hot frames acquired (the first of one shuffle; the rest from the {N_ACQUIRED}th on are hot_rest)")
    parser.add_argument("--acquired-file", type=Path, default=None, help="labelled frames to acquire instead")
    parser.add_argument("--base-epochs", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.005)
    parser.add_argument("--round-lr", type=float, default=0.002)
    parser.add_argument("--runs", type=Path, default=BENCH_DIR / "runs" / "al_round_drift")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "al_round_drift")
    args = parser.parse_args(argv)
    if not 1 <= args.acquired <= N_ACQUIRED:
        parser.error(f"--acquired must lie in [1, {N_ACQUIRED}] (the rest of the hot set is hot_rest), got {args.acquired}")
    torch.set_num_threads(1)
    settings = _Settings(args.members)
    data = write_300k_data(args.runs / "data")
    base = training_section(settings, data, args.base_epochs, args.lr)
    base.update(out=str(args.runs / "base"))
    base["data"]["train"] = str(data["train"])
    seconds = {"base": train(base, args.runs / "base.yaml")}

    hot = ase.io.read(PSB3_DIR / "test_ood_hot.xyz", ":")
    order = np.random.default_rng(0).permutation(len(hot))
    if args.acquired_file:
        acquired, rest, prefix = ase.io.read(args.acquired_file, ":"), hot, f"round_{args.acquired_file.stem}_"
    else:
        acquired, rest = [hot[i] for i in order[:args.acquired]], [hot[i] for i in order[N_ACQUIRED:]]
        prefix = "round_" if len(acquired) == N_ACQUIRED else f"round_n{len(acquired)}_"
    ase.io.write(args.runs / "acquired.xyz", acquired)
    ase.io.write(args.runs / "hot_rest.xyz", rest)
    names = ["base"]
    for variant in args.variants:
        repeats, epochs, *flags = variant.split(":")
        repeats, epochs = int(repeats), int(epochs)
        name = prefix + "_".join([f"x{repeats}", f"ep{epochs}", *flags])
        ase.io.write(args.runs / f"{name}.xyz", ase.io.read(data["train"], ":")
                     + [atoms for atoms in acquired for _ in range(repeats)])
        config = training_section(settings, data, epochs, args.round_lr)
        for flag in flags:
            if flag == "z":
                config["loss"]["refit_energy_zero"] = True
            elif flag.startswith("h"):
                config["loss"]["force_huber"] = float(flag[1:])
            else:
                parser.error(f"variant {variant!r}: unknown flag {flag!r} (h<δ> or z)")
        config.update(out=str(args.runs / name))
        config["data"]["train"] = str(args.runs / f"{name}.xyz")
        config["training"]["init_from"] = str(args.runs / "base" / "posterior.pt")
        seconds[name] = train(config, args.runs / f"{name}.yaml")
        names.append(name)

    sets = {"test_id": read_frames(PSB3_DIR / "test_id.xyz"), "train_300K": read_frames(data["train"]),
            "acquired": read_frames(args.runs / "acquired.xyz"), "hot_rest": read_frames(args.runs / "hot_rest.xyz")}
    results = {}
    for name in names:
        posterior = load_posterior(args.runs / name / "posterior.pt", dtype=torch.float64).eval()
        results[name] = {s: set_metrics(predict_frames(posterior, frames)) for s, frames in sets.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"results": results, "train_seconds": seconds}, indent=1) + "\n")
    lines = ["# The energy zero of one warm-started round (bench/al_round_drift.py)", "",
             f"Command: `{command_line('al_round_drift.py', argv)}`; commit `{git_commit()}`; load `{uptime()}`.",
             f"Base: {args.members}-member NLL_JEF ensemble (preset small, means frozen) on {data['n_train']} PSB3 300 K "
             f"frames, {args.base_epochs} epochs; rounds warm-started from it at lr {args.round_lr} on those frames "
             f"+ {len(acquired)} {'frames of ' + str(args.acquired_file) if args.acquired_file else 'hot frames'} ×R. "
             f"Training wall s (0: reused): {seconds}.", "",
             "σ_F,epi: the mean epistemic force σ (the members' disagreement), what the on-the-fly loop halts on.", "",
             "| posterior | set | F MAE [meV/Å] | E RMSE [meV/atom] | mean E error [meV/atom] | σ_F,epi [meV/Å] |",
             "|---|---|---:|---:|---:|---:|"]
    for name in names:
        for s, m in results[name].items():
            lines.append(f"| {name} | {s} | {1000 * m['forces_mae_eV_per_A']:.1f} | {m['energy_rmse_meV_per_atom']:.2f} | "
                         f"{m['energy_mean_error_meV_per_atom']:+.2f} | "
                         f"{1000 * (m.get('forces_sigma_epistemic_mean_eV_per_A') or float('nan')):.1f} |")
    text = "\n".join(lines) + "\n"
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
