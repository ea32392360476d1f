"""Plain-torch message paths equal e3nn's tensor product, and all members in one pass
(``StackedRace``) equal the members evaluated one by one."""

from __future__ import annotations

import pytest
import torch
from e3nn import o3

from bayesrace import keys
from bayesrace.model import StackedRace
from conftest import batch_of, random_molecule, tiny_model

TYPES = ["H", "C", "N"]


@pytest.mark.parametrize("preset,overrides", [("small", {}), ("tiny", {"l_max": 2}), ("tiny", {"l_max": 3})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_message_paths_equal_e3nn_tensor_product(preset, overrides, dtype):
    model = tiny_model(seed=1, preset=preset, dtype=dtype, **overrides).eval()
    species, ei, vectors = inputs(seed=4)
    radial, sh = model.edge_geometry(vectors.to(dtype))
    n = species.shape[0]
    for layer in model.layers:
        h = torch.randn(n, layer.linear_up.irreps_in.dim, dtype=dtype)
        h_up = layer.linear_up(h)
        weights = layer.radial_mlp(radial)
        want = torch.zeros(n, layer.message_product.irreps_out.dim, dtype=dtype).index_add(
            0, ei[0], layer.message_product(h_up[ei[1]], sh, weights))
        have = layer.paths(h_up[:, layer.up_order].unsqueeze(0), sh.unsqueeze(0), weights.unsqueeze(0), ei[0], ei[1], n)
        assert relative(have[0][:, layer.message_layout], want) < (1e-13 if dtype == torch.float64 else 1e-5)


def member_by_member(members, species, edge_index, vectors):
    """(readouts [K, M, N, n_out], dE/dr [M, E, 3]) through each member's own e3nn code."""
    readouts, grads = [], []
    n = species.shape[0]
    for member in members:
        v = vectors.clone().requires_grad_(True)
        radial, sh = member.edge_geometry(v)
        one_hot, h, initial = member.embed_species(species, v.dtype)
        per_layer = []
        for k in range(member.n_layers):
            h, r = member.interaction(k, h, one_hot, initial, radial, sh, edge_index, n)
            per_layer.append(r)
        stacked = torch.stack(per_layer)
        readouts.append(stacked.detach())
        grads.append(torch.autograd.grad([stacked[:, :, 0].sum() + stacked[:, :, 1:].pow(2).sum()], [v])[0])
    return torch.stack(readouts, dim=1), torch.stack(grads)


def all_at_once(members, species, edge_index, vectors):
    stacked = StackedRace(members)
    v = vectors.unsqueeze(0).expand(len(members), -1, -1).clone().requires_grad_(True)
    readouts = stacked(species, edge_index, v)
    grad = torch.autograd.grad([readouts[..., 0].sum() + readouts[..., 1:].pow(2).sum()], [v])[0]
    return readouts.detach(), grad


def inputs(seed=2, n_atoms=11, cutoff=3.0):
    batch = batch_of([random_molecule(n_atoms, seed=seed)], TYPES, cutoff)
    ei = batch[keys.EDGE_INDEX]
    vectors = (batch[keys.POSITIONS][ei[1]] - batch[keys.POSITIONS][ei[0]]).detach()
    return batch[keys.SPECIES], ei, vectors


def relative(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("covariance", ["cholesky", "equivariant"])
@pytest.mark.parametrize("preset,overrides", [("tiny", {}), ("small", {}), ("tiny", {"l_max": 2}),
                                              ("tiny", {"l_max": 3, "channels": 4}),
                                              ("small", {"message_square": False}),
                                              ("small", {"message_square": True}),
                                              ("tiny", {"l_max": 2, "message_square": True})])
def test_stacked_equals_member_by_member(preset, overrides, covariance):
    members = [tiny_model(seed=s, preset=preset, covariance=covariance, cutoff=3.0, **overrides).eval()
               for s in range(3)]
    if overrides.get("message_square"):  # each member its own square weights (all 1 when built)
        with torch.no_grad():
            for member in members:
                for layer in member.layers:
                    layer.square.weight.normal_()
    species, ei, vectors = inputs()
    ref_r, ref_g = member_by_member(members, species, ei, vectors)
    r, g = all_at_once(members, species, ei, vectors)
    assert r.shape == ref_r.shape and g.shape == ref_g.shape
    assert relative(r, ref_r) < 1e-12
    assert relative(g, ref_g) < 1e-12
    # the members really differ (the comparison would be blind to a mixed-up member axis)
    assert relative(r[:, 0], r[:, 1]) > 1e-3


def test_stacked_is_equivariant():
    members = [tiny_model(seed=s, preset="tiny", covariance="equivariant", cutoff=3.0, l_max=2).eval()
               for s in range(2)]
    species, ei, vectors = inputs(seed=5)
    torch.manual_seed(7)
    rotation = o3.rand_matrix(dtype=torch.float64)
    stacked = StackedRace(members)
    m = len(members)
    base = stacked(species, ei, vectors.unsqueeze(0).expand(m, -1, -1))
    turned = stacked(species, ei, (vectors @ rotation.T).unsqueeze(0).expand(m, -1, -1))
    # scalars (energy, log-variance, isotropic part) stay, the three 1o vectors rotate
    assert relative(turned[..., :3], base[..., :3]) < 1e-10
    # a 1o feature rotates as e3nn's l=1 harmonics do: Y1(Rv) = P R P^T Y1(v)
    basis = o3.spherical_harmonics(1, torch.eye(3, dtype=torch.float64), normalize=True)  # [xyz, comp]
    d_matrix = basis.T @ rotation @ torch.linalg.inv(basis.T)
    vectors_out = base[..., 3:].reshape(*base.shape[:-1], 3, 3)
    assert relative(turned[..., 3:].reshape(vectors_out.shape), vectors_out @ d_matrix.T) < 1e-8


def test_members_of_different_shape_are_refused():
    a = tiny_model(seed=0, preset="tiny").eval()
    b = tiny_model(seed=1, preset="tiny", channels=4).eval()
    with pytest.raises(ValueError, match="member 1 differs in architecture"):
        StackedRace([a, b])


def test_stacked_scripts_and_handles_no_edges():
    from e3nn.util import jit as e3nn_jit

    members = [tiny_model(seed=s).eval() for s in range(2)]
    scripted = e3nn_jit.script(StackedRace(members))
    species = torch.tensor([0, 1, 2])
    out = scripted(species, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(2, 0, 3, dtype=torch.float64))
    ref = member_by_member(members, species, torch.zeros(2, 0, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.float64))
    assert torch.allclose(out, ref[0], rtol=1e-12, atol=1e-14)
