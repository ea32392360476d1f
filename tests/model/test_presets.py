"""Every named preset, as built (no channel overrides): rotation equivariance to float64 round-off,
forces = −∂E/∂r, equivariance of a float32 model to float32 round-off, and a few training steps
that lower the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from e3nn import o3

from bayesrace import keys
from bayesrace.model import PRESETS
from conftest import batch_of, random_molecule, tiny_model

TYPES = ["H", "C", "N"]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp(min=1e-300))


def rotated(atoms, matrix):
    out = atoms.copy()
    out.positions = atoms.positions @ matrix.T
    return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_is_equivariant_and_conservative(preset):
    model = tiny_model(seed=1, preset=preset).eval()
    atoms = random_molecule(7, seed=5)
    matrix = -o3.rand_matrix(dtype=torch.float64).numpy()  # a rotation and a reflection
    base = model(batch_of([atoms], TYPES, model.cutoff))
    moved = model(batch_of([rotated(atoms, matrix)], TYPES, model.cutoff))
    assert relative_error(moved[keys.ENERGY], base[keys.ENERGY]) < 1e-12
    assert relative_error(moved[keys.FORCES], base[keys.FORCES] @ torch.from_numpy(matrix).T) < 1e-10

    # central differences of the energy along one random direction, against F·d
    direction = np.random.default_rng(2).normal(size=atoms.positions.shape)
    step = 1e-4
    energies = []
    for sign in (1.0, -1.0):
        shifted = atoms.copy()
        shifted.positions = atoms.positions + sign * step * direction
        energies.append(float(model(batch_of([shifted], TYPES, model.cutoff), compute_forces=False)[keys.ENERGY][0]))
    numeric = -(energies[0] - energies[1]) / (2 * step)
    analytic = float((base[keys.FORCES].detach().numpy() * direction).sum())
    assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_float32_preset_is_equivariant_to_float32_round_off(preset):
    model = tiny_model(seed=1, preset=preset, dtype=torch.float32).eval()
    atoms = random_molecule(7, seed=6)
    matrix = o3.rand_matrix(dtype=torch.float64).numpy()
    base = model(batch_of([atoms], TYPES, model.cutoff, dtype=torch.float32))
    moved = model(batch_of([rotated(atoms, matrix)], TYPES, model.cutoff, dtype=torch.float32))
    assert base[keys.FORCES].dtype == torch.float32
    assert relative_error(moved[keys.ENERGY], base[keys.ENERGY]) < 1e-5
    R = torch.from_numpy(matrix).to(torch.float32)
    assert relative_error(moved[keys.FORCES], base[keys.FORCES] @ R.T) < 1e-4


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_a_few_training_steps_of_each_preset_lower_the_loss(preset):
    from bayesrace.train import loss_function

    model = tiny_model(seed=3, preset=preset)
    structures = [random_molecule(6, seed=10 + k) for k in range(4)]
    batch = batch_of(structures, TYPES, model.cutoff)
    # targets from another random model of the same preset: learnable, not constant
    teacher = tiny_model(seed=4, preset=preset).eval()
    target = teacher(batch)
    batch[keys.ENERGY] = target[keys.ENERGY].detach()
    batch[keys.FORCES] = target[keys.FORCES].detach()
    loss_fn = loss_function("mse")
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = loss_fn(model(batch), batch, 1.0, 1.0)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.8 * losses[0], losses
