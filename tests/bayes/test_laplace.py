"""Last-layer Laplace: mask, Jacobians, GGN, evidence, predictive covariance and samples,
checked against explicit dense autograd computations on a tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import batch_of, random_molecule, tiny_model

from bayesrace import keys
from bayesrace.data import Frame, TypeMap, collate, frames_to_graphs
from bayesrace.bayes import (
    LastLayerLaplace,
    fit_last_layer_laplace,
    get_last_layer_weights,
    last_layer_jacobians,
    last_layer_mask,
    laplace_log_marginal_likelihood,
    predictive_covariance,
    sample_last_layer_weights,
    sample_members,
    set_last_layer_weights,
)

TYPE_NAMES = ["H", "C", "N"]


def _labelled_graphs(model_for_labels, sizes=(4, 5, 6), seed=10, noise=0.05):
    """Random molecules labelled by another network plus noise, so residuals are non-trivial."""
    rng = np.random.default_rng(seed)
    molecules = [random_molecule(n, seed=seed + k) for k, n in enumerate(sizes)]
    pred = model_for_labels(batch_of(molecules, TYPE_NAMES, model_for_labels.cutoff))
    frames, start = [], 0
    for k, molecule in enumerate(molecules):
        n = len(molecule)
        frames.append(
            Frame(
                numbers=molecule.numbers.astype(np.int64),
                positions=molecule.positions.astype(np.float64),
                cell=np.zeros((3, 3)),
                pbc=np.zeros(3, dtype=bool),
                energy=float(pred[keys.ENERGY][k].detach()) + float(rng.normal(0, noise)),
                forces=pred[keys.FORCES][start : start + n].detach().numpy() + rng.normal(0, noise, size=(n, 3)),
                source=f"molecule {k}",
            )
        )
        start += n
    return frames_to_graphs(frames, TypeMap(TYPE_NAMES), model_for_labels.cutoff)


def _as_function_of_w(model):
    """(E [B], F [N, 3]) as a differentiable function of the flat last-layer weights w."""
    masks = last_layer_mask(model)
    names = [f"readouts.{l}.linear_out.weight" for l in range(len(masks))]
    base = {name: p.detach() for name, p in model.named_parameters() if name in names}
    sizes = [int(m.sum()) for m in masks]
    model.train()  # create_graph in forward, so the forces are differentiable in w

    def predict(w):
        params, start = {}, 0
        for name, mask, size in zip(names, masks, sizes):
            params[name] = base[name].masked_scatter(mask, w[start : start + size])
            start += size
        return params

    def energies_and_forces(batch, w):
        out = torch.func.functional_call(model, predict(w), (batch,))
        return out[keys.ENERGY], out[keys.FORCES]

    return energies_and_forces


def _dense_jacobians(model, batch):
    w = get_last_layer_weights(model).clone()
    function = _as_function_of_w(model)
    energy_jacobian = torch.autograd.functional.jacobian(lambda v: function(batch, v)[0], w)
    force_jacobian = torch.autograd.functional.jacobian(lambda v: function(batch, v)[1], w)
    model.eval()
    return energy_jacobian, force_jacobian


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0).eval()


@pytest.fixture(scope="module")
def graphs():
    return _labelled_graphs(tiny_model(seed=1).eval())


@pytest.mark.parametrize("covariance", ["cholesky", "equivariant"])
def test_mask_selects_exactly_the_weights_the_energy_depends_on(covariance):
    model = tiny_model(seed=3, covariance=covariance).eval()
    batch = batch_of([random_molecule(5, seed=2), random_molecule(4, seed=3)], TYPE_NAMES, model.cutoff)
    masks = last_layer_mask(model)
    assert len(masks) == model.n_layers
    out = model(batch, compute_forces=False)  # forces would free the graph
    weights = [r.linear_out.weight for r in model.readouts]
    energy_grads = torch.autograd.grad(out[keys.ENERGY].sum(), weights, retain_graph=True)
    head_grads = torch.autograd.grad(out[keys.FORCE_COVARIANCE].sum() + out[keys.ENERGY_VARIANCE].sum(), weights,
                                     allow_unused=True)
    for mask, energy_grad, head_grad in zip(masks, energy_grads, head_grads):
        assert int(mask.sum()) == model.config.readout_hidden
        assert torch.all(energy_grad[~mask] == 0)
        assert torch.all(energy_grad[mask].abs() > 1e-12)
        # the heads depend on the other entries, never on the energy column
        assert torch.all(head_grad[mask] == 0)
        assert head_grad[~mask].abs().max() > 0


def test_get_and_set_round_trip(model):
    copy = tiny_model(seed=0).eval()
    w = get_last_layer_weights(copy)
    others = {n: p.detach().clone() for n, p in copy.named_parameters()}
    new_w = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(0))
    set_last_layer_weights(copy, new_w)
    assert torch.equal(get_last_layer_weights(copy), new_w)
    masks = last_layer_mask(copy)
    for name, p in copy.named_parameters():
        if "linear_out" in name and name.startswith("readouts."):
            mask = masks[int(name.split(".")[1])]
            assert torch.equal(p.detach()[~mask], others[name][~mask])
        else:
            assert torch.equal(p.detach(), others[name])
    with pytest.raises(ValueError, match="got 3 values"):
        set_last_layer_weights(copy, torch.zeros(3))


def test_jacobians_match_dense_autograd_and_finite_differences(model):
    batch = batch_of([random_molecule(5, seed=4), random_molecule(6, seed=5)], TYPE_NAMES, model.cutoff)
    energy_jacobian, force_jacobian = last_layer_jacobians(model, batch)
    dense_energy, dense_forces = _dense_jacobians(model, batch)
    assert energy_jacobian.shape == (2, 16) and force_jacobian.shape == (11, 3, 16)
    torch.testing.assert_close(energy_jacobian, dense_energy, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(force_jacobian, dense_forces, rtol=1e-10, atol=1e-12)
    # E and F are linear in w: a finite step reproduces the Jacobian up to round-off
    w = get_last_layer_weights(model)
    base = model(batch)
    probe = tiny_model(seed=0).eval()
    for p in (0, 7, 12):
        step = torch.zeros_like(w)
        step[p] = 0.3
        set_last_layer_weights(probe, w + step)
        shifted = probe(batch)
        torch.testing.assert_close((shifted[keys.ENERGY] - base[keys.ENERGY]).detach() / 0.3, energy_jacobian[:, p],
                                   rtol=1e-8, atol=1e-9)
        torch.testing.assert_close((shifted[keys.FORCES] - base[keys.FORCES]) / 0.3, force_jacobian[:, :, p],
                                   rtol=1e-8, atol=1e-9)


def _dense_reference(model, graphs, prior_precision):
    """H, Σ_w, log p(D|w*) and log Z by explicit dense matrices (heads from the model)."""
    batch = collate(graphs)
    energy_jacobian, force_jacobian = _dense_jacobians(model, batch)
    pred = model(batch)
    variance = pred[keys.ENERGY_VARIANCE].detach()
    covariance = pred[keys.FORCE_COVARIANCE].detach()
    hessian = energy_jacobian.T @ torch.diag(1.0 / variance) @ energy_jacobian
    for i in range(force_jacobian.shape[0]):
        hessian += force_jacobian[i].T @ torch.linalg.inv(covariance[i]) @ force_jacobian[i]
    n_parameters = hessian.shape[0]
    posterior_covariance = torch.linalg.inv(hessian + prior_precision * torch.eye(n_parameters, dtype=torch.float64))
    energy_error = (pred[keys.ENERGY] - batch[keys.ENERGY]).detach()
    force_error = (pred[keys.FORCES] - batch[keys.FORCES]).detach()
    log_likelihood = float(
        torch.distributions.Normal(0.0, variance.sqrt()).log_prob(energy_error).sum()
        + torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), covariance)
        .log_prob(force_error)
        .sum()
    )
    w = get_last_layer_weights(model)
    log_evidence = (
        log_likelihood
        - 0.5 * prior_precision * float(w @ w)
        + 0.5 * n_parameters * math.log(prior_precision)
        - 0.5 * float(torch.linalg.slogdet(hessian + prior_precision * torch.eye(n_parameters, dtype=torch.float64))[1])
    )
    return dict(hessian=hessian, covariance=posterior_covariance, log_likelihood=log_likelihood,
                log_evidence=log_evidence, energy_jacobian=energy_jacobian, force_jacobian=force_jacobian)


def test_hessian_covariance_and_evidence_match_dense_computation(model, graphs):
    alpha = 0.37
    fitted = fit_last_layer_laplace(model, graphs, batch_size=2, prior_precision=alpha)
    reference = _dense_reference(model, graphs, alpha)
    assert fitted.n_structures == 3 and fitted.n_atoms == 15 and fitted.n_parameters == 16
    assert fitted.energy_noise == "heads" and fitted.force_noise == "heads"
    torch.testing.assert_close(fitted.mean, get_last_layer_weights(model))
    torch.testing.assert_close(fitted.hessian, reference["hessian"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fitted.covariance, reference["covariance"], rtol=1e-7, atol=1e-12)
    assert fitted.log_likelihood == pytest.approx(reference["log_likelihood"], rel=1e-10)
    assert fitted.log_marginal_likelihood == pytest.approx(reference["log_evidence"], rel=1e-10)


def test_homoscedastic_noise_when_heads_are_untrained(graphs):
    model = tiny_model(seed=0).eval()
    model.set_trained_heads([])
    alpha = 2.0
    fitted = fit_last_layer_laplace(model, graphs, prior_precision=alpha)
    assert fitted.energy_noise == "homoscedastic" and fitted.force_noise == "homoscedastic"
    batch = collate(graphs)
    energy_jacobian, force_jacobian = _dense_jacobians(model, batch)
    pred = model(batch)
    num_atoms = batch[keys.NUM_ATOMS].to(torch.float64)
    energy_error = (pred[keys.ENERGY] - batch[keys.ENERGY]).detach()
    force_error = (pred[keys.FORCES] - batch[keys.FORCES]).detach()
    s_energy = float(((energy_error / num_atoms) ** 2).mean())
    s_force = float((force_error**2).mean())
    energy_variance = num_atoms**2 * s_energy  # σ²_E,b = N_b² s_E²
    hessian = energy_jacobian.T @ torch.diag(1.0 / energy_variance) @ energy_jacobian
    hessian += force_jacobian.reshape(-1, 16).T @ force_jacobian.reshape(-1, 16) / s_force
    torch.testing.assert_close(fitted.hessian, hessian, rtol=1e-9, atol=1e-9)
    assert fitted.energy_noise_variance_per_atom == pytest.approx(s_energy, rel=1e-12)
    assert fitted.force_noise_variance == pytest.approx(s_force, rel=1e-12)
    log_likelihood = float(
        torch.distributions.Normal(0.0, energy_variance.sqrt()).log_prob(energy_error).sum()
        # float64 scale: a Python-float scale would make torch.distributions compute in float32
        + torch.distributions.Normal(0.0, torch.tensor(s_force, dtype=torch.float64).sqrt()).log_prob(force_error).sum()
    )
    assert fitted.log_likelihood == pytest.approx(log_likelihood, rel=1e-10)


def test_fitted_prior_precision_maximises_the_evidence(model, graphs):
    fitted = fit_last_layer_laplace(model, graphs)
    alpha = fitted.prior_precision
    # the dense evidence at the fitted α agrees, and no α on a wide grid beats it
    assert fitted.log_marginal_likelihood == pytest.approx(_dense_reference(model, graphs, alpha)["log_evidence"],
                                                           rel=1e-10)
    eigenvalues = torch.linalg.eigvalsh(fitted.hessian).clamp(min=0)
    norm = float(fitted.mean @ fitted.mean)
    grid = alpha * np.exp(np.linspace(-6, 6, 241))
    values = [laplace_log_marginal_likelihood(fitted.log_likelihood, eigenvalues, norm, a) for a in grid]
    assert max(values) <= fitted.log_marginal_likelihood + 1e-9
    # and it is a strict interior maximum: the neighbours ±1% are lower
    for factor in (0.99, 1.01):
        assert laplace_log_marginal_likelihood(fitted.log_likelihood, eigenvalues, norm, alpha * factor) \
            < fitted.log_marginal_likelihood
    # MacKay's fixed point holds at the optimum
    gamma = float((eigenvalues / (eigenvalues + alpha)).sum())
    assert alpha * norm == pytest.approx(gamma, rel=1e-8)


def test_predictive_covariance_is_the_dense_linearised_one(model, graphs):
    fitted = fit_last_layer_laplace(model, graphs, prior_precision=0.5)
    batch = batch_of([random_molecule(7, seed=20), random_molecule(3, seed=21)], TYPE_NAMES, model.cutoff)
    energy_jacobian, force_jacobian = _dense_jacobians(model, batch)
    covariance = torch.linalg.inv(fitted.hessian + 0.5 * torch.eye(16, dtype=torch.float64))
    out = predictive_covariance(model, fitted, batch)
    torch.testing.assert_close(out[keys.ENERGY_VAR_EPISTEMIC],
                               torch.diagonal(energy_jacobian @ covariance @ energy_jacobian.T), rtol=1e-7, atol=0)
    for i in range(force_jacobian.shape[0]):
        expected = force_jacobian[i] @ covariance @ force_jacobian[i].T
        torch.testing.assert_close(out[keys.FORCE_COV_EPISTEMIC][i], expected, rtol=1e-7, atol=1e-14)
    trace = torch.diagonal(out[keys.FORCE_COV_EPISTEMIC], dim1=-2, dim2=-1).sum(-1)
    torch.testing.assert_close(out[keys.ATOMIC_FORCE_STD_EPISTEMIC], torch.sqrt(trace / 3))
    assert torch.all(out[keys.ENERGY_VAR_EPISTEMIC] > 0)


def test_antithetic_samples_keep_the_map_mean_and_reproduce_the_covariance(model, graphs):
    fitted = fit_last_layer_laplace(model, graphs, prior_precision=0.5)
    batch = batch_of([random_molecule(6, seed=30), random_molecule(4, seed=31)], TYPE_NAMES, model.cutoff)
    with pytest.raises(ValueError, match="even"):
        sample_members(model, fitted, 3)
    members = sample_members(model, fitted, 6, seed=1)
    assert len(members) == 6
    map_pred = model(batch)
    outputs = [m(batch) for m in members]
    mean_energy = torch.stack([o[keys.ENERGY] for o in outputs]).mean(0)
    mean_forces = torch.stack([o[keys.FORCES] for o in outputs]).mean(0)
    torch.testing.assert_close(mean_energy, map_pred[keys.ENERGY], rtol=0, atol=1e-9)
    torch.testing.assert_close(mean_forces, map_pred[keys.FORCES], rtol=0, atol=1e-11)
    assert not torch.allclose(outputs[0][keys.ENERGY], map_pred[keys.ENERGY])
    # the aleatoric heads are untouched by the sampling
    torch.testing.assert_close(outputs[0][keys.FORCE_COVARIANCE], map_pred[keys.FORCE_COVARIANCE])
    # same seed, same members
    again = sample_members(model, fitted, 2, seed=1)
    torch.testing.assert_close(get_last_layer_weights(again[0]), get_last_layer_weights(members[0]))

    # many samples: the sample covariance of energies and forces approaches J Σ_w Jᵀ. Member
    # energies are J_E w_m + const exactly (checked by evaluating a few members), so the
    # weights stand in for 2000 model copies
    energy_jacobian, force_jacobian = last_layer_jacobians(model, batch)
    weights = sample_last_layer_weights(fitted, 2000, seed=2)
    torch.testing.assert_close(weights.mean(0), fitted.mean, rtol=0, atol=1e-12)
    few = sample_members(model, fitted, 4, seed=2)
    offset = map_pred[keys.ENERGY].detach() - energy_jacobian @ fitted.mean
    for member, w in zip(few, weights[:4]):
        torch.testing.assert_close(get_last_layer_weights(member), w)
        torch.testing.assert_close(member(batch)[keys.ENERGY].detach(), energy_jacobian @ w + offset, rtol=0, atol=1e-9)
    energies = weights @ energy_jacobian.T
    forces = torch.einsum("nap,mp->mna", force_jacobian, weights)
    expected = predictive_covariance(model, fitted, batch)
    torch.testing.assert_close(energies.var(0, unbiased=False), expected[keys.ENERGY_VAR_EPISTEMIC], rtol=0.15, atol=0)
    deviation = forces - forces.mean(0)
    force_cov = torch.einsum("mna,mnb->nab", deviation, deviation) / forces.shape[0]
    relative = (force_cov - expected[keys.FORCE_COV_EPISTEMIC]).norm() / expected[keys.FORCE_COV_EPISTEMIC].norm()
    assert relative < 0.15


def test_summary_round_trips_through_json(model, graphs):
    import json

    fitted = fit_last_layer_laplace(model, graphs)
    summary = json.loads(json.dumps(fitted.summary()))
    assert summary["prior_precision"] == fitted.prior_precision
    assert 0 < summary["effective_parameters"] <= 16
    rebuilt = LastLayerLaplace.from_summary(summary)
    torch.testing.assert_close(rebuilt.covariance, fitted.covariance)
    torch.testing.assert_close(rebuilt.mean, fitted.mean)


def test_bad_input_is_reported(model, graphs):
    with pytest.raises(ValueError, match="prior_precision must be positive"):
        fit_last_layer_laplace(model, graphs, prior_precision=0.0)
    with pytest.raises(ValueError, match="no training structures"):
        fit_last_layer_laplace(model, [])
    unlabelled = [frames_to_graphs([Frame(numbers=np.array([1, 6]), positions=np.array([[0, 0, 0], [1.1, 0, 0.]]),
                                          cell=np.zeros((3, 3)), pbc=np.zeros(3, bool), source="bare.xyz, frame 0")],
                                   TypeMap(TYPE_NAMES), model.cutoff)[0]]
    with pytest.raises(ValueError, match="bare.xyz, frame 0"):
        fit_last_layer_laplace(model, unlabelled)
    other = tiny_model(seed=0, readout_hidden=4).eval()
    fitted = fit_last_layer_laplace(model, graphs, prior_precision=1.0)
    with pytest.raises(ValueError, match="not fitted to it"):
        sample_members(other, fitted, 2)


def test_cli_end_to_end(tmp_path, model, graphs, capsys):
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    from bayesrace.bayes import load_posterior, save_posterior
    from bayesrace.cli import main

    source = tmp_path / "ensemble.pt"
    save_posterior(source, [tiny_model(seed=5).eval(), model], kind="ensemble", data_sha256="abc123",
                   config={"data": {"energy_key": "energy", "forces_key": "forces"}})
    atoms_list = []
    for g in graphs:
        atoms = ase.Atoms(numbers=g.atomic_numbers, positions=g.positions)
        atoms.calc = SinglePointCalculator(atoms, energy=g.energy, forces=g.forces)
        atoms_list.append(atoms)
    train_file = tmp_path / "train.xyz"
    ase.io.write(train_file, atoms_list, format="extxyz")
    out = tmp_path / "laplace.pt"
    code = main(["laplace", str(source), str(train_file), "--out", str(out), "--member", "1", "--samples", "4",
                 "--max-structures", "2", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "prior precision alpha" in printed and "log marginal likelihood" in printed and "eV/Å" in printed
    posterior = load_posterior(out)
    assert posterior.kind == "laplace" and len(posterior.members) == 4
    info = posterior.record_info
    assert info["data_sha256"] == "abc123"
    assert info["laplace"]["n_structures"] == 2
    expected = fit_last_layer_laplace(model, graphs[:2])
    # the extxyz round trip rounds positions and labels, hence the loose tolerances
    assert info["laplace"]["prior_precision"] == pytest.approx(expected.prior_precision, rel=1e-6)
    printed_alpha = float(printed.split("prior precision alpha = ")[1].split()[0])
    assert printed_alpha == pytest.approx(expected.prior_precision, rel=1e-5)
    # the samples' mean is member 1 (the MAP) exactly
    batch = collate(graphs)
    torch.testing.assert_close(posterior(batch)[keys.ENERGY], model(batch)[keys.ENERGY], rtol=0, atol=1e-9)

    assert main(["laplace", str(source), str(train_file), "--out", str(out), "--samples", "3"]) == 2
    assert "even" in capsys.readouterr().err
    assert main(["laplace", str(source), str(train_file), "--out", str(out), "--member", "2"]) == 2
    assert "members 0..1" in capsys.readouterr().err
