"""Acquisition scores and batch selection for active learning (BALD and baselines).

A posterior of M members predicts, for a label vector y (a structure's energy, its
forces, or both), M member means μ_m and a noise covariance Σ_noise. The posterior
predictive is the mixture p(y) = (1/M) Σ_m N(y; μ_m, Σ_noise), and BALD scores a
structure by the mutual information between its label and the weights,

    I[y; θ] = H[p(y)] − E_θ H[p(y | θ)] = H[mixture] − H[N(0, Σ_noise)].

Σ_noise is the *mean* aleatoric covariance of the members (ENERGY_VAR_ALEATORIC,
FORCE_COV_ALEATORIC): ``predict_frames`` does not return the members' own aleatoric
heads, so every member is given the same noise. With per-member noise the second
term would be the mean of the members' noise entropies instead.

Gaussian form. If μ_θ were Gaussian with covariance Σ_epi, y would be Gaussian with
covariance Σ_epi + Σ_noise and

    I_gauss = ½ log det(I + Σ_epi Σ_noise⁻¹).                                    (1)

For the finite mixture, (1) with Σ_epi = (1/M) Σ_m (μ_m − μ̄)(μ_m − μ̄)ᵀ (the members'
covariance, 1/M as in ``aggregate_members``) is an *upper bound* of the exact MI: the
Gaussian has the largest entropy for a given covariance, and the mixture's covariance is
Σ_epi + Σ_noise (moment matching). Lower bound (Kolchinsky & Tracey 2017, "Estimating
mixture entropy with pairwise distances"): for equal weights and a common noise,

    I ≥ −(1/M) Σ_m log[(1/M) Σ_n exp(−D_B(m, n))],  D_B = ⅛ Δ_mnᵀ Σ_noise⁻¹ Δ_mn,   (2)

with Δ_mn = μ_m − μ_n and D_B the Bhattacharyya distance of two Gaussians with equal
covariance; the same expression with the KL divergence D_KL = ½ Δ_mnᵀ Σ_noise⁻¹ Δ_mn is
an *upper* bound (their Theorems 2 and 3). Both lie in [0, log M]; all bounds are 0 for
M = 1. The Monte Carlo estimate samples c ~ U{1..M}, y ~ N(μ_c, Σ_noise) and averages

    log N(y; μ_c, Σ_noise) − log p(y) = −½|ε|² − logsumexp_m(−½|w − w_m|²) + log M,  (3)

(w = whitened y, w_m = whitened μ_m, ε = w − w_c): the same expectation as
−E log p(y) − H[N(0, Σ_noise)] with the noise entropy taken exactly (each term is ≤ log M;
the estimate is unbiased, with a small variance, and can fall slightly below 0 when MI ≈ 0).

Whitened member deviations. Let Σ_noise = L Lᵀ (Cholesky; any square root gives the same
numbers), W = (μ_m − μ̄) L⁻ᵀ the whitened deviations [M, d] and Z = W / sqrt(M). Then
ZᵀZ = L⁻¹ Σ_epi L⁻ᵀ, and by Sylvester's determinant identity (1) is

    I_gauss = ½ log det(I_M + G),  G = Z Zᵀ  [M, M],                             (4)

so everything above depends only on the M × M Gram matrix G (pairwise distances
|w_m − w_n|² = M (G_mm + G_nn − 2 G_mn); the Monte Carlo runs in the ≤ M-dimensional span of
the deviations, since the noise orthogonal to it cancels in (3)). Label vectors with
independent noise concatenate, which adds their Grams: the joint Gaussian MI of a set S of
structures is ½ log det(I_M + Σ_{x∈S} G_x), which ``select_batch`` maximises greedily.

Atoms. The per-structure force score ``bald_force_scores`` sums the per-atom 3 × 3 form (1)
over atoms, i.e. it treats the atoms' forces as independent given the data, although all
atoms share θ: it over-counts information that several atoms carry about the same
weight directions (by subadditivity of log det it is ≥ the joint form). The Gram forms
(``member_gram``, ``structure_mixture_mi``, batch-aware ``select_batch``) treat the atoms
of a structure jointly (their member deviations are concatenated, noise block-diagonal);
for a one-atom structure both agree. For the energy both forms are identical.

Calibration. A calibrated prediction scales epistemic and aleatoric variances by the same
r² (per atom for forces, per structure for energies), so (1) is unchanged, but the member
predictions are not scaled. Member deviations are therefore rescaled by r, read off as the
ratio of the reported epistemic variance to the members' own, before whitening.

Units: energies eV, forces eV/Å; mutual informations in nats.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Sequence, Tuple

import numpy as np
from scipy.special import logsumexp

from .. import keys

TARGETS = ("energy", "forces", "energy_forces")
MIXTURE_METHODS = ("upper", "lower", "kl", "monte_carlo")
PAIRWISE_DISTANCES = ("bhattacharyya", "kl")
# largest number of floats one Monte Carlo chunk or Gram chunk holds (memory, not accuracy)
_CHUNK_ELEMENTS = 1 << 22


# ------------------------------------------------------------------ Gaussian form


def gaussian_mi(epistemic_cov: np.ndarray, noise_cov: np.ndarray) -> np.ndarray:
    """½ log det(I + Σ_epi Σ_noise⁻¹) in nats, batched over leading axes.

    ``epistemic_cov`` and ``noise_cov`` are [..., d, d]; Σ_noise positive definite, Σ_epi
    positive semi-definite. Computed as ½ log det(I + L⁻¹ Σ_epi L⁻ᵀ) with Σ_noise = L Lᵀ.
    """
    epistemic_cov = np.asarray(epistemic_cov, dtype=np.float64)
    noise_cov = np.asarray(noise_cov, dtype=np.float64)
    if epistemic_cov.shape[-2:] != noise_cov.shape[-2:] or epistemic_cov.shape[-1] != epistemic_cov.shape[-2]:
        raise ValueError(
            f"gaussian_mi: expected square covariances of equal size, got {epistemic_cov.shape} and {noise_cov.shape}"
        )
    lower = _cholesky(noise_cov, "noise_cov")
    whitened = _solve_lower(lower, np.swapaxes(_solve_lower(lower, epistemic_cov), -1, -2))
    identity = np.eye(epistemic_cov.shape[-1])
    sign, logdet = np.linalg.slogdet(identity + 0.5 * (whitened + np.swapaxes(whitened, -1, -2)))
    return 0.5 * logdet


def joint_gaussian_mi(grams: np.ndarray) -> float:
    """Joint Gaussian MI of a set of label vectors, ½ log det(I_M + Σ_x G_x), from their Grams [S, M, M]."""
    grams = np.asarray(grams, dtype=np.float64)
    if grams.ndim != 3 or grams.shape[1] != grams.shape[2]:
        raise ValueError(f"joint_gaussian_mi: expected Grams [S, M, M], got {grams.shape}")
    return float(_gram_upper_bound(grams.sum(axis=0)[None])[0])


# ------------------------------------------------------------------ mixture MI, one label vector


def whitened_member_deviations(member_means: np.ndarray, noise_cov: np.ndarray) -> np.ndarray:
    """Z = (μ_m − μ̄) L⁻ᵀ / sqrt(M) [M, d] for member means [M, d] and noise Σ_noise = L Lᵀ [d, d]."""
    member_means, noise_cov = _check_members(member_means, noise_cov)
    lower = _cholesky(noise_cov, "noise_cov")
    deviation = member_means - member_means.mean(axis=0, keepdims=True)
    return _solve_lower(lower, deviation.T).T / np.sqrt(member_means.shape[0])


def mixture_mi_upper_bound(member_means: np.ndarray, noise_cov: np.ndarray) -> float:
    """Moment-matched Gaussian bound (1) with Σ_epi the members' covariance (1/M): ≥ exact MI, nats."""
    return float(_gram_upper_bound(_single_gram(member_means, noise_cov))[0])


