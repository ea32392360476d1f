"""Halting thresholds from a control run: a bound per run, not per structure.

The calibration threshold (1.5 × q_0.99 of a validation set's largest σ) bounds how often single
structures are flagged; an MD run checks thousands of correlated frames, and its largest σ sits in
a tail a validation set of tens of frames cannot see (measured: bench/results/al_otf/sigma_levels,
where the round-0 threshold is crossed by the model's own run at its training temperature). The
control run measures that tail directly: unhalted MD of a given length at the training data's
temperature with the model itself; τ = margin × the largest σ over its dumped frames. A run then
halts only where the model is less certain than anywhere in a run of that length where it was
trained.

A control run is shorter than the run it guards, and a longer run meets a larger largest σ even
where it is in distribution (of N frames like the control's n, the largest exceeds the control's
largest with chance N/(n+N)). ``md.control_rule: run_length`` therefore extrapolates: the frames'
largest σ's above their 0.9 quantile u are fitted by an exponential tail (excess scale β = their
mean excess, rate λ = 0.1 per frame) and τ = margin × (u + β ln(N λ / α)): the σ that a run of N
checked frames at the control's conditions exceeds α times in expectation (α =
``md.control_false_halts``; the expected count bounds the chance of a false halt, correlated
frames or not). The exponential tail is the light-tailed (Gumbel) case; a σ whose tail is lighter
(a Gaussian's) makes τ higher than needed, i.e. fewer false halts than α.

Used by the on-the-fly loop (``threshold_from: control``, each round's own model) and by
``bayesrace calibrate --control-md`` (thresholds stored in a posterior for ``fix halt``).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any, Dict, Sequence

import numpy as np

from .. import keys
from ..lammps import HALT_COLUMNS, frame_max_sigma, lammps_data_text, run_md_segment
from ._config import MIN_CONTROL_FRAMES

CONTROL_DIR = "control"  # a round's control run (same files as an MD segment)
NEVER_HALT = 1e300  # fix halt's threshold of the control run: it always runs its whole length
# the stored threshold of each dumped σ column (compute bayesrace/atom columns 1, 2, 6)
THRESHOLD_KEYS = {"total": keys.ATOMIC_FORCE_STD, "epistemic": keys.ATOMIC_FORCE_STD_EPISTEMIC,
                  "relative": keys.ATOMIC_FORCE_STD_RELATIVE, "feature": keys.ATOMIC_FEATURE_DISTANCE}


TAIL_FRACTION = 0.1  # the run_length rule fits the frames above this upper fraction of the control's


def run_length_level(frame_maxima, n_checks: int, false_halts: float) -> Dict[str, float]:
    """The σ that an in-distribution run of ``n_checks`` checked frames exceeds ``false_halts`` times in
    expectation, extrapolated from a control run's largest σ per frame by an exponential tail over its
    upper ``TAIL_FRACTION``: {level, tail_start u, tail_scale β, tail_rate λ}; level ≥ u."""
    values = np.sort(np.asarray(frame_maxima, dtype=np.float64))
    if values.size < MIN_CONTROL_FRAMES:
        raise ValueError(f"the run_length rule needs a control run of >= {MIN_CONTROL_FRAMES} checked frames "
                         f"(md.control_steps / md.dump_every), got {values.size}")
    if n_checks < 1 or not 0 < false_halts < 1:
        raise ValueError(f"expected n_checks >= 1 and 0 < false_halts < 1, got {n_checks} and {false_halts}")
    k = max(2, int(round(TAIL_FRACTION * values.size)))
    start = float(values[-k - 1])
    scale = float(np.mean(values[-k:] - start))
    rate = k / values.size
    level = start + scale * max(0.0, float(np.log(n_checks * rate / false_halts)))
    return dict(level=level, tail_start=start, tail_scale=scale, tail_rate=rate)


def run_control(model_path, type_names: Sequence[str], md, workdir: Path, start_atoms, molecule: bool,
                seed: int) -> Dict[str, np.ndarray]:
    """Unhalted MD of ``md.control_steps`` steps at ``md.control_temperature`` (Langevin) from
    ``start_atoms`` in ``workdir``; returns each σ's (total, epistemic, relative, feature
    distance: -1 without a density) largest per-atom value of every dumped frame."""
    control_md = dataclasses.replace(md, temperature=float(md.control_temperature), thermostat="langevin",
                                     n_steps=int(md.control_steps))
    result = run_md_segment(model_path, type_names, control_md, NEVER_HALT, workdir,
                            lammps_data_text(start_atoms, type_names, md.box), 0, first_segment=True,
                            molecule=molecule, segment_seed=seed)
    maxima = {name: np.array([frame_max_sigma(f, column) for f in result["frames"]], dtype=np.float64)
              for name, column in HALT_COLUMNS.items()}
    for name, values in maxima.items():
        if values.size == 0 or not np.all(np.isfinite(values)):
            raise RuntimeError(f"control run in {workdir}: {values.size} dumped frames, "
                               f"{int(np.sum(~np.isfinite(values)))} with a non-finite {name} σ; expected finite "
                               f"σ's (see {Path(workdir) / 'log.md'})")
    return maxima


def control_threshold(model_path, type_names: Sequence[str], md, workdir: Path, start_atoms, molecule: bool,
                      seed: int) -> Dict[str, Any]:
    """The on-the-fly loop's τ for the σ ``md.halt_on`` names: {threshold (``md.control_margin`` ×
    the control run's largest), control_max_sigma, control_quantiles (q50, q90, q99 over frames)}."""
    sigmas = run_control(model_path, type_names, md, workdir, start_atoms, molecule, seed)[md.halt_on]
    largest = float(sigmas.max())
    result = dict(control_max_sigma=largest,
                  control_quantiles=[float(q) for q in np.quantile(sigmas, [0.5, 0.9, 0.99])])
    if md.control_rule == "run_length":
        tail = run_length_level(sigmas, int(md.n_steps) // int(md.dump_every), float(md.control_false_halts))
        result.update(threshold=float(md.control_margin) * tail["level"], control_rule="run_length",
                      control_tail={k: v for k, v in tail.items() if k != "level"}, control_level=tail["level"])
    else:
        result.update(threshold=float(md.control_margin) * largest, control_rule="largest")
    return result


def control_thresholds(posterior_path, structure, temperature: float, n_steps: int, margin: float,
                       workdir=None, box: float = 40.0, dump_every: int = 10, timestep: float = 0.0005,
                       seed: int = 1, run_steps=None, false_halts: float = 0.1) -> Dict[str, Any]:
    """Thresholds for a posterior from a control run of its deployable (exported into
    ``workdir``, default a temporary folder) at ``temperature`` K for ``n_steps`` steps from the
    first frame of ``structure`` (no pbc: a molecule centred in a ``box`` Å cell). Returns
    {thresholds: {stored threshold key: margin × the largest σ or, with ``run_steps``, margin × the
    run_length level for runs of that many steps checked every ``dump_every``} (epistemic and
    relative only with 2 or more members, the feature distance only with a feature density),
    maxima, levels (the σ's multiplied by margin),
    quantiles (q50, q99 of each σ over frames), n_frames}."""
    import ase.io

    from ..bayes import load_posterior
    from ..export import export_posterior, read_metadata
    from ._config import MDSection

    start = ase.io.read(structure, index=0)
    md = MDSection(structure=str(structure), box=box, timestep=timestep, dump_every=min(dump_every, n_steps),
                   control_temperature=temperature, control_steps=n_steps, control_margin=margin, seed=seed)
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(workdir) if workdir is not None else Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        posterior = load_posterior(posterior_path)
        posterior.eval()
        model_path = workdir / "model.pt"
        export_posterior(posterior, model_path)
        type_names = list(read_metadata(model_path)["type_names"])
        maxima = run_control(model_path, type_names, md, workdir / CONTROL_DIR, start, not any(start.pbc), seed)
    # the epistemic scores need 2 or more members, the feature distance a feature density
    applies = {"total": True, "epistemic": len(posterior.members) > 1, "relative": len(posterior.members) > 1,
               "feature": posterior.feature_density is not None}
    maxima = {name: values for name, values in maxima.items() if applies[name]}
    levels = {name: (float(values.max()) if run_steps is None else
                     run_length_level(values, int(run_steps) // int(dump_every), false_halts)["level"])
              for name, values in maxima.items()}
    thresholds = {THRESHOLD_KEYS[name]: float(margin * level) for name, level in levels.items()}
    return dict(thresholds=thresholds, levels=levels, maxima={name: float(v.max()) for name, v in maxima.items()},
                quantiles={name: [float(q) for q in np.quantile(v, [0.5, 0.99])] for name, v in maxima.items()},
                n_frames=int(maxima["total"].size))


__all__ = ["control_threshold", "control_thresholds", "run_control", "run_length_level", "CONTROL_DIR",
           "THRESHOLD_KEYS"]
