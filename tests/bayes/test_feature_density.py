"""The feature density (bayes._feature_density): its known answer on the training atoms,
invariance, the posterior record, and the deployable's distance (shell and layer mode, after
torch.jit save/load) equal to the Python one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bayesrace import keys
from bayesrace.bayes import (Posterior, atom_features, feature_distance, fit_feature_density, load_posterior,
                             save_posterior, validate_feature_density)
from bayesrace.data import Frame, TypeMap, frames_to_graphs
from bayesrace.export import export_posterior, ghost_images, layered_evaluate
from conftest import batch_of, random_molecule, tiny_model
from deployable_tools import call, deployable_inputs

HASH = "0" * 64


def training_graphs(n=12, cutoff=5.0):
    frames = [Frame(numbers=a.numbers.astype(np.int64), positions=a.positions, cell=np.zeros((3, 3)),
                    pbc=np.zeros(3, dtype=bool), source=f"random {k}")
              for k, a in enumerate(random_molecule(7, seed=k) for k in range(n))]
    return frames_to_graphs(frames, TypeMap(["H", "C", "N"]), cutoff)


@pytest.fixture(scope="module")
def posterior():
    members = [tiny_model(seed=s, n_layers=3) for s in (1, 2)]
    graphs = training_graphs(cutoff=members[0].cutoff)
    post = Posterior(members).eval()
    post.feature_density = fit_feature_density(members, graphs)
    post.record_info = {"data_sha256": HASH}
    return post, graphs


def test_mean_squared_distance_on_the_training_atoms_is_the_known_trace(posterior):
    post, graphs = posterior
    from bayesrace.data import collate

    batch = collate(graphs, dtype=torch.float64)
    x = atom_features(post.members[0], batch)
    species = batch[keys.SPECIES]
    d = feature_distance(post.members, post.feature_density, batch)[0]
    for s in range(3):
        z = x[species == s]
        n = z.shape[0]
        z = (z - z.mean(0)) / (z.std(0) + 1e-8)
        covariance = z.T @ z / (n - 1)
        eye = torch.eye(z.shape[1], dtype=z.dtype)
        # mean of zᵀ(C + λI)⁻¹z over the fitted atoms = (n-1)/n · tr(C (C + λI)⁻¹)
        expected = (n - 1) / n * torch.trace(covariance @ torch.linalg.inv(covariance + 1e-3 * eye))
        assert torch.allclose((d[species == s] ** 2).mean(), expected, rtol=1e-6)


def test_distance_is_invariant_and_grows_away_from_training(posterior):
    post, _ = posterior
    atoms = random_molecule(7, seed=3)
    rotated = atoms.copy()
    rotated.rotate(73.0, (0.3, -0.5, 0.8), center="COM")
    rotated.positions = -rotated.positions + 1.7  # and an inversion and a translation
    pair = batch_of([atoms, rotated], post.type_names, post.cutoff)
    d = post(pair)[keys.ATOMIC_FEATURE_DISTANCE].detach()
    # the posterior's distances come from its own forward pass: the same as a separate pass's
    assert torch.allclose(d, feature_distance(post.members, post.feature_density, pair).mean(dim=0), rtol=1e-12)
    assert torch.allclose(d[:7], d[7:], rtol=1e-10, atol=1e-12)
    squeezed = atoms.copy()
    squeezed.positions *= 0.45  # far tighter than any training structure
    far = post(batch_of([squeezed], post.type_names, post.cutoff))[keys.ATOMIC_FEATURE_DISTANCE].detach()
    assert far.mean() > 3.0 * d[:7].mean()


def test_posterior_record_keeps_the_density_and_checks_it(posterior, tmp_path):
    post, _ = posterior
    path = tmp_path / "posterior.pt"
    save_posterior(path, list(post.members), feature_density=post.feature_density)
    loaded = load_posterior(path)
    assert torch.equal(loaded.feature_density["whiten"], post.feature_density["whiten"])
    with pytest.raises(ValueError, match=r"feature_density.mean must have shape \[3, 3, D\]"):
        validate_feature_density(post.feature_density, 3, 3)
    with pytest.raises(ValueError, match="lacks"):
        validate_feature_density({"mean": post.feature_density["mean"]}, 2, 3)


def test_a_species_without_training_atoms_is_measured_against_all_atoms():
    members = [tiny_model(seed=0)]
    atoms = random_molecule(4, symbols=("H", "C"), seed=0)
    frame = Frame(numbers=atoms.numbers.astype(np.int64), positions=atoms.positions, cell=np.zeros((3, 3)),
                  pbc=np.zeros(3, dtype=bool), source="HC only")
    density = fit_feature_density(members, frames_to_graphs([frame], TypeMap(["H", "C", "N"]), 5.0))
    assert density["training_atoms"] == [2, 2, 0] and density["pooled_species"] == ["N"]
    batch = batch_of([atoms], ["H", "C", "N"], 5.0)
    pooled = atom_features(members[0], batch)
    mu = pooled.mean(0)
    z = (pooled - mu) / (pooled.std(0) + 1e-8)
    assert torch.allclose(density["mean"][0, 2], mu)
    # the N Gaussian is that of the 4 atoms together: their squared distances average to its known trace
    covariance = z.T @ z / 3
    expected = 3 / 4 * torch.trace(covariance @ torch.linalg.inv(covariance + 1e-3 * torch.eye(z.shape[1],
                                                                                                dtype=z.dtype)))
    d = torch.sqrt(torch.sum(((pooled - mu) @ density["whiten"][0, 2]) ** 2, dim=1))
    assert torch.allclose((d ** 2).mean(), expected, rtol=1e-6)


def test_deployable_distance_equals_python_in_shell_and_layer_mode(posterior, tmp_path):
    post, _ = posterior
    path = tmp_path / "model.pt"
    metadata = export_posterior(post, path)
    assert metadata[keys.META_FEATURE_DENSITY]["training_atoms"] == post.feature_density["training_atoms"]
    module = torch.jit.load(str(path))
    atoms = random_molecule(9, seed=11, box=3.5)
    python = feature_distance(post.members, post.feature_density, batch_of([atoms], post.type_names, post.cutoff))
    shell = call(module, deployable_inputs(atoms, post.cutoff))[keys.MEMBER_FEATURE_DISTANCE]
    assert shell.shape == (2, 9)
    assert torch.allclose(shell, python, rtol=1e-10, atol=1e-12)
    # layer mode on a periodic cell against shell mode on the same images
    atoms.cell = np.diag([6.0, 6.5, 7.0])
    atoms.pbc = True
    system = ghost_images(atoms, post.cutoff, post.type_names)
    layers = layered_evaluate(module, torch.tensor(system["positions"]), torch.tensor(system["species"]),
                              torch.tensor(system["edge_index"]), system["n_local"],
                              torch.tensor(system["ghost_owner"]), False)
    periodic = feature_distance(post.members, post.feature_density,
                                batch_of([atoms], post.type_names, post.cutoff))
    assert torch.allclose(layers[keys.MEMBER_FEATURE_DISTANCE][:, :9], periodic, rtol=1e-10, atol=1e-12)
    assert torch.all(layers[keys.MEMBER_FEATURE_DISTANCE][:, 9:] == 0)


def test_deployable_without_density_reports_none(tmp_path):
    post = Posterior([tiny_model(seed=0)]).eval()
    post.record_info = {"data_sha256": HASH}
    path = tmp_path / "model.pt"
    metadata = export_posterior(post, path)
    assert keys.META_FEATURE_DENSITY not in metadata
    module = torch.jit.load(str(path))
    out = call(module, deployable_inputs(random_molecule(5, seed=1), post.members[0].cutoff))
    assert out[keys.MEMBER_FEATURE_DISTANCE].shape == (1, 0)
    assert int(module.n_readout()) == post.members[0].readout_width()
    from bayesrace.calculator import BayesRaceCalculator

    calc = BayesRaceCalculator(post)
    calc.calculate(random_molecule(5, seed=1), ["energy"])
    assert "feature_distance" not in calc.results