def mixture_mi_pairwise(member_means: np.ndarray, noise_cov: np.ndarray, distance: str = "bhattacharyya") -> float:
    """Kolchinsky–Tracey pairwise estimate (2), nats: a lower bound for "bhattacharyya", an upper one for "kl"."""
    return float(_gram_pairwise(_single_gram(member_means, noise_cov), distance)[0])


def mixture_mi_lower_bound(member_means: np.ndarray, noise_cov: np.ndarray) -> float:
    """Kolchinsky–Tracey lower bound (2) with the Bhattacharyya distance, nats."""
    return mixture_mi_pairwise(member_means, noise_cov, "bhattacharyya")


def mixture_mi_monte_carlo(
    member_means: np.ndarray,
    noise_cov: np.ndarray,
    n_samples: int = 4096,
    seed: int = 0,
    return_stderr: bool = False,
):
    """Monte Carlo estimate (3) of the exact mixture MI, nats (with its standard error if asked).

    Runs in the whitened coordinates of the member means (d dims, or the ≤ M-dim span of the
    deviations when d > M).
    """
    member_means, noise_cov = _check_members(member_means, noise_cov)
    n_members, dim = member_means.shape
    if dim <= n_members:
        coordinates = whitened_member_deviations(member_means, noise_cov) * np.sqrt(n_members)
    else:
        coordinates = _gram_coordinates(_single_gram(member_means, noise_cov)[0])
    estimate, stderr = _monte_carlo_from_coordinates(coordinates, n_samples, np.random.default_rng(seed))
    return (estimate, stderr) if return_stderr else estimate


