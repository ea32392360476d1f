"""The last-layer weights of a RACE member and the Jacobians of energies and forces in them.

The "last layer" w [P] are the entries of every readout's ``linear_out.weight`` that feed
output channel 0 (the per-atom energy). The total energy is

    E = energy_scale · Σ_l Σ_i y_{l,i,0} + shift + references = Σ_p w_p Φ_p + const,

with features Φ_p that do not depend on w, so energies AND forces are exactly linear in w:
J_E,b = ∂E_b/∂w = Φ_b [P] and J_F,i = ∂F_i/∂w = −∂Φ/∂r_i [3, P]. The last-layer Laplace
approximation (``_laplace``) is built on these.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from .. import keys
from ..model import RACE

ENERGY_OUTPUT_CHANNEL = 0  # column of linear_out's output holding the per-atom energy


# --------------------------------------------------------------------------------------
# the last-layer weights


def _readout_energy_mask(linear) -> torch.Tensor:
    """Boolean mask over ``linear.weight`` of the entries that feed output channel 0.

    e3nn lays the flat weight out instruction by instruction, each block a row-major
    [mul_in, mul_out] matrix, so column 0 of a block with i_out = 0 sits at
    offset + u·mul_out for u = 0..mul_in−1.
    """
    if linear.irreps_out[0].ir.l != 0 or linear.irreps_out[0].ir.p != 1:
        raise ValueError(f"readout output irreps {linear.irreps_out} do not start with scalars (0e)")
    mask = torch.zeros(linear.weight.numel(), dtype=torch.bool)
    offset = 0
    for instruction in linear.instructions:
        if instruction.i_in == -1:
            raise ValueError("the last-layer Laplace expects readouts without biases")
        mul_in, mul_out = instruction.path_shape
        if instruction.i_out == 0:
            mask[offset + torch.arange(mul_in) * mul_out + ENERGY_OUTPUT_CHANNEL] = True
        offset += mul_in * mul_out
    if offset != linear.weight.numel():
        raise ValueError(f"readout weight has {linear.weight.numel()} entries, instructions describe {offset}")
    return mask


def last_layer_mask(model: RACE) -> List[torch.Tensor]:
    """One boolean mask per readout over ``readouts[l].linear_out.weight``: the weights E depends on."""
    return [_readout_energy_mask(readout.linear_out) for readout in model.readouts]


def _last_layer_parameters(model: RACE) -> List[torch.nn.Parameter]:
    return [readout.linear_out.weight for readout in model.readouts]


def get_last_layer_weights(model: RACE) -> torch.Tensor:
    """The flat last-layer weights w [P]: readout by readout, in the weight's own order."""
    return torch.cat(
        [weight.detach()[mask] for weight, mask in zip(_last_layer_parameters(model), last_layer_mask(model))]
    )


def set_last_layer_weights(model: RACE, w: torch.Tensor) -> None:
    """Writes w [P] into the masked entries of the readouts (in place, no autograd)."""
    masks = last_layer_mask(model)
    n_parameters = sum(int(m.sum()) for m in masks)
    w = torch.as_tensor(w).reshape(-1)
    if w.numel() != n_parameters:
        raise ValueError(f"last-layer weights: got {w.numel()} values, the model has {n_parameters}")
    start = 0
    with torch.no_grad():
        for weight, mask in zip(_last_layer_parameters(model), masks):
            count = int(mask.sum())
            weight[mask] = w[start : start + count].to(weight.dtype)
            start += count


def model_dtype(model: RACE) -> torch.dtype:
    return next(model.parameters()).dtype


# --------------------------------------------------------------------------------------
# Jacobians


def last_layer_jacobians(model: RACE, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """J_E [B, P] = ∂E_b/∂w (eV per unit weight) and J_F [N, 3, P] = ∂F_i/∂w (eV/Å per unit weight).

    One forward pass; ∂/∂w of Σ_b u_b E_b (u_b = 1, a leaf) with create_graph gives
    g_p = Σ_b u_b Φ_b,p, and one more backward pass per p gives both ∂g_p/∂u = J_E[:, p]
    and ∂g_p/∂r_edges, which the forward's own edge → atom scatter turns into J_F[:, :, p].
    """
    positions = batch[keys.POSITIONS]
    edge_index = batch[keys.EDGE_INDEX]
    structure = batch[keys.BATCH]
    n_structures = batch[keys.NUM_ATOMS].shape[0]
    centre, neighbour = edge_index[0], edge_index[1]
    dtype = model_dtype(model)
    shifts = torch.einsum("ek,ekl->el", batch[keys.EDGE_CELL_SHIFT], batch[keys.CELL][structure[centre]])
    edge_vectors = (positions[neighbour] - positions[centre] + shifts).detach().to(dtype).requires_grad_(True)
    structure_weight = torch.ones(n_structures, dtype=dtype, requires_grad=True)
    parameters = _last_layer_parameters(model)
    masks = last_layer_mask(model)
    with torch.enable_grad():
        out = model.atomic_outputs(batch[keys.SPECIES], edge_index, edge_vectors)
        energy = torch.zeros(n_structures, dtype=dtype).index_add(0, structure, out[keys.ATOMIC_ENERGY])
        grads = torch.autograd.grad((energy * structure_weight).sum(), parameters, create_graph=True)
        features = torch.cat([g[m] for g, m in zip(grads, masks)])  # [P], Σ_b u_b Φ_b
        n_parameters = features.shape[0]
        energy_jacobian = torch.zeros(n_structures, n_parameters, dtype=dtype)
        force_jacobian = torch.zeros(positions.shape[0], 3, n_parameters, dtype=dtype)
        for p in range(n_parameters):
            if not features[p].requires_grad:
                continue  # a weight whose feature is identically zero
            d_weight, d_edges = torch.autograd.grad(
                features[p], [structure_weight, edge_vectors], retain_graph=p + 1 < n_parameters, allow_unused=True
            )
            if d_weight is not None:
                energy_jacobian[:, p] = d_weight.detach()
            if d_edges is not None:
                d_edges = d_edges.detach()
                # same scatter as RACE.forward: F = index_add(centre, ∂/∂r) − index_add(neighbour, ∂/∂r)
                atom_grads = torch.zeros(positions.shape[0], 3, dtype=dtype)
                force_jacobian[:, :, p] = atom_grads.index_add(0, centre, d_edges).index_add(0, neighbour, -d_edges)
    return energy_jacobian, force_jacobian

