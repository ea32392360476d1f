"""The halting threshold of ``threshold_from: control``: a bound per run, not per structure.

The calibration threshold (1.5 × q_0.99 of a validation set's largest σ) bounds how often single
structures are flagged; an MD run checks thousands of correlated frames, and its largest σ sits in
a tail a validation set of tens of frames cannot see (measured: bench/results/al_otf/sigma_levels,
where the round-0 threshold is crossed by the model's own run at its training temperature). The
control run measures that tail directly: unhalted MD of ``md.control_steps`` steps at
``md.control_temperature`` (the training data's) from ``md.structure`` with the round's own model;
τ = ``md.control_margin`` × the largest σ over its dumped frames. A segment then halts only where
the model is less certain than anywhere in a run of that length where it was trained.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from ..lammps import frame_max_sigma, halting_column, lammps_data_text, run_md_segment

CONTROL_DIR = "control"  # a round's control run (same files as an MD segment)
NEVER_HALT = 1e300  # fix halt's threshold of the control run: it always runs its whole length


def control_threshold(model_path, type_names: Sequence[str], md, workdir: Path, start_atoms, molecule: bool,
                      seed: int) -> Dict[str, Any]:
    """Run the control MD in ``workdir``; returns {threshold, control_max_sigma, control_quantiles
    (q50, q90, q99 of the frames' largest σ), control_frames}."""
    control_md = dataclasses.replace(md, temperature=float(md.control_temperature), thermostat="langevin",
                                     n_steps=int(md.control_steps))
    result = run_md_segment(model_path, type_names, control_md, NEVER_HALT, workdir,
                            lammps_data_text(start_atoms, type_names, md.box), 0, first_segment=True,
                            molecule=molecule, segment_seed=seed)
    column = halting_column(md)
    sigmas = np.array([frame_max_sigma(f, column) for f in result["frames"]], dtype=np.float64)
    if sigmas.size == 0 or not np.all(np.isfinite(sigmas)):
        raise RuntimeError(f"control run in {workdir}: {sigmas.size} dumped frames, "
                           f"{int(np.sum(~np.isfinite(sigmas)))} with a non-finite σ; expected finite σ's "
                           f"(see {Path(workdir) / 'log.md'})")
    largest = float(sigmas.max())
    return dict(threshold=float(md.control_margin) * largest, control_max_sigma=largest,
                control_quantiles=[float(q) for q in np.quantile(sigmas, [0.5, 0.9, 0.99])],
                control_frames=int(sigmas.size))


__all__ = ["control_threshold", "CONTROL_DIR"]
