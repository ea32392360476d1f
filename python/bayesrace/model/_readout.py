"""The per-layer readout of RACE: hidden features to per-atom outputs (energy and heads)."""

from __future__ import annotations

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3


class _ScalarActivation(torch.nn.Module):
    """SiLU on scalar-only features (e3nn's Activation does not script)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.silu(x)


class Readout(torch.nn.Module):
    """Linear → Gate → Linear from the hidden features to the per-atom outputs."""

    def __init__(self, irreps_hidden: o3.Irreps, n_scalars_out: int, n_vectors_out: int, width: int):
        super().__init__()
        silu = torch.nn.functional.silu
        if n_vectors_out > 0:
            mid = o3.Irreps(f"{width}x0e + {width}x0e + {width}x1o")
            self.gate = e3nn_nn.Gate(f"{width}x0e", [silu], f"{width}x0e", [torch.sigmoid], f"{width}x1o")
            irreps_out = o3.Irreps(f"{n_scalars_out}x0e + {n_vectors_out}x1o")
        else:
            mid = o3.Irreps(f"{width}x0e")
            self.gate = _ScalarActivation()
            irreps_out = o3.Irreps(f"{n_scalars_out}x0e")
        self.linear_in = o3.Linear(irreps_hidden, mid)
        self.linear_out = o3.Linear(mid if n_vectors_out == 0 else self.gate.irreps_out, irreps_out)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.gate(self.linear_in(h)))
