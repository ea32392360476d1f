"""Data: reading and validating labelled structures, neighbour lists and batches, PSB3.

Knows nothing of models: frames in, graphs and batches out.
"""

from ._frames import (
    DataError,
    Frame,
    TypeMap,
    fit_reference_energies,
    isolated_atom_energies,
    read_frames,
)
from ._casscf import (
    CASSCFFailure,
    generate_psb3_casscf,
    label_casscf,
)
from ._contacts import (
    ContactTable,
    contact_ratios,
    contact_table,
    edge_distances,
    no_contact_ratio,
    shortest_contacts,
)
from ._graphs import (
    Graph,
    collate,
    frames_to_graphs,
    iterate_batches,
    neighbour_list,
    split,
)
from ._psb3 import (
    PSB3_FILES,
    TORSION_BEYOND_FILE,
    TORSION_THERMAL_FILE,
    TORSION_DIHEDRAL,
    build_psb3,
    generate_psb3,
    write_thermal_torsion,
    write_torsion_beyond_training,
)
from ._xtb import import_tblite, one_openmp_thread, xtb_calculator, xtb_md_samples, xtb_relax
from ._qm9 import (
    QM9_TARGETS,
    QM9_UNITS,
    Qm9Table,
    Qm9Target,
    read_qm9_table,
    write_qm9,
)

__all__ = [
    "CASSCFFailure",
    "ContactTable",
    "DataError",
    "Frame",
    "Graph",
    "PSB3_FILES",
    "QM9_TARGETS",
    "QM9_UNITS",
    "Qm9Table",
    "Qm9Target",
    "TORSION_BEYOND_FILE",
    "TORSION_THERMAL_FILE",
    "TORSION_DIHEDRAL",
    "TypeMap",
    "build_psb3",
    "collate",
    "contact_ratios",
    "contact_table",
    "edge_distances",
    "fit_reference_energies",
    "no_contact_ratio",
    "frames_to_graphs",
    "generate_psb3",
    "generate_psb3_casscf",
    "import_tblite",
    "isolated_atom_energies",
    "iterate_batches",
    "label_casscf",
    "neighbour_list",
    "one_openmp_thread",
    "xtb_calculator",
    "xtb_md_samples",
    "xtb_relax",
    "read_frames",
    "read_qm9_table",
    "shortest_contacts",
    "split",
    "write_qm9",
    "write_torsion_beyond_training",
    "write_thermal_torsion",
]