# ------------------------------------------------------------------ per structure, from a prediction


def member_gram(prediction: Mapping[str, np.ndarray], target: str = "energy_forces") -> np.ndarray:
    """Per-structure Grams G_b = Z_b Z_bᵀ [B, M, M] of the whitened member deviations (see module doc).

    ``target`` "energy": Z_b = (E_m − Ē) / (σ_E sqrt(M)) [M, 1]; "forces": the atoms of b
    concatenated, Z_b = [(F_m,i − F̄_i) L_i⁻ᵀ / sqrt(M)]_i [M, 3 N_b], Σ_i = L_i L_iᵀ the
    aleatoric covariance (atoms jointly); "energy_forces": the sum of both (independent noise).
    """
    _check_target(target)
    n_structures = _num_structures(prediction)
    if target == "energy":
        return _energy_gram(prediction)
    forces = _force_gram(prediction, n_structures)
    return forces if target == "forces" else forces + _energy_gram(prediction)


def structure_mixture_mi(
    prediction: Mapping[str, np.ndarray],
    target: str = "energy_forces",
    method: str = "upper",
    n_samples: int = 1024,
    seed: int = 0,
) -> np.ndarray:
    """Mixture MI [B] (nats) of each structure's label vector (atoms jointly), from ``member_gram``.

    ``method``: "upper" (moment-matched Gaussian (1), = joint Gaussian BALD), "lower"
    (Kolchinsky–Tracey with Bhattacharyya), "kl" (Kolchinsky–Tracey with KL, an upper bound),
    "monte_carlo" (estimate (3) with ``n_samples`` per structure, ``seed``).
    """
    if method not in MIXTURE_METHODS:
        raise ValueError(f"structure_mixture_mi: unknown method {method!r}; expected one of {MIXTURE_METHODS}")
    grams = member_gram(prediction, target)
    if method == "upper":
        return _gram_upper_bound(grams)
    if method in ("lower", "kl"):
        return _gram_pairwise(grams, "bhattacharyya" if method == "lower" else "kl")
    rng = np.random.default_rng(seed)
    return np.array([_monte_carlo_from_coordinates(_gram_coordinates(g), n_samples, rng)[0] for g in grams])


# ------------------------------------------------------------------ strategies


