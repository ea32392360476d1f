"""The channel-wise message square (``model._message_square``): equivariant for every l_max
under rotations and reflections, a known answer for l_max 1, the model with it stays
equivariant and conservative, and models saved before it load without it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from e3nn import o3

from bayesrace import keys
from bayesrace.model import model_config_from_record
from bayesrace.model._message_square import MessageSquare
from bayesrace.model._radial import _default_dtype
from conftest import batch_of, random_molecule, tiny_model

TYPES = ["H", "C", "N"]


def hidden_irreps(channels: int, l_max: int) -> o3.Irreps:
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(l_max + 1)])


@pytest.mark.parametrize("l_max", [0, 1, 2, 3])
def test_square_is_equivariant(l_max):
    irreps = hidden_irreps(5, l_max)
    square = MessageSquare(irreps)
    torch.manual_seed(0)
    with torch.no_grad():
        square.weight.normal_()
    x = torch.randn(7, irreps.dim, dtype=torch.float64)
    for matrix in (o3.rand_matrix(dtype=torch.float64), -o3.rand_matrix(dtype=torch.float64)):
        with _default_dtype(torch.float64):  # e3nn builds D in the default dtype
            d = irreps.D_from_matrix(matrix)
        assert torch.allclose(square(x @ d.T), square(x) @ d.T, atol=1e-12, rtol=0)
    # it is a square: doubling the input quadruples the output, and zero stays zero
    assert torch.allclose(square(2 * x), 4 * square(x), atol=1e-12, rtol=0)
    assert torch.count_nonzero(square(torch.zeros_like(x))) == 0


def test_square_known_answer_for_l_max_1():
    """One channel, scalar s and vector v, unit weights: the scalar out is (s² ± |v|²/√3)/√2
    (two paths into 0e), the vector out is s·v·c with |c| the 3j norm of (0, 1, 1) times √3."""
    square = MessageSquare(hidden_irreps(1, 1))
    s, v = 2.0, torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64)
    out = square(torch.cat([torch.tensor([s], dtype=torch.float64), v]).unsqueeze(0))[0]
    scalar_from_vectors = out[0] * math.sqrt(2) - s * s
    assert abs(abs(scalar_from_vectors) - 9.0 / math.sqrt(3)) < 1e-12
    ratio = out[1:] / (s * v)
    assert torch.allclose(ratio, ratio[0].expand(3), atol=1e-12) and abs(abs(float(ratio[0])) - 1.0) < 1e-12


@pytest.mark.parametrize("overrides", [{"preset": "small"}, {"preset": "tiny", "l_max": 2}])
def test_model_with_square_is_equivariant_and_conservative(overrides):
    model = tiny_model(seed=1, message_square=True, **overrides).eval()
    with torch.no_grad():  # weights away from their initial ones, so every path counts
        for layer in model.layers:
            layer.square.weight.normal_()
    atoms = random_molecule(7, seed=5)
    matrix = -o3.rand_matrix(dtype=torch.float64).numpy()
    moved_atoms = atoms.copy()
    moved_atoms.positions = atoms.positions @ matrix.T
    base = model(batch_of([atoms], TYPES, model.cutoff))
    moved = model(batch_of([moved_atoms], TYPES, model.cutoff))
    assert torch.allclose(moved[keys.ENERGY], base[keys.ENERGY], rtol=1e-12, atol=0)
    assert torch.allclose(moved[keys.FORCES], base[keys.FORCES] @ torch.from_numpy(matrix).T, atol=1e-10)
    direction = np.random.default_rng(2).normal(size=atoms.positions.shape)
    energies = []
    for sign in (1.0, -1.0):
        shifted = atoms.copy()
        shifted.positions = atoms.positions + sign * 1e-4 * direction
        energies.append(float(model(batch_of([shifted], TYPES, model.cutoff), compute_forces=False)[keys.ENERGY][0]))
    analytic = float((base[keys.FORCES].detach().numpy() * direction).sum())
    assert abs(-(energies[0] - energies[1]) / 2e-4 - analytic) < 1e-6 * max(1.0, abs(analytic))
    # the square changes the model: the same weights without it give other energies
    plain = tiny_model(seed=1, message_square=False, **overrides).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if ".square." not in k})
    assert abs(float(plain(batch_of([atoms], TYPES, model.cutoff))[keys.ENERGY][0]) - float(base[keys.ENERGY][0])) > 1e-6


def test_models_saved_before_the_square_load_without_it():
    assert model_config_from_record({"n_layers": 2, "channels": 8, "l_max": 1}).message_square is False
