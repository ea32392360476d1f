"""One member alone (``DeployedPosterior.forward_member``): what the pair style evaluates for
``dynamics member K`` on steps without uncertainty. Equal to that member's slice of
``forward`` (every member), also with ghosts (n_local < N) and periodic images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayesrace import keys
from deployable_tools import deployable_inputs
from test_export import exported, periodic_cell, psb3_like, relative  # noqa: F401  (exported: a fixture)

FIELDS = (keys.MEMBER_ENERGY, keys.MEMBER_ATOMIC_ENERGY, keys.MEMBER_FORCES, keys.MEMBER_VIRIAL,
          keys.MEMBER_ATOMIC_VIRIAL, keys.ATOMIC_ENERGY_LOG_VAR, keys.FORCE_COVARIANCE)


def arguments(inputs, n_local, atomic_virial):
    return (torch.tensor(inputs["positions"]), torch.tensor(inputs["species"]), torch.tensor(inputs["edge_index"]),
            torch.tensor(inputs["edge_shifts"]), int(n_local), atomic_virial)


@pytest.mark.parametrize("kind", ["molecule_part", "periodic"])
@pytest.mark.parametrize("atomic_virial", [True, False])
def test_forward_member_is_that_members_slice_of_forward(exported, kind, atomic_virial):
    posterior, path, _ = exported
    module = torch.jit.load(path)
    atoms = psb3_like(seed=2) if kind == "molecule_part" else periodic_cell(n=12)
    inputs = deployable_inputs(atoms, posterior.cutoff)
    # a domain owning part of the atoms: the rest are ghosts (their energies do not count)
    n_local = len(atoms) - 3 if kind == "molecule_part" else len(atoms)
    every = module(*arguments(inputs, n_local, atomic_virial))
    assert every[keys.MEMBER_ENERGY].shape[0] == 3
    for member in range(3):
        alone = module.forward_member(member, *arguments(inputs, n_local, atomic_virial))
        assert sorted(alone) == sorted(every)
        for field in FIELDS:
            if not atomic_virial and field == keys.MEMBER_ATOMIC_VIRIAL:
                assert alone[field].numel() == 0
                continue
            assert alone[field].shape == (1, *every[field].shape[1:]), field
            assert relative(alone[field][0], every[field][member]) < 1e-12, (field, member)
    # the members differ: the comparison above could fail
    assert not np.allclose(every[keys.MEMBER_FORCES][0].detach(), every[keys.MEMBER_FORCES][1].detach())


def test_forward_member_out_of_range_is_refused(exported):
    posterior, path, _ = exported
    module = torch.jit.load(path)
    inputs = deployable_inputs(psb3_like(seed=1), posterior.cutoff)
    with pytest.raises(Exception, match="member 3 out of range"):
        module.forward_member(3, *arguments(inputs, len(inputs["positions"]), False))