def bald_energy_scores(prediction: Mapping[str, np.ndarray]) -> np.ndarray:
    """Gaussian BALD of the total energy [B], nats: ½ log(1 + σ²_E,epi / σ²_E,alea)."""
    epistemic = _field(prediction, keys.ENERGY_VAR_EPISTEMIC, 1)
    aleatoric = _positive(_field(prediction, keys.ENERGY_VAR_ALEATORIC, 1), keys.ENERGY_VAR_ALEATORIC)
    return 0.5 * np.log1p(np.maximum(epistemic, 0.0) / aleatoric)


def bald_force_scores(prediction: Mapping[str, np.ndarray]) -> np.ndarray:
    """Gaussian BALD of the forces [B], nats: Σ_{i∈b} ½ log det(I + Σ_epi,i Σ_alea,i⁻¹), atoms independent.

    The per-atom 3 × 3 terms are summed as if the atoms' forces were independent; this is an
    upper bound of the joint-atom form ``structure_mixture_mi(prediction, "forces")``.
    """
    n_structures = _num_structures(prediction)
    per_atom = gaussian_mi(
        _field(prediction, keys.FORCE_COV_EPISTEMIC, 3), _field(prediction, keys.FORCE_COV_ALEATORIC, 3)
    )
    return np.bincount(_batch(prediction, n_structures), weights=per_atom, minlength=n_structures)


def bald_energy_force_scores(prediction: Mapping[str, np.ndarray]) -> np.ndarray:
    """Gaussian BALD of energy and forces [B], nats: the sum of both (noises independent)."""
    return bald_energy_scores(prediction) + bald_force_scores(prediction)


def energy_std_scores(prediction: Mapping[str, np.ndarray]) -> np.ndarray:
    """Total energy σ per atom [B], eV/atom: sqrt(σ²_E,epi + σ²_E,alea) / N_b."""
    variance = _field(prediction, keys.ENERGY_VAR_EPISTEMIC, 1) + _field(prediction, keys.ENERGY_VAR_ALEATORIC, 1)
    return np.sqrt(np.maximum(variance, 0.0)) / _field(prediction, keys.NUM_ATOMS, 1)


def random_scores(prediction: Mapping[str, np.ndarray], seed: int = 0) -> np.ndarray:
    """Uniform(0, 1) scores [B] from ``numpy.random.default_rng(seed)``: top-k = a random subset."""
    return np.random.default_rng(seed).uniform(size=_num_structures(prediction))


# name -> (prediction, seed) -> scores [B], larger = acquire first; only "random" uses the seed
STRATEGIES: Dict[str, Callable[[Mapping[str, np.ndarray], int], np.ndarray]] = {
    "bald_e": lambda prediction, seed: bald_energy_scores(prediction),
    "bald_f": lambda prediction, seed: bald_force_scores(prediction),
    "bald_ef": lambda prediction, seed: bald_energy_force_scores(prediction),
    "energy_std": lambda prediction, seed: energy_std_scores(prediction),
    "random": random_scores,
}
# BALD strategy -> the label vector its joint (batch-aware) form uses
BALD_TARGETS = {"bald_e": "energy", "bald_f": "forces", "bald_ef": "energy_forces"}


def acquisition_scores(prediction: Mapping[str, np.ndarray], strategy: str, seed: int = 0) -> np.ndarray:
    """Per-structure scores [B] of ``strategy`` (a key of ``STRATEGIES``)."""
    return STRATEGIES[_check_strategy(strategy)](prediction, seed)


