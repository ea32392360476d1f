#!/usr/bin/env python
"""Do an on-the-fly run's retrained posteriors fit the labels they were given?

For every round's calibrated posterior of a ``bayesrace al`` (mode on_the_fly) run, the largest
epistemic force σ and the largest force error of each acquired frame (``labelled.xyz``), with
the round that acquired it: a frame a round trained on should be fitted (small error) and
agreed on (small σ_epi) by that round's members.

    python bench/al_label_fit.py RUN_DIR [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, git_commit  # noqa: E402


def per_frame_max(values: np.ndarray, batch: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -np.inf)
    np.maximum.at(out, batch, values)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import ase.io

    from bayesrace import keys
    from bayesrace.bayes import load_posterior
    from bayesrace.data import read_frames
    from bayesrace.uq import predict_frames, reference_key

    labelled = args.run / "labelled.xyz"
    tags = [(int(a.info["al_round"]), int(a.info["md_step"])) for a in ase.io.read(labelled, ":")]
    frames = read_frames(labelled)
    rounds = sorted(int(p.name.split("_")[1]) for p in args.run.glob("round_*")
                    if (p / "posterior_calibrated.pt").is_file())
    lines = ["# Acquired frames against each round's posterior", "", f"`{command_line('al_label_fit.py', argv)}` "
             f"(commit {git_commit()})", "", "Max epistemic force σ / max |ΔF| per acquired frame [eV/Å]; "
             "a frame joins the training set of the round named in its column.", "",
             "| posterior | " + " | ".join(f"r{r} step {s}" for r, s in tags) + " |",
             "|---|" + "---|" * len(tags)]
    for r in rounds:
        posterior = load_posterior(args.run / f"round_{r}" / "posterior_calibrated.pt")
        posterior.eval()
        p = predict_frames(posterior, frames)
        batch, n = p[keys.BATCH], len(frames)
        sigma = per_frame_max(p[keys.ATOMIC_FORCE_STD_EPISTEMIC], batch, n)
        error = per_frame_max(np.linalg.norm(p[keys.FORCES] - p[reference_key(keys.FORCES)], axis=1), batch, n)
        cells = [f"{s:.2f} / {e:.2f}" + (" *" if r >= acquired else "") for s, e, (acquired, _) in
                 zip(sigma, error, tags)]
        lines.append(f"| round {r} | " + " | ".join(cells) + " |")
    lines += ["", "\\* the posterior was trained on that frame (×acquired_repeats)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
