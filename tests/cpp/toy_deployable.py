"""A toy deployable that follows the bayesrace deployable contract (format_version 1).

It is NOT a RACE model: it is an ensemble of M small, smooth message-passing potentials
(distance-dependent scalar messages plus a vector channel that makes the energy depend on
angles, a cosine cutoff, ``n_layers`` layers so that the interaction range is
``n_layers * cutoff``) with fake aleatoric heads.  It exists so that the C++ core, the
pybind11 binding and the LAMMPS plugin can be tested against the contract without the real
exporter.

Run ``python toy_deployable.py OUT.pt [--members M] [--layers L] [--dtype float64]`` to write
one file.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

FORMAT_VERSION = 1


class ToyEnsemble(nn.Module):
    def __init__(
        self,
        type_names: List[str],
        cutoff: float,
        n_layers: int,
        n_members: int,
        n_features: int = 4,
        n_radial: int = 6,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        m, s, f, k = n_members, len(type_names), n_features, n_radial

        def rnd(*shape: int, scale: float = 1.0) -> nn.Parameter:
            return nn.Parameter((torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype))

        self.cutoff = cutoff
        self.n_layers = n_layers
        self.n_members = n_members
        self.n_features = f
        self.embedding = rnd(m, s, f, scale=0.5)
        self.energy_offset = rnd(m, s, scale=0.2)
        self.radial = rnd(n_layers, m, k, f, scale=0.4)
        self.mix = rnd(n_layers, m, f, f, scale=0.5)
        self.readout = rnd(n_layers, m, f, scale=0.3)
        self.angular = rnd(n_layers, m, f, scale=0.2)
        self.log_var_w = rnd(m, f, scale=0.5)
        self.log_var_b = rnd(m, scale=0.3)
        self.chol_w = rnd(m, f, 6, scale=0.3)
        centres = torch.linspace(0.0, cutoff, k, dtype=torch.float64)
        self.register_buffer("centres", centres.to(dtype))
        self.gamma = float((k / cutoff) ** 2)

    def _atomic(self, species: Tensor, vec: Tensor, centre: Tensor, neighbour: Tensor, n_atoms: int):
        # vec: [M, E, 3] edge vectors (one copy per member, the autograd leaf)
        m = self.n_members
        r = torch.sqrt((vec * vec).sum(-1))  # [M, E]
        inside = (r < self.cutoff).to(vec.dtype)
        fcut = 0.5 * (torch.cos(math.pi * r / self.cutoff) + 1.0) * inside  # [M, E]
        unit = vec / r.clamp_min(1e-9).unsqueeze(-1)  # [M, E, 3]
        rbf = torch.exp(-self.gamma * (r.unsqueeze(-1) - self.centres) ** 2)  # [M, E, K]
        h = self.embedding[:, species]  # [M, N, F]
        energy = self.energy_offset[:, species]  # [M, N]
        for layer in range(self.n_layers):
            filt = torch.bmm(rbf, self.radial[layer]) * fcut.unsqueeze(-1)  # [M, E, F]
            hj = torch.tanh(torch.bmm(h, self.mix[layer]))[:, neighbour]  # [M, E, F]
            msg = filt * hj
            agg = torch.zeros(m, n_atoms, self.n_features, dtype=vec.dtype, device=vec.device)
            agg = agg.index_add(1, centre, msg)
            vmsg = msg.unsqueeze(-1) * unit.unsqueeze(2)  # [M, E, F, 3]
            vagg = torch.zeros(m, n_atoms, self.n_features, 3, dtype=vec.dtype, device=vec.device)
            vagg = vagg.index_add(1, centre, vmsg)
            h = h + 0.5 * agg + (vagg * vagg).sum(-1) * self.angular[layer].unsqueeze(1)
            energy = energy + (torch.tanh(h) * self.readout[layer].unsqueeze(1)).sum(-1)
        return energy, h

    def forward(
        self,
        positions: Tensor,
        species: Tensor,
        edge_index: Tensor,
        edge_shifts: Tensor,
        n_local: int,
        compute_atomic_virial: bool,
    ) -> Dict[str, Tensor]:
        m = self.n_members
        n_atoms = positions.shape[0]
        centre = edge_index[0]
        neighbour = edge_index[1]
        base = positions[neighbour] - positions[centre] + edge_shifts  # [E, 3]
        vec = base.detach().unsqueeze(0).repeat(m, 1, 1).requires_grad_(True)
        atomic_energy, h = self._atomic(species, vec, centre, neighbour, n_atoms)
        member_energy = atomic_energy[:, :n_local].sum(1)  # [M]
        grads = torch.autograd.grad([member_energy.sum()], [vec], allow_unused=True)
        g = grads[0]
        if g is None:
            g = torch.zeros_like(vec)
        forces = torch.zeros(m, n_atoms, 3, dtype=vec.dtype, device=vec.device)
        forces = forces.index_add(1, centre, g).index_add(1, neighbour, -g)
        edge_virial = -vec.detach().unsqueeze(-1) * g.unsqueeze(-2)  # [M, E, 3, 3]
        virial = edge_virial.sum(1)
        if compute_atomic_virial:
            atomic_virial = torch.zeros(m, n_atoms, 3, 3, dtype=vec.dtype, device=vec.device)
            atomic_virial = atomic_virial.index_add(1, centre, 0.5 * edge_virial)
            atomic_virial = atomic_virial.index_add(1, neighbour, 0.5 * edge_virial)
        else:
            atomic_virial = torch.empty(0, dtype=vec.dtype, device=vec.device)
        th = torch.tanh(h.detach())
        log_var = (th * self.log_var_w.unsqueeze(1)).sum(-1) + self.log_var_b.unsqueeze(1) - 4.0
        ls = 0.3 * torch.einsum("mnf,mfk->mnk", th, self.chol_w)  # [M, N, 6]: l1..l6
        zero = torch.zeros_like(ls[..., 0])
        row0 = torch.stack([torch.exp(ls[..., 0] - 3.0), zero, zero], -1)
        row1 = torch.stack([0.05 * ls[..., 5], torch.exp(ls[..., 1] - 3.0), zero], -1)
        row2 = torch.stack([0.05 * ls[..., 4], 0.05 * ls[..., 3], torch.exp(ls[..., 2] - 3.0)], -1)
        chol = torch.stack([row0, row1, row2], -2)  # [M, N, 3, 3]
        eye = torch.eye(3, dtype=vec.dtype, device=vec.device)
        cov = chol @ chol.transpose(-1, -2) + 1e-3 * eye
        return {
            "member_energy": member_energy.detach(),
            "member_atomic_energy": atomic_energy.detach(),
            "member_forces": forces.detach(),
            "member_virial": virial.detach(),
            "member_atomic_virial": atomic_virial.detach(),
            "atomic_energy_log_var": log_var.detach(),
            "force_covariance": cov.detach(),
        }


def default_metadata(
    type_names: List[str], cutoff: float, n_layers: int, n_members: int, dtype: str
) -> Dict[str, object]:
    return {
        "format_version": FORMAT_VERSION,
        "type_names": list(type_names),
        "cutoff": float(cutoff),
        "n_layers": int(n_layers),
        "units": "metal",
        "dtype": dtype,
        "n_members": int(n_members),
        "calibration": {"force_std_scale": 1.3, "energy_std_scale": 0.8},
        "thresholds": {"atomic_force_std": 0.12},
        "bayesrace_version": "0.0.0+toy",
        "torch_version": torch.__version__,
        "training_data_sha256": "0" * 64,
        "posterior": "toy-ensemble",
    }


def write_toy(
    path: str,
    type_names: Optional[List[str]] = None,
    cutoff: float = 3.0,
    n_layers: int = 2,
    n_members: int = 3,
    dtype: str = "float64",
    seed: int = 0,
    metadata_override: Optional[Dict[str, object]] = None,
    drop_keys: Optional[List[str]] = None,
    raw_metadata: Optional[str] = None,
) -> Dict[str, object]:
    """Script and save a toy deployable; returns the metadata written."""
    type_names = type_names or ["H", "C", "N"]
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    model = ToyEnsemble(type_names, cutoff, n_layers, n_members, seed=seed, dtype=tdtype)
    for param in model.parameters():
        param.requires_grad_(False)
    scripted = torch.jit.script(model)
    meta = default_metadata(type_names, cutoff, n_layers, n_members, dtype)
    if metadata_override:
        meta.update(metadata_override)
    for key in drop_keys or []:
        meta.pop(key, None)
    text = raw_metadata if raw_metadata is not None else json.dumps(meta)
    torch.jit.save(scripted, path, _extra_files={"metadata.json": text})
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--cutoff", type=float, default=3.0)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--types", default="H,C,N")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_toy(
        args.out,
        type_names=args.types.split(","),
        cutoff=args.cutoff,
        n_layers=args.layers,
        n_members=args.members,
        dtype=args.dtype,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