def select_batch(
    prediction: Mapping[str, np.ndarray],
    k: int,
    strategy: str,
    seed: int = 0,
    batch_aware: bool = True,
    required: Sequence[int] = (),
) -> np.ndarray:
    """Indices [k] (int64, in order of selection) of the structures to label next; the
    ``required`` ones first (e.g. the frame an on-the-fly run halted at), the rest chosen given them.

    BALD strategies with ``batch_aware``: greedy maximisation of the joint Gaussian MI of the
    selected set S, ½ log det(I_M + Σ_{x∈S} G_x) (``member_gram``, atoms jointly): each step
    adds the structure with the largest gain ½ [log det(A + G_x) − log det A], A = I_M +
    Σ_{x∈S} G_x, so a near-duplicate of a selected structure gains almost nothing
    (BatchBALD-like). The gain is submodular, so greedy is within 1 − 1/e of the best set.
    Otherwise (or for "energy_std" and "random", where ``batch_aware`` is ignored): the k
    largest per-structure scores, ties to the lower index.
    """
    _check_strategy(strategy)
    n_structures = _num_structures(prediction)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
        raise ValueError(f"select_batch: k must be a non-negative integer, got {k!r}")
    if k > n_structures:
        raise ValueError(f"select_batch: k = {k} is larger than the pool of {n_structures} structures")
    required = [int(r) for r in required]
    if len(set(required)) != len(required) or len(required) > k or any(not 0 <= r < n_structures for r in required):
        raise ValueError(f"select_batch: required {required} must be at most k = {k} distinct indices of the pool")
    if batch_aware and strategy in BALD_TARGETS:
        return _greedy_joint_selection(member_gram(prediction, BALD_TARGETS[strategy]), int(k), required)
    scores = acquisition_scores(prediction, strategy, seed)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"select_batch: strategy {strategy!r} gave non-finite scores")
    rest = [int(i) for i in np.argsort(-scores, kind="stable") if int(i) not in required]
    return np.array(required + rest[: int(k) - len(required)], dtype=np.int64)


# ------------------------------------------------------------------ internals


def _greedy_joint_selection(grams: np.ndarray, k: int, required: Sequence[int] = ()) -> np.ndarray:
    n_members = grams.shape[1]
    accumulated = np.eye(n_members) + grams[list(required)].sum(axis=0)
    available = np.ones(grams.shape[0], dtype=bool)
    available[list(required)] = False
    selected = list(required)
    for _ in range(k - len(selected)):
        candidates = np.flatnonzero(available)
        _, logdet = np.linalg.slogdet(accumulated[None] + grams[candidates])
        best = int(np.argmax(logdet))  # the gain ½ (logdet − log det A) has the same argmax
        pick = int(candidates[best])
        selected.append(pick)
        available[pick] = False
        accumulated = accumulated + grams[pick]
    return np.array(selected, dtype=np.int64)


def _gram_upper_bound(grams: np.ndarray) -> np.ndarray:
    _, logdet = np.linalg.slogdet(np.eye(grams.shape[-1]) + grams)
    return 0.5 * logdet


def _squared_distances(grams: np.ndarray) -> np.ndarray:
    """|w_m − w_n|² = M (G_mm + G_nn − 2 G_mn) between whitened member means, [B, M, M]."""
    diagonal = np.diagonal(grams, axis1=-2, axis2=-1)
    distances = grams.shape[-1] * (diagonal[..., :, None] + diagonal[..., None, :] - 2.0 * grams)
    return np.maximum(distances, 0.0)


def _gram_pairwise(grams: np.ndarray, distance: str) -> np.ndarray:
    if distance not in PAIRWISE_DISTANCES:
        raise ValueError(f"unknown pairwise distance {distance!r}; expected one of {PAIRWISE_DISTANCES}")
    factor = 0.125 if distance == "bhattacharyya" else 0.5
    n_members = grams.shape[-1]
    log_mean = logsumexp(-factor * _squared_distances(grams), axis=-1) - np.log(n_members)
    return np.maximum(-log_mean.mean(axis=-1), 0.0)


def _gram_coordinates(gram: np.ndarray) -> np.ndarray:
    """Whitened member means V [M, r] with V Vᵀ = M G (pairwise geometry of the members)."""
    n_members = gram.shape[0]
    eigenvalues, eigenvectors = np.linalg.eigh(n_members * 0.5 * (gram + gram.T))
    keep = eigenvalues > 1e-12 * max(float(eigenvalues.max()), 1e-300)
    if not np.any(keep):
        return np.zeros((n_members, 1))
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


