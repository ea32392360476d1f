"""Data: reading and validating labelled structures, neighbour lists and batches, PSB3.

Knows nothing of models: frames in, graphs and batches out.
"""

from ._frames import (
    DataError,
    Frame,
    Graph,
    TypeMap,
    collate,
    fit_reference_energies,
    frames_to_graphs,
    isolated_atom_energies,
    iterate_batches,
    neighbour_list,
    read_frames,
    split,
)
from ._psb3 import (
    PSB3_FILES,
    TORSION_DIHEDRAL,
    build_psb3,
    generate_psb3,
)

__all__ = [
    "DataError",
    "Frame",
    "Graph",
    "PSB3_FILES",
    "TORSION_DIHEDRAL",
    "TypeMap",
    "build_psb3",
    "collate",
    "fit_reference_energies",
    "frames_to_graphs",
    "generate_psb3",
    "isolated_atom_energies",
    "iterate_batches",
    "neighbour_list",
    "read_frames",
    "split",
]
