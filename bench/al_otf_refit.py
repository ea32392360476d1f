"""Is an on-the-fly run's last model short of what its data allow? The last round's training
set refitted warm (as the loop does) and from scratch, with more epochs or another lr.

Takes an ``bench/al_otf.py --runs`` folder and its last trained round r (its config.json and
train.xyz: the 300 K frames plus every label so far, repeated as the loop did). Each variant
trains ``--members`` members on exactly that file with the round's loss and model:

- ``warm:E:LR``: warm-started from round r−1's posterior (member k from its member k), E epochs
  at lr LR — ``warm:30:0.002`` repeats the loop's own round;
- ``warm:E:LR:sλ``: the same with ``training.init_shrink`` λ (λ × round r−1's weights + (1 − λ) ×
  a fresh initialisation's);
- ``scratch:E:LR``: a fresh initialisation (with the config's MSE warm-up), E epochs at lr LR.

Every posterior (the round's own and each variant's) is scored on the labels the loop acquired
(``labelled``, trained on), the 300 K training frames, test_id and the 1000/1500 K test set
(force MAE of the ensemble mean and of member 0 alone). A warm round well above a scratch fit
on the same file means the loop's rounds under-train; equal ones mean the data is the limit.

    python bench/al_otf_refit.py /work/runs/otf1200_s1 --variants warm:30:0.002 warm:90:0.002 scratch:120:0.005 \
        --members 1 --runs /work/runs/refit1200 --out bench/results/al_otf/1200K_..._seed1/refit
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
from _common import PSB3_DIR, cli_command, command_line, git_commit, uptime, write_config, write_json  # noqa: E402


def last_trained_round(otf: Path) -> int:
    rounds = [int(p.name.split("_")[1]) for p in otf.glob("round_*") if (p / "config.json").is_file()]
    if not rounds:
        raise SystemExit(f"{otf}: no round_*/config.json (not an on-the-fly run folder?)")
    return max(rounds)


def variant_config(round_config: dict, variant: str, members: int, previous: Path, out: Path) -> dict:
    kind, epochs, lr, *shrink = variant.split(":")
    if kind not in ("warm", "scratch") or len(shrink) > 1 or (shrink and (kind != "warm" or shrink[0][:1] != "s")):
        raise SystemExit(f"variant {variant!r}: expected warm:E:LR, warm:E:LR:sλ or scratch:E:LR")
    config = json.loads(json.dumps(round_config))
    config["out"] = str(out)
    config["training"].update(max_epochs=int(epochs), lr=float(lr),
                              init_from=str(previous / "posterior.pt") if kind == "warm" else None)
    if shrink:
        config["training"]["init_shrink"] = float(shrink[0][1:])
    config["ensemble"]["members"] = members
    return config


def force_maes(posterior, frames) -> dict:
    from bayesrace import keys
    from bayesrace.uq import predict_frames, reference_key

    prediction = predict_frames(posterior, frames)
    reference = prediction[reference_key(keys.FORCES)]
    return {"mean": float(np.abs(prediction[keys.FORCES] - reference).mean()),
            "member_0": float(np.abs(prediction[keys.MEMBER_FORCES][0] - reference).mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_folder", type=Path, help="an al_otf.py --runs folder")
    parser.add_argument("--variants", nargs="+", default=["warm:30:0.002", "warm:90:0.002", "scratch:120:0.005"])
    parser.add_argument("--members", type=int, default=1)
    parser.add_argument("--runs", type=Path, required=True, help="where the variants train")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    import torch

    from bayesrace import load_posterior, read_frames

    torch.set_num_threads(1)
    otf = args.runs_folder / "otf"
    r = last_trained_round(otf)
    round_dir = otf / f"round_{r}"
    round_config = json.loads((round_dir / "config.json").read_text())
    if r == 0:
        raise SystemExit(f"{otf}: only round 0 was trained; nothing to warm-start from")
    command, started_load = command_line("al_otf_refit.py", argv), uptime()
    posteriors = {f"round {r} (the loop's, {round_config['ensemble']['members']} members)": round_dir / "posterior.pt"}
    seconds = {}
    for variant in args.variants:
        out = args.runs / variant.replace(":", "_")
        config = variant_config(round_config, variant, args.members, otf / f"round_{r - 1}", out)
        if not (out / "posterior.pt").is_file():
            begun = time.perf_counter()
            subprocess.run(cli_command("train", write_config(config, args.runs / f"{out.name}.yaml")), check=True)
            seconds[variant] = round(time.perf_counter() - begun)
        posteriors[variant] = out / "posterior.pt"

    sets = {"labelled (trained on)": otf / "labelled.xyz", "train_300K": args.runs_folder / "data" / "train_300K.xyz",
            "test_id": PSB3_DIR / "test_id.xyz", "hot (1000/1500 K)": PSB3_DIR / "test_ood_hot.xyz"}
    frames = {name: read_frames(path) for name, path in sets.items()}
    rows = {}
    for name, path in posteriors.items():
        posterior = load_posterior(path).eval()
        rows[name] = {s: force_maes(posterior, f) for s, f in frames.items()}
        print(name, {s: round(v["mean"] * 1e3) for s, v in rows[name].items()}, flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", dict(command=command, commit=git_commit(), load=started_load,
                                                round=r, train_seconds=seconds, rows=rows))
    lines = [f"# Round {r} of {args.runs_folder.name} refitted: warm (as the loop) against scratch", "",
             f"Command: `{command}`  ", f"Commit: {git_commit()}; load at the start: `{started_load}`  ",
             f"Training file: {round_dir / 'train.xyz'} (the loop's round {r}); variants train {args.members} "
             f"member(s), warm ones from round {r - 1}'s posterior; wall s of the trainings this invocation ran "
             f"(the others existed in --runs and were reused): {seconds}.", "",
             "Force MAE [meV/Å] of the ensemble mean / of member 0 alone:", "",
             "| posterior | " + " | ".join(sets) + " |", "|---|" + "---:|" * len(sets)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s]['mean'] * 1e3:.0f} / {row[s]['member_0'] * 1e3:.0f}"
                                                 for s in sets) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