def _monte_carlo_from_coordinates(
    coordinates: np.ndarray, n_samples: int, rng: np.random.Generator
) -> Tuple[float, float]:
    """Estimate (3) and its standard error for unit-noise components centred at ``coordinates`` [M, r]."""
    if n_samples < 2:
        raise ValueError(f"n_samples must be at least 2, got {n_samples}")
    n_members, dim = coordinates.shape
    terms = np.empty(n_samples)
    chunk = max(1, _CHUNK_ELEMENTS // (n_members * dim))
    for start in range(0, n_samples, chunk):
        size = min(chunk, n_samples - start)
        component = rng.integers(n_members, size=size)
        noise = rng.standard_normal((size, dim))
        samples = coordinates[component] + noise
        squared = ((samples[:, None, :] - coordinates[None, :, :]) ** 2).sum(axis=-1)
        terms[start : start + size] = (
            -0.5 * (noise**2).sum(axis=-1) - logsumexp(-0.5 * squared, axis=-1) + np.log(n_members)
        )
    return float(terms.mean()), float(terms.std(ddof=1) / np.sqrt(n_samples))


def _single_gram(member_means: np.ndarray, noise_cov: np.ndarray) -> np.ndarray:
    deviations = whitened_member_deviations(member_means, noise_cov)
    return (deviations @ deviations.T)[None]


def _energy_gram(prediction: Mapping[str, np.ndarray]) -> np.ndarray:
    member_energy = _field(prediction, keys.MEMBER_ENERGY, 2)
    n_members, n_structures = member_energy.shape
    n_structures_expected = _num_structures(prediction)
    if n_structures != n_structures_expected:
        raise ValueError(f"{keys.MEMBER_ENERGY}: expected [M, {n_structures_expected}], got {member_energy.shape}")
    deviation = member_energy - member_energy.mean(axis=0, keepdims=True)
    scale_sq = _calibration_ratio_sq(_field(prediction, keys.ENERGY_VAR_EPISTEMIC, 1), (deviation**2).mean(axis=0))
    aleatoric = _positive(_field(prediction, keys.ENERGY_VAR_ALEATORIC, 1), keys.ENERGY_VAR_ALEATORIC)
    whitened = deviation * np.sqrt(scale_sq / (aleatoric * n_members))  # [M, B]
    return np.einsum("mb,nb->bmn", whitened, whitened)


def _force_gram(prediction: Mapping[str, np.ndarray], n_structures: int) -> np.ndarray:
    member_forces = _field(prediction, keys.MEMBER_FORCES, 3)
    n_members, n_atoms = member_forces.shape[:2]
    if member_forces.shape[2] != 3:
        raise ValueError(f"{keys.MEMBER_FORCES}: expected [M, N, 3], got {member_forces.shape}")
    aleatoric = _field(prediction, keys.FORCE_COV_ALEATORIC, 3)
    epistemic = _field(prediction, keys.FORCE_COV_EPISTEMIC, 3)
    batch = _batch(prediction, n_structures)
    if aleatoric.shape != (n_atoms, 3, 3) or epistemic.shape != (n_atoms, 3, 3) or batch.shape != (n_atoms,):
        raise ValueError(
            f"forces: {keys.MEMBER_FORCES} {member_forces.shape}, {keys.FORCE_COV_ALEATORIC} {aleatoric.shape}, "
            f"{keys.FORCE_COV_EPISTEMIC} {epistemic.shape} and {keys.BATCH} {batch.shape} disagree on N"
        )
    grams = np.zeros((n_structures, n_members, n_members))
    chunk = max(1, _CHUNK_ELEMENTS // (n_members * n_members))
    for start in range(0, n_atoms, chunk):
        atoms = slice(start, min(start + chunk, n_atoms))
        deviation = member_forces[:, atoms] - member_forces[:, atoms].mean(axis=0, keepdims=True)  # [M, n, 3]
        member_trace = np.einsum("mni,mni->n", deviation, deviation) / n_members
        reported_trace = np.trace(epistemic[atoms], axis1=-2, axis2=-1)
        scale = np.sqrt(_calibration_ratio_sq(reported_trace, member_trace))
        lower = _cholesky(aleatoric[atoms], keys.FORCE_COV_ALEATORIC)
        whitened = _solve_lower(lower, np.transpose(deviation, (1, 2, 0)))  # [n, 3, M]
        whitened *= (scale / np.sqrt(n_members))[:, None, None]
        np.add.at(grams, batch[atoms], np.einsum("nim,nik->nmk", whitened, whitened))
    return grams


def _calibration_ratio_sq(reported: np.ndarray, members: np.ndarray) -> np.ndarray:
    """r² = reported epistemic variance / members' own (1 where the members agree to round-off)."""
    tiny = 1e-300
    ratio = np.ones_like(members)
    spread = members > 1e-12 * np.maximum(np.abs(reported), tiny)
    ratio[spread] = np.maximum(reported[spread], 0.0) / members[spread]
    return ratio


def _cholesky(matrix: np.ndarray, name: str) -> np.ndarray:
    try:
        return np.linalg.cholesky(matrix)
    except np.linalg.LinAlgError:
        raise ValueError(f"{name}: the noise covariance must be positive definite") from None


def _solve_lower(lower: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    # batched triangular solve; numpy's general solve is exact here and small (3×3 or d×d)
    return np.linalg.solve(lower, rhs)


def _check_members(member_means, noise_cov) -> Tuple[np.ndarray, np.ndarray]:
    member_means = np.asarray(member_means, dtype=np.float64)
    noise_cov = np.asarray(noise_cov, dtype=np.float64)
    if member_means.ndim == 1:
        member_means = member_means[:, None]
    if noise_cov.ndim == 0:
        noise_cov = noise_cov.reshape(1, 1)
    if member_means.ndim != 2 or member_means.shape[0] < 1:
        raise ValueError(f"member_means: expected [M, d] with M >= 1, got {member_means.shape}")
    dim = member_means.shape[1]
    if noise_cov.shape != (dim, dim):
        raise ValueError(
            f"noise_cov: expected [{dim}, {dim}] for member_means {member_means.shape}, got {noise_cov.shape}"
        )
    return member_means, noise_cov


def _check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown acquisition strategy {strategy!r}; expected one of {sorted(STRATEGIES)}")
    return strategy


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; expected one of {TARGETS}")


def _field(prediction: Mapping[str, np.ndarray], name: str, ndim: int) -> np.ndarray:
    if name not in prediction:
        raise ValueError(f"prediction has no field {name!r} (run predict_frames on the pool)")
    value = np.asarray(prediction[name], dtype=np.float64)
    if value.ndim != ndim:
        raise ValueError(f"prediction field {name!r}: expected {ndim} axes, got shape {value.shape}")
    return value


def _positive(value: np.ndarray, name: str) -> np.ndarray:
    if not np.all(value > 0):
        raise ValueError(f"prediction field {name!r}: the aleatoric (noise) variance must be > 0")
    return value


def _num_structures(prediction: Mapping[str, np.ndarray]) -> int:
    return int(_field(prediction, keys.NUM_ATOMS, 1).shape[0])


def _batch(prediction: Mapping[str, np.ndarray], n_structures: int) -> np.ndarray:
    if keys.BATCH not in prediction:
        raise ValueError(f"prediction has no field {keys.BATCH!r} (run predict_frames on the pool)")
    batch = np.asarray(prediction[keys.BATCH]).astype(np.int64)
    if batch.ndim != 1 or (batch.size and (batch.min() < 0 or batch.max() >= n_structures)):
        raise ValueError(f"prediction field {keys.BATCH!r}: expected [N] indices into {n_structures} structures")
    return batch
