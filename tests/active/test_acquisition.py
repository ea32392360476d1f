"""Acquisition (BALD) scores, mixture-MI bounds and batch selection, on synthetic numpy predictions."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from bayesrace import keys
from bayesrace.active import (
    STRATEGIES,
    acquisition_scores,
    bald_energy_scores,
    bald_force_scores,
    energy_std_scores,
    gaussian_mi,
    joint_gaussian_mi,
    member_gram,
    mixture_mi_lower_bound,
    mixture_mi_monte_carlo,
    mixture_mi_pairwise,
    mixture_mi_upper_bound,
    select_batch,
    structure_mixture_mi,
)


def random_spd(rng, dim, scale=1.0):
    matrix = rng.standard_normal((dim, dim))
    return scale * (matrix @ matrix.T / dim + 0.3 * np.eye(dim))


def make_prediction(member_energy, member_forces, energy_noise, force_noise, num_atoms):
    """A predict_frames-like dict whose moments follow aggregate_members (1/M variances)."""
    num_atoms = np.asarray(num_atoms)
    energy_deviation = member_energy - member_energy.mean(axis=0)
    force_deviation = member_forces - member_forces.mean(axis=0)
    return {
        keys.MEMBER_ENERGY: member_energy,
        keys.MEMBER_FORCES: member_forces,
        keys.ENERGY_VAR_EPISTEMIC: (energy_deviation**2).mean(axis=0),
        keys.ENERGY_VAR_ALEATORIC: energy_noise,
        keys.FORCE_COV_EPISTEMIC: np.einsum("mni,mnj->nij", force_deviation, force_deviation) / len(member_forces),
        keys.FORCE_COV_ALEATORIC: force_noise,
        keys.NUM_ATOMS: num_atoms,
        keys.BATCH: np.repeat(np.arange(len(num_atoms)), num_atoms),
    }


def synthetic_pool(rng, spreads, n_members=8, latent=7, num_atoms=None):
    """Members disagree along random latent directions, with per-structure spread ``spreads`` [B]."""
    spreads = np.asarray(spreads, dtype=float)
    n_structures = len(spreads)
    num_atoms = rng.integers(1, 4, size=n_structures) if num_atoms is None else np.asarray(num_atoms)
    n_atoms = int(num_atoms.sum())
    batch = np.repeat(np.arange(n_structures), num_atoms)
    weights = rng.standard_normal((n_members, latent))  # member "weights"
    energy_features = rng.standard_normal((n_structures, latent))
    force_features = rng.standard_normal((n_atoms, 3, latent))
    member_energy = rng.normal(size=n_structures) + spreads * (weights @ energy_features.T)
    member_forces = rng.normal(size=(n_atoms, 3)) + spreads[batch][None, :, None] * np.einsum(
        "ml,nil->mni", weights, force_features
    )
    energy_noise = 0.5 * num_atoms * rng.uniform(0.5, 1.5, size=n_structures)
    force_noise = np.stack([random_spd(rng, 3, 0.5) for _ in range(n_atoms)])
    return make_prediction(member_energy, member_forces, energy_noise, force_noise, num_atoms)


# ------------------------------------------------------------------ Gaussian form and mixture bounds


def test_gaussian_mi_matches_dense_determinant():
    rng = np.random.default_rng(0)
    epistemic = np.stack([random_spd(rng, 3) for _ in range(4)])
    noise = np.stack([random_spd(rng, 3, 0.2) for _ in range(4)])
    dense = [0.5 * math.log(np.linalg.det(np.eye(3) + e @ np.linalg.inv(n))) for e, n in zip(epistemic, noise)]
    np.testing.assert_allclose(gaussian_mi(epistemic, noise), dense, rtol=1e-12)
    assert gaussian_mi(np.array([[3.0]]), np.array([[1.0]])) == pytest.approx(0.5 * math.log(4.0))
    with pytest.raises(ValueError, match="positive definite"):
        gaussian_mi(np.eye(2), np.diag([1.0, -1.0]))


def test_gaussian_form_agrees_with_monte_carlo_on_densely_sampled_gaussian_posterior():
    rng = np.random.default_rng(1)
    epistemic, noise = random_spd(rng, 2, 1.0), random_spd(rng, 2, 0.7)
    members = rng.multivariate_normal(np.zeros(2), epistemic, size=1500)
    estimate, stderr = mixture_mi_monte_carlo(members, noise, n_samples=4000, seed=3, return_stderr=True)
    exact_gaussian = float(gaussian_mi(epistemic, noise))
    # finite M: the empirical mixture differs from the Gaussian by O(1/sqrt(M)) in its moments
    assert abs(estimate - exact_gaussian) < 4 * stderr + 0.03, (estimate, stderr, exact_gaussian)
    assert mixture_mi_upper_bound(members, noise) == pytest.approx(exact_gaussian, abs=0.03)


@pytest.mark.parametrize("n_members,dim,scale", [(2, 1, 0.5), (3, 2, 2.0), (5, 3, 1.0), (8, 2, 4.0), (4, 6, 1.5)])
def test_monte_carlo_lies_between_the_bounds(n_members, dim, scale):
    rng = np.random.default_rng(n_members * 10 + dim)
    members = scale * rng.standard_normal((n_members, dim))
    noise = random_spd(rng, dim)
    estimate, stderr = mixture_mi_monte_carlo(members, noise, n_samples=4000, seed=1, return_stderr=True)
    lower = mixture_mi_lower_bound(members, noise)
    upper = min(mixture_mi_upper_bound(members, noise), mixture_mi_pairwise(members, noise, "kl"))
    assert 0.0 <= lower <= upper <= math.log(n_members) + 1e-12  # the KL pairwise bound is at most log M
    assert lower - 4 * stderr <= estimate <= upper + 4 * stderr, (lower, estimate, stderr, upper)
    assert lower < upper  # the bounds are not trivially equal, so the check above can fail


def test_single_member_has_zero_information():
    member = np.array([[0.3, -1.2]])
    noise = np.diag([0.5, 2.0])
    assert mixture_mi_upper_bound(member, noise) == pytest.approx(0.0, abs=1e-14)
    assert mixture_mi_lower_bound(member, noise) == pytest.approx(0.0, abs=1e-14)
    assert mixture_mi_pairwise(member, noise, "kl") == pytest.approx(0.0, abs=1e-14)
    assert mixture_mi_monte_carlo(member, noise, n_samples=64) == pytest.approx(0.0, abs=1e-14)


def exact_two_member_mi(half_gap, sigma):
    """MI of ½N(−a, σ²) + ½N(a, σ²) by quadrature: H[mixture] − H[N(0, σ²)]."""

    def integrand(y):
        density = 0.5 * (stats.norm.pdf(y, -half_gap, sigma) + stats.norm.pdf(y, half_gap, sigma))
        return -density * math.log(density) if density > 0 else 0.0

    bound = half_gap + 12 * sigma
    entropy, _ = integrate.quad(integrand, -bound, bound, points=[-half_gap, half_gap], limit=200)
    return entropy - 0.5 * math.log(2 * math.pi * math.e * sigma**2)


@pytest.mark.parametrize("half_gap", [0.3, 1.0, 2.5])
def test_two_members_monte_carlo_matches_quadrature(half_gap):
    members, noise = np.array([[-half_gap], [half_gap]]), np.array([[1.0]])
    estimate, stderr = mixture_mi_monte_carlo(members, noise, n_samples=20000, seed=7, return_stderr=True)
    assert abs(estimate - exact_two_member_mi(half_gap, 1.0)) < 4 * stderr


def test_two_members_limits_log2_and_zero():
    sigma = 0.5
    far = np.array([[-20 * sigma], [20 * sigma]])
    assert mixture_mi_monte_carlo(far, [[sigma**2]], n_samples=2000) == pytest.approx(math.log(2), abs=1e-6)
    assert mixture_mi_lower_bound(far, [[sigma**2]]) == pytest.approx(math.log(2), abs=1e-6)
    assert mixture_mi_pairwise(far, [[sigma**2]], "kl") == pytest.approx(math.log(2), abs=1e-6)
    assert mixture_mi_upper_bound(far, [[sigma**2]]) > 2 * math.log(2)  # the Gaussian bound is loose here
    near = np.array([[-1e-4 * sigma], [1e-4 * sigma]])  # exact MI ≈ a²/(2σ²) = 5e-9
    assert 0.0 <= mixture_mi_lower_bound(near, [[sigma**2]]) <= mixture_mi_upper_bound(near, [[sigma**2]]) < 1e-8
    assert abs(mixture_mi_monte_carlo(near, [[sigma**2]], n_samples=2000)) < 2e-5  # MC error ~ a/σ / sqrt(n)


# ------------------------------------------------------------------ per structure


def test_structure_mixture_mi_equals_single_label_functions_with_atoms_joint():
    rng = np.random.default_rng(4)
    prediction = synthetic_pool(rng, spreads=[0.3, 1.0, 2.0], n_members=5, num_atoms=[1, 2, 3])
    batch = prediction[keys.BATCH]
    for b in range(3):
        atoms = np.flatnonzero(batch == b)
        energy_means = prediction[keys.MEMBER_ENERGY][:, b : b + 1]
        force_means = prediction[keys.MEMBER_FORCES][:, atoms].reshape(5, -1)
        energy_noise = prediction[keys.ENERGY_VAR_ALEATORIC][b] * np.eye(1)
        force_noise = np.zeros((3 * len(atoms),) * 2)
        for slot, atom in enumerate(atoms):
            force_noise[3 * slot : 3 * slot + 3, 3 * slot : 3 * slot + 3] = prediction[keys.FORCE_COV_ALEATORIC][atom]
        both_means = np.concatenate([energy_means, force_means], axis=1)
        off_diagonal = np.zeros((1, len(force_noise)))
        both_noise = np.block([[energy_noise, off_diagonal], [off_diagonal.T, force_noise]])
        for target, means, noise in (
            ("energy", energy_means, energy_noise),
            ("forces", force_means, force_noise),
            ("energy_forces", both_means, both_noise),
        ):
            assert structure_mixture_mi(prediction, target, "upper")[b] == pytest.approx(
                mixture_mi_upper_bound(means, noise), rel=1e-10
            )
            assert structure_mixture_mi(prediction, target, "lower")[b] == pytest.approx(
                mixture_mi_lower_bound(means, noise), rel=1e-10
            )
            assert structure_mixture_mi(prediction, target, "kl")[b] == pytest.approx(
                mixture_mi_pairwise(means, noise, "kl"), rel=1e-10
            )
    estimate = structure_mixture_mi(prediction, "energy_forces", "monte_carlo", n_samples=2000, seed=0)
    lower = structure_mixture_mi(prediction, "energy_forces", "lower")
    upper = structure_mixture_mi(prediction, "energy_forces", "upper")
    assert np.all(lower - 0.1 <= estimate) and np.all(estimate <= upper + 0.1)


def test_joint_form_of_one_structure_equals_per_structure_bald():
    rng = np.random.default_rng(5)
    prediction = synthetic_pool(rng, spreads=[0.5, 1.5, 1.0, 2.0], num_atoms=[1, 3, 1, 2])
    energy_gram, force_gram = member_gram(prediction, "energy"), member_gram(prediction, "forces")
    joint_energy = [joint_gaussian_mi(g[None]) for g in energy_gram]
    joint_forces = np.array([joint_gaussian_mi(g[None]) for g in force_gram])
    # energy: identical forms
    np.testing.assert_allclose(joint_energy, bald_energy_scores(prediction), rtol=1e-10)
    # forces: atoms jointly (Gram) = atoms independently (per-atom sum) for one-atom structures only ...
    per_structure = bald_force_scores(prediction)
    np.testing.assert_allclose(joint_forces[[0, 2]], per_structure[[0, 2]], rtol=1e-10)
    # ... and otherwise the dense 3N×3N form with cross-atom epistemic covariance, below the per-atom sum
    atoms = np.flatnonzero(prediction[keys.BATCH] == 1)
    deviation = prediction[keys.MEMBER_FORCES][:, atoms].reshape(8, -1)
    deviation = deviation - deviation.mean(axis=0)
    dense_noise = np.zeros((9, 9))
    for slot, atom in enumerate(atoms):
        dense_noise[3 * slot : 3 * slot + 3, 3 * slot : 3 * slot + 3] = prediction[keys.FORCE_COV_ALEATORIC][atom]
    dense = float(gaussian_mi(deviation.T @ deviation / 8, dense_noise))
    assert joint_forces[1] == pytest.approx(dense, rel=1e-10)
    assert joint_forces[1] < per_structure[1] - 1e-3
    both = [joint_gaussian_mi(g[None]) for g in member_gram(prediction, "energy_forces")]
    np.testing.assert_allclose(both, [joint_gaussian_mi(np.stack([e, f])) for e, f in zip(energy_gram, force_gram)])


def test_scores_are_invariant_under_calibration():
    rng = np.random.default_rng(6)
    prediction = synthetic_pool(rng, spreads=[0.5, 1.5, 1.0])
    calibrated = dict(prediction)
    atom_ratio_sq = rng.uniform(0.5, 3.0, size=len(prediction[keys.BATCH]))
    structure_ratio_sq = rng.uniform(0.5, 3.0, size=3)
    calibrated[keys.FORCE_COV_EPISTEMIC] = prediction[keys.FORCE_COV_EPISTEMIC] * atom_ratio_sq[:, None, None]
    calibrated[keys.FORCE_COV_ALEATORIC] = prediction[keys.FORCE_COV_ALEATORIC] * atom_ratio_sq[:, None, None]
    calibrated[keys.ENERGY_VAR_EPISTEMIC] = prediction[keys.ENERGY_VAR_EPISTEMIC] * structure_ratio_sq
    calibrated[keys.ENERGY_VAR_ALEATORIC] = prediction[keys.ENERGY_VAR_ALEATORIC] * structure_ratio_sq
    for strategy in ("bald_e", "bald_f", "bald_ef"):
        np.testing.assert_allclose(acquisition_scores(calibrated, strategy), acquisition_scores(prediction, strategy))
    np.testing.assert_allclose(member_gram(calibrated), member_gram(prediction), rtol=1e-10, atol=1e-14)


def test_energy_std_and_random_scores():
    rng = np.random.default_rng(8)
    prediction = synthetic_pool(rng, spreads=[0.5, 1.5, 1.0], num_atoms=[1, 2, 4])
    expected = np.sqrt(prediction[keys.ENERGY_VAR_EPISTEMIC] + prediction[keys.ENERGY_VAR_ALEATORIC]) / [1, 2, 4]
    np.testing.assert_allclose(energy_std_scores(prediction), expected)
    first, again = acquisition_scores(prediction, "random", seed=3), acquisition_scores(prediction, "random", seed=3)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, acquisition_scores(prediction, "random", seed=4))
    assert set(STRATEGIES) == {"bald_e", "bald_f", "bald_ef", "energy_std", "random"}


# ------------------------------------------------------------------ batch selection


def test_bald_picks_the_disagreeing_cluster_before_random():
    rng = np.random.default_rng(9)
    n_pool, cluster = 60, np.arange(54, 60)
    spreads = np.full(n_pool, 0.1)
    spreads[cluster] = 2.0  # far from the training data: members disagree strongly
    prediction = synthetic_pool(rng, spreads)
    for strategy in ("bald_e", "bald_f", "bald_ef"):
        for batch_aware in (True, False):
            picked = select_batch(prediction, 6, strategy, batch_aware=batch_aware)
            assert picked[0] in cluster
            assert np.isin(picked, cluster).sum() >= 5
    first_cluster_position = [
        int(np.flatnonzero(np.isin(select_batch(prediction, n_pool, "random", seed=seed), cluster))[0])
        for seed in range(200)
    ]
    # expected position of the first of 6 among 60 in a random order: 54/7 ≈ 7.7
    assert np.mean(first_cluster_position) > 4.0


@pytest.mark.parametrize("strategy", ["bald_e", "bald_f", "bald_ef"])
def test_batch_aware_selection_avoids_duplicates(strategy):
    rng = np.random.default_rng(10)
    # many members and latent directions, so distinct structures are informative about different directions
    spreads = np.concatenate([[1.5], np.full(8, 1.0)])
    prediction = synthetic_pool(rng, spreads, n_members=40, latent=39, num_atoms=np.full(9, 2))
    duplicate = {name: np.asarray(value).copy() for name, value in prediction.items()}
    # 5 exact copies of structure 0 appended to the pool (indices 9..13)
    copies = [0] * 5
    atoms_of_0 = np.flatnonzero(prediction[keys.BATCH] == 0)
    for name in (keys.MEMBER_ENERGY,):
        duplicate[name] = np.concatenate([prediction[name], prediction[name][:, copies]], axis=1)
    for name in (keys.ENERGY_VAR_EPISTEMIC, keys.ENERGY_VAR_ALEATORIC, keys.NUM_ATOMS):
        duplicate[name] = np.concatenate([prediction[name], prediction[name][copies]])
    duplicate[keys.MEMBER_FORCES] = np.concatenate(
        [prediction[keys.MEMBER_FORCES]] + [prediction[keys.MEMBER_FORCES][:, atoms_of_0]] * 5, axis=1
    )
    for name in (keys.FORCE_COV_EPISTEMIC, keys.FORCE_COV_ALEATORIC):
        duplicate[name] = np.concatenate([prediction[name]] + [prediction[name][atoms_of_0]] * 5)
    duplicate[keys.BATCH] = np.concatenate([prediction[keys.BATCH]] + [np.full(2, 9 + c) for c in range(5)])
    group = [0, 9, 10, 11, 12, 13]
    assert np.argmax(acquisition_scores(duplicate, strategy)) in group
    top_k = select_batch(duplicate, 3, strategy, batch_aware=False)
    aware = select_batch(duplicate, 3, strategy, batch_aware=True)
    assert np.isin(top_k, group).sum() == 3
    assert np.isin(aware, group).sum() == 1
    assert aware[0] in group and len(set(aware)) == 3


def test_select_batch_errors_and_edge_cases():
    prediction = synthetic_pool(np.random.default_rng(11), spreads=[1.0, 2.0, 0.5])
    with pytest.raises(ValueError, match="bald_e.*bald_ef.*bald_f.*energy_std.*random"):
        select_batch(prediction, 1, "bald")
    with pytest.raises(ValueError, match="k = 4 is larger than the pool of 3"):
        select_batch(prediction, 4, "bald_ef")
    with pytest.raises(ValueError, match="non-negative integer"):
        select_batch(prediction, -1, "random")
    assert select_batch(prediction, 0, "bald_f").shape == (0,)
    everything = select_batch(prediction, 3, "bald_ef")
    assert sorted(everything.tolist()) == [0, 1, 2] and everything.dtype == np.int64
    broken = dict(prediction)
    del broken[keys.MEMBER_FORCES]
    with pytest.raises(ValueError, match=keys.MEMBER_FORCES):
        select_batch(broken, 1, "bald_f")


@pytest.mark.parametrize("batch_aware", [True, False])
def test_required_structures_come_first_and_the_rest_is_chosen_given_them(batch_aware):
    prediction = synthetic_pool(np.random.default_rng(12), spreads=[1.0, 2.0, 0.5, 1.5, 0.2, 3.0],
                                n_members=12, latent=11)
    free = select_batch(prediction, 3, "bald_ef", batch_aware=batch_aware)
    least = int(np.argmin(acquisition_scores(prediction, "bald_ef")))
    assert least not in free  # so requiring it changes the batch
    chosen = select_batch(prediction, 3, "bald_ef", batch_aware=batch_aware, required=[least])
    assert chosen[0] == least and len(set(chosen.tolist())) == 3
    if not batch_aware:  # the two best of the rest
        assert chosen[1:].tolist() == [i for i in free.tolist() if i != least][:2]
    else:  # the second pick is the largest joint gain given the required one
        from bayesrace.active._acquisition import member_gram

        grams = member_gram(prediction, "energy_forces")
        given = np.eye(grams.shape[1]) + grams[least]
        gains = [np.linalg.slogdet(given + grams[x])[1] if x != least else -np.inf for x in range(len(grams))]
        assert chosen[1] == int(np.argmax(gains))
    with pytest.raises(ValueError, match="required"):
        select_batch(prediction, 2, "bald_ef", required=[0, 0])
    with pytest.raises(ValueError, match="required"):
        select_batch(prediction, 1, "bald_ef", required=[0, 1])
    with pytest.raises(ValueError, match="required"):
        select_batch(prediction, 2, "bald_ef", required=[6])
