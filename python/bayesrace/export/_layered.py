"""Layer mode in Python: the reference of the per-layer halo exchange (issue 11).

In layer mode a domain holds its local atoms and a ghost shell only one cutoff deep. After
every message-passing layer the ghost rows of the node features are copied from the atoms
that own them (forward exchange); going back, the gradients that land on ghost rows are
added onto their owners (reverse exchange). Energies, forces, virials and every σ are then
those of the whole system. ``layered_evaluate`` runs that algorithm with the deployable's
layer-mode methods (``embed``, ``layer``, ``head``) in one process, where every ghost is an
image of a local atom (``ghost_owner``); the C++ core follows it step by step, with LAMMPS's
communication in place of the two exchanges. ``ghost_images`` builds such a system from a
periodic structure.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from .. import keys
from ..data import neighbour_list


def ghost_images(atoms, cutoff: float, type_names: List[str]) -> Dict[str, object]:
    """One domain holding a whole periodic structure: the structure's atoms are local, its
    ghosts are every periodic image within ``cutoff`` of a local atom (an atom may be its
    own neighbour's image, several times in a cell smaller than 2 × cutoff).

    ``atoms``: ASE Atoms (or anything with ``positions``, ``cell``, ``pbc`` and
    ``get_chemical_symbols()``); ``type_names``: the deployable's types (species = index).
    Returns numpy arrays under ``positions`` [N, 3] (ghosts carry their image shift),
    ``species`` [N], ``edge_index`` [2, E] (every centre local, i.e. < n_local), and
    ``n_local`` (int) and ``ghost_owner`` [N - n_local] (the local row each ghost copies).
    Ghost rows are ordered by (owner, image shift)."""
    positions = np.asarray(atoms.positions, dtype=np.float64)
    pbc = np.asarray(atoms.pbc, dtype=bool).reshape(3)
    cell = np.array(atoms.cell.array, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    symbols = list(atoms.get_chemical_symbols())
    unknown = sorted(set(symbols) - set(type_names))
    if unknown:
        raise ValueError(f"elements {unknown} are not among the types {list(type_names)}")
    species = np.array([list(type_names).index(s) for s in symbols], dtype=np.int64)
    n_local = len(positions)
    edge_index, shift = neighbour_list(positions, cell, pbc, cutoff)
    shift = np.asarray(shift, dtype=np.int64).reshape(-1, 3)
    centre, neighbour = np.asarray(edge_index[0], dtype=np.int64), np.asarray(edge_index[1], dtype=np.int64)
    imaged = np.any(shift != 0, axis=1)
    # one ghost row per distinct (owner, shift) among the edges' neighbours
    images, ghost_of_edge = np.unique(np.column_stack([neighbour[imaged], shift[imaged]]), axis=0,
                                      return_inverse=True)
    images = images.reshape(-1, 4)
    ghost_owner = images[:, 0].copy()
    ghost_positions = positions[ghost_owner] + images[:, 1:].astype(np.float64) @ cell
    neighbour = neighbour.copy()
    neighbour[imaged] = n_local + np.asarray(ghost_of_edge).reshape(-1)
    return {
        "positions": np.concatenate([positions, ghost_positions]),
        "species": np.concatenate([species, species[ghost_owner]]),
        "edge_index": np.stack([centre, neighbour]),
        "n_local": n_local,
        "ghost_owner": ghost_owner,
    }


def layered_evaluate(
    deployable,
    positions,
    species,
    edge_index,
    n_local: int,
    ghost_owner,
    compute_atomic_virial: bool = True,
) -> Dict[str, torch.Tensor]:
    """The deployable's outputs by layer mode, with the exchanges done in this process.

    ``deployable``: a (loaded) deployable or a ``DeployedPosterior``; ``positions`` [N, 3]
    (local atoms first, then ghosts at their image positions); ``species`` [N];
    ``edge_index`` [2, E] with every centre < ``n_local``; ``ghost_owner`` [N - n_local]:
    the local row that ghost row ``n_local + g`` copies. Returns the fields of the
    deployable's ``forward`` over the N rows: member energy [M] (a sum over local atoms),
    member atomic energy, log-variance [M, N] and force covariance [M, N, 3, 3] (ghost rows
    zero), member forces [M, N, 3] with ghost rows unfolded (as LAMMPS reverse-communicates
    them), member virial [M, 3, 3] and, when asked, member atomic virial [M, N, 3, 3] (each
    edge's term half to either end).

    Per member: h_0 = embed(species); for each layer k the local rows of h_{k+1} and the
    readout r_k come from ``layer``; the ghost rows of h_{k+1} are copies of their owners'
    (forward exchange). The energy's gradient goes back layer by layer: the readout's
    gradient and, from the layer above, the gradient of h_{k+1}; the gradient that reaches
    a ghost row of h_k is added onto its owner (reverse exchange); every layer's gradient
    with respect to the edge vectors is summed into the forces and virial."""
    if not torch.is_grad_enabled():
        raise RuntimeError("layered_evaluate needs autograd enabled (do not call it under torch.no_grad)")
    species = torch.as_tensor(np.asarray(species), dtype=torch.int64) if not torch.is_tensor(species) else species
    edge_index = torch.as_tensor(np.asarray(edge_index), dtype=torch.int64) if not torch.is_tensor(edge_index) \
        else edge_index
    ghost_owner = torch.as_tensor(np.asarray(ghost_owner), dtype=torch.int64).reshape(-1) \
        if not torch.is_tensor(ghost_owner) else ghost_owner.reshape(-1)
    n_local = int(n_local)
    n_atoms = species.shape[0]
    if ghost_owner.shape[0] != n_atoms - n_local:
        raise ValueError(f"ghost_owner has {ghost_owner.shape[0]} rows for {n_atoms - n_local} ghosts")
    n_layers = len(deployable.layer_widths()) - 1
    dtype = deployable.embed(0, species).dtype  # the deployable's dtype
    positions = torch.as_tensor(np.asarray(positions) if not torch.is_tensor(positions) else positions, dtype=dtype)
    centre, neighbour = edge_index[0], edge_index[1]
    base = (positions[neighbour] - positions[centre]).detach()

    def forward_exchange(local_rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([local_rows, local_rows[ghost_owner]])

    def reverse_exchange(rows: torch.Tensor) -> torch.Tensor:
        return rows[:n_local].index_add(0, ghost_owner, rows[n_local:])

    fields: Dict[str, List[torch.Tensor]] = {name: [] for name in (
        keys.MEMBER_ENERGY, keys.MEMBER_ATOMIC_ENERGY, keys.MEMBER_FORCES, keys.MEMBER_VIRIAL,
        keys.MEMBER_ATOMIC_VIRIAL, keys.ATOMIC_ENERGY_LOG_VAR, keys.FORCE_COVARIANCE, keys.MEMBER_FEATURE_DISTANCE)}
    for member in range(int(deployable.n_members)):
        vectors = base.clone().requires_grad_(True)  # one leaf for every layer
        h = deployable.embed(member, species)
        h_in: List[torch.Tensor] = []
        h_local: List[torch.Tensor] = []
        readouts: List[torch.Tensor] = []
        for k in range(n_layers):
            h_in.append(h.detach().requires_grad_(k > 0))
            h_next, readout = deployable.layer(member, k, h_in[k], species, edge_index, vectors, n_local)
            h_local.append(h_next)
            readouts.append(readout)
            if k < n_layers - 1:
                h = forward_exchange(h_next.detach())
        atomic_energy, log_var, covariance, distance = deployable.head(member, torch.stack(readouts),
                                                                       species[:n_local])
        energy = atomic_energy.sum()
        readout_grads = torch.autograd.grad([energy], readouts, allow_unused=True)
        edge_grad = torch.zeros_like(base)
        feature_grad: Optional[torch.Tensor] = None  # dE/dh_{k+1} of the local atoms
        for k in reversed(range(n_layers)):
            outputs, grads = [], []
            if readout_grads[k] is not None:
                outputs.append(readouts[k])
                grads.append(readout_grads[k])
            if feature_grad is not None:
                outputs.append(h_local[k])
                grads.append(feature_grad)
            inputs = [vectors] + ([h_in[k]] if k > 0 else [])
            if outputs:
                d = torch.autograd.grad(outputs, inputs, grads, allow_unused=True)
            else:
                d = tuple(None for _ in inputs)
            if d[0] is not None:
                edge_grad = edge_grad + d[0]
            if k > 0:
                all_rows = d[1] if d[1] is not None else torch.zeros_like(h_in[k])
                feature_grad = reverse_exchange(all_rows)
        fields[keys.MEMBER_ENERGY].append(energy.detach())
        fields[keys.MEMBER_ATOMIC_ENERGY].append(_ghost_rows_zero(atomic_energy.detach(), n_atoms))
        fields[keys.ATOMIC_ENERGY_LOG_VAR].append(_ghost_rows_zero(log_var.detach(), n_atoms))
        fields[keys.FORCE_COVARIANCE].append(_ghost_rows_zero(covariance.detach(), n_atoms))
        fields[keys.MEMBER_FEATURE_DISTANCE].append(
            _ghost_rows_zero(distance.detach(), n_atoms) if distance.numel() else distance.detach())
        # r_ij = x_j - x_i: dE/dx_i = -g and dE/dx_j = +g, F = -dE/dx (as forward)
        fields[keys.MEMBER_FORCES].append(
            torch.zeros_like(positions).index_add(0, centre, edge_grad).index_add(0, neighbour, -edge_grad))
        edge_virial = -base.unsqueeze(2) * edge_grad.unsqueeze(1)  # [E, 3, 3], LAMMPS sign
        fields[keys.MEMBER_VIRIAL].append(edge_virial.sum(dim=0))
        if compute_atomic_virial:
            half = 0.5 * edge_virial
            w = torch.zeros(n_atoms, 3, 3, dtype=dtype, device=positions.device)
            fields[keys.MEMBER_ATOMIC_VIRIAL].append(w.index_add(0, centre, half).index_add(0, neighbour, half))
    out = {name: torch.stack(values) for name, values in fields.items() if values}
    if not compute_atomic_virial:
        out[keys.MEMBER_ATOMIC_VIRIAL] = torch.empty(0, dtype=dtype, device=positions.device)
    return out


def _ghost_rows_zero(local_rows: torch.Tensor, n_atoms: int) -> torch.Tensor:
    """``local_rows`` [n_local, ...] padded with zero rows to [n_atoms, ...]."""
    ghosts = local_rows.new_zeros((n_atoms - local_rows.shape[0],) + tuple(local_rows.shape[1:]))
    return torch.cat([local_rows, ghosts])
