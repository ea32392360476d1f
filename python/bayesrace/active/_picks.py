"""What an acquisition picked: per structure its σ's and the pool file's own tags, per round a summary.

The tags are the scalar ``atoms.info`` entries of the pool file (e.g. ``temperature_K`` or
``config_type`` of bayesrace's PSB3 sets), minus the labels, so a user can see whether BALD
went for the hot frames, the large molecules or one geometry class.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from .. import keys

# σ's recorded for each pick: name in the record -> the per-structure score of bayesrace.uq.ood_scores
# (the scores that carry a stored threshold, compute bayesrace columns 1, 6 and 7)
PICK_SIGMAS = {
    "max_force_sigma": "max_atomic_force_sigma_eV_per_A",
    "max_force_sigma_epistemic": "max_atomic_force_sigma_epistemic_eV_per_A",
    "energy_sigma_epistemic_meV_per_atom": "energy_sigma_epistemic_meV_per_atom",
}
_LABEL_KEYS = {"energy", "free_energy", "forces", "stress", "virial", "dipole", "charges"}
_MAX_TAG_VALUES = 20  # a tag with more distinct values (a per-frame id, a float) is summarised by its mean


def pool_tags(path, energy_key: str = "energy", forces_key: str = "forces") -> List[Dict[str, Any]]:
    """The scalar info entries of every structure of the pool file, labels left out."""
    import ase.io

    skip = _LABEL_KEYS | {energy_key, forces_key}
    return [{name: value.item() if isinstance(value, np.generic) else value for name, value in atoms.info.items()
             if name not in skip and isinstance(value, (str, int, float, np.integer, np.floating))}
            for atoms in ase.io.read(path, index=":")]


def describe_picks(prediction: Mapping[str, np.ndarray], chosen: Sequence[int], pool_indices: Sequence[int],
                   tags: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One record per chosen structure: pool index, atoms, the σ's of ``PICK_SIGMAS`` and its tags.
    ``chosen`` indexes the structures of ``prediction``; ``pool_indices`` are the same picks in the pool."""
    from ..uq import ood_scores

    scores = ood_scores(prediction)
    return [dict(pool_index=int(index), n_atoms=int(prediction[keys.NUM_ATOMS][c]),
                 **{name: float(scores[score][c]) for name, score in PICK_SIGMAS.items()}, tags=dict(tags[int(index)]))
            for c, index in zip(chosen, pool_indices)]


def summarize_picks(picks: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Counts of each tag's values (means for tags with many values), mean atoms and σ's."""
    if not picks:
        return {}
    summary: Dict[str, Any] = {"n": len(picks), "mean_n_atoms": float(np.mean([p["n_atoms"] for p in picks]))}
    for name in PICK_SIGMAS:
        summary[f"mean_{name}"] = float(np.mean([p[name] for p in picks]))
    tags: Dict[str, list] = {}
    for pick in picks:
        for name, value in pick["tags"].items():
            tags.setdefault(name, []).append(value)
    for name, values in tags.items():
        counts = Counter(values)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if len(counts) <= _MAX_TAG_VALUES or not numeric:
            summary[f"tag {name}"] = {str(value): count for value, count in sorted(counts.items(), key=str)}
        else:
            summary[f"tag {name} (mean)"] = float(np.mean(values))
    return summary


def picks_line(summary: Mapping[str, Any]) -> str:
    """A one-line account of a round's picks (for the progress display)."""
    if not summary:
        return "nothing picked"
    parts = [f"{summary['n']} picks, mean {summary['mean_n_atoms']:.1f} atoms, mean max σ_F "
             f"{summary['mean_max_force_sigma']:.3g} eV/Å (epistemic {summary['mean_max_force_sigma_epistemic']:.3g})"]
    parts += [f"{name[4:]}: {value}" for name, value in summary.items() if name.startswith("tag ")]
    return "; ".join(parts)
