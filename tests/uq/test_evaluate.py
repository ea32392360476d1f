import json
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import write

from bayesrace import keys
from bayesrace.calculator import BayesRaceCalculator
from bayesrace.data import read_frames
from bayesrace.uq import (
    METRIC_UNITS,
    OOD_SCORES,
    PLOT_FILES,
    THRESHOLD_SCORES,
    evaluate_sets,
    format_summary,
    format_table,
    predict_frames,
    reference_key,
    set_metrics,
)
from bayesrace.model import build_model, model_config_from
from bayesrace.bayes import Posterior, save_posterior

torch.set_num_threads(1)


def random_molecule(rng, symbols, box, min_distance):
    positions = []
    while len(positions) < len(symbols):
        candidate = rng.uniform(0.0, box, size=3)
        if all(np.linalg.norm(candidate - p) >= min_distance for p in positions):
            positions.append(candidate)
    return Atoms(symbols, positions=positions)


def write_set(path, seed, n_frames, box, min_distance, labelled=True):
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        n_carbon = int(rng.integers(2, 4))
        n_hydrogen = int(rng.integers(2, 5))
        atoms = random_molecule(rng, "C" * n_carbon + "H" * n_hydrogen, box, min_distance)
        if labelled:
            atoms.calc = EMT()
            atoms.get_forces()  # stored by write as energy= and forces columns
        frames.append(atoms)
    write(path, frames, format="extxyz")
    return path


@pytest.fixture(scope="module")
def posterior():
    config = model_config_from("tiny", avg_num_neighbors=8.0)
    return Posterior([build_model(config, ["H", "C", "N", "O"], seed=k) for k in range(2)]).eval()


@pytest.fixture(scope="module")
def data_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {
        "test": write_set(root / "test.xyz", seed=0, n_frames=7, box=3.5, min_distance=1.1),
        "compressed": write_set(root / "compressed.extxyz", seed=1, n_frames=5, box=2.2, min_distance=0.8),
    }


def test_predict_frames_shapes_and_batch_independence(posterior, data_sets):
    frames = read_frames(data_sets["test"])
    whole = predict_frames(posterior, frames, batch_size=3)
    one_by_one = predict_frames(posterior, frames, batch_size=1)
    n_structures = len(frames)
    n_atoms = sum(f.num_atoms for f in frames)
    n_members = len(posterior.members)
    assert whole[keys.ENERGY].shape == (n_structures,)
    assert whole[keys.MEMBER_ENERGY].shape == (n_members, n_structures)
    assert whole[keys.FORCES].shape == (n_atoms, 3)
    assert whole[keys.MEMBER_FORCES].shape == (n_members, n_atoms, 3)
    assert whole[keys.FORCE_COV_EPISTEMIC].shape == (n_atoms, 3, 3)
    for field in (keys.ATOMIC_FORCE_STD, keys.ATOMIC_FORCE_STD_EPISTEMIC, keys.ATOMIC_ENERGY_STD):
        assert whole[field].shape == (n_atoms,)
    np.testing.assert_array_equal(whole[keys.NUM_ATOMS], [f.num_atoms for f in frames])
    np.testing.assert_array_equal(whole[keys.BATCH], np.repeat(np.arange(n_structures), whole[keys.NUM_ATOMS]))
    np.testing.assert_allclose(whole[reference_key(keys.ENERGY)], [f.energy for f in frames])
    np.testing.assert_allclose(whole[reference_key(keys.FORCES)], np.concatenate([f.forces for f in frames]))
    assert set(whole) == set(one_by_one)
    for field, value in whole.items():
        np.testing.assert_allclose(value, one_by_one[field], atol=1e-12, err_msg=field)


def test_predict_frames_restores_training_mode(posterior, data_sets):
    frames = read_frames(data_sets["test"], index="0:2")
    posterior.train()
    try:
        predict_frames(posterior, frames)
        assert posterior.training
    finally:
        posterior.eval()
    with pytest.raises(ValueError, match="dtype"):
        predict_frames(posterior, frames, dtype=torch.float32)


def direct_metrics(posterior, path):
    """The reported numbers recomputed frame by frame through the ASE calculator."""
    frames = read_frames(path)
    calculator = BayesRaceCalculator(posterior)
    energy_error, energy_sigma, n_atoms = [], [], []
    force_error, force_sigma, force_sigma_epistemic = [], [], []
    for frame in frames:
        atoms = Atoms(numbers=frame.numbers, positions=frame.positions)
        calculator.calculate(atoms, ["energy", "forces"])
        results = calculator.results
        energy_error.append(results["energy"] - frame.energy)
        energy_sigma.append(results["energy_std"])
        n_atoms.append(frame.num_atoms)
        force_error.append(results["forces"] - frame.forces)
        force_sigma.append(results["forces_std"])
        force_sigma_epistemic.append(results["forces_std_epistemic"])
    energy_error, energy_sigma, n_atoms = map(np.array, (energy_error, energy_sigma, n_atoms))
    force_error = np.concatenate(force_error)
    force_sigma = np.concatenate(force_sigma)
    from scipy.stats import spearmanr

    z = force_error / force_sigma[:, None]
    z_energy = energy_error / energy_sigma
    return {
        "n_structures": len(frames),
        "n_atoms": int(n_atoms.sum()),
        "energy_mae_eV": np.abs(energy_error).mean(),
        "energy_rmse_meV_per_atom": 1000 * np.sqrt(np.mean((energy_error / n_atoms) ** 2)),
        "energy_mean_error_meV_per_atom": 1000 * np.mean(energy_error / n_atoms),
        "forces_mae_eV_per_A": np.abs(force_error).mean(),
        "forces_rmse_eV_per_A": np.sqrt(np.mean(force_error**2)),
        "energy_sigma_mean_meV_per_atom": 1000 * np.mean(energy_sigma / n_atoms),
        "forces_sigma_median_eV_per_A": np.median(force_sigma),
        "forces_sigma_epistemic_mean_eV_per_A": np.mean(np.concatenate(force_sigma_epistemic)),
        "spearman_energy": spearmanr(np.abs(energy_error), energy_sigma).statistic,
        "spearman_forces": spearmanr(np.linalg.norm(force_error, axis=1), force_sigma).statistic,
        "forces_nll": np.mean(0.5 * np.log(2 * np.pi * force_sigma[:, None] ** 2) + 0.5 * z**2),
        "forces_coverage_95": np.mean(np.abs(z) <= 1.959963984540054),
        "forces_miscalibration_area": direct_miscalibration_area(z),
        "energy_miscalibration_area": direct_miscalibration_area(z_energy),
        "forces_ence": direct_ence(force_error.ravel(), np.repeat(force_sigma, 3)),
        "energy_ence": direct_ence(energy_error, energy_sigma),
        "forces_sharpness_eV_per_A": np.sqrt(np.mean(force_sigma**2)),
        "energy_sharpness_meV_per_atom": 1000 * np.sqrt(np.mean((energy_sigma / n_atoms) ** 2)),
    }


def direct_miscalibration_area(z):
    """Mean over p = 0.01..0.99 of |fraction of |z| inside the central p interval − p|."""
    from scipy.stats import norm

    levels = np.arange(1, 100) / 100
    return np.mean([abs(np.mean(np.abs(z) <= norm.ppf(0.5 + p / 2)) - p) for p in levels])


def direct_ence(error, sigma):
    """ENCE with min(10, n) equal-count bins of the elements sorted by σ."""
    order = np.argsort(sigma, kind="stable")
    terms = []
    for chosen in np.array_split(order, min(10, error.size)):
        rmv = np.sqrt(np.mean(sigma[chosen] ** 2))
        terms.append(abs(rmv - np.sqrt(np.mean(error[chosen] ** 2))) / rmv)
    return np.mean(terms)


def test_evaluate_sets_report_and_numbers(posterior, data_sets, tmp_path):
    unlabelled = write_set(tmp_path / "trajectory.xyz", seed=3, n_frames=3, box=3.0, min_distance=1.0, labelled=False)
    sets = {**data_sets, "unlabelled": unlabelled}
    report_dir = tmp_path / "report"
    evaluation = evaluate_sets(posterior, sets, report_dir=report_dir, progress=False, batch_size=4)
    results = evaluation["sets"]

    assert list(results) == ["test", "compressed", "unlabelled"]
    assert evaluation["recalibrated"] is None and evaluation["calibration"] is None
    for name in data_sets:
        assert set(results[name]) == set(METRIC_UNITS)
        expected = direct_metrics(posterior, data_sets[name])
        for metric, value in expected.items():
            assert results[name][metric] == pytest.approx(value, rel=1e-8, abs=1e-12), (name, metric)
        for level in (68, 95, 99):
            assert 0.0 <= results[name][f"forces_coverage_{level}"] <= 1.0
    # an unlabelled set still gets its σ's, and no error metrics
    assert "energy_mae_eV" not in results["unlabelled"]
    assert "forces_miscalibration_area" not in results["unlabelled"]
    assert results["unlabelled"]["forces_sigma_mean_eV_per_A"] > 0
    assert results["unlabelled"]["forces_sharpness_eV_per_A"] > 0
    # every later set is scored against the first, unlabelled ones too
    assert set(evaluation["ood"]["auroc"]) == {"compressed", "unlabelled"}
    assert evaluation["ood"]["in_distribution"] == "test"

    stored = json.loads((report_dir / "metrics.json").read_text())
    assert set(stored) == {"units", "sets", "recalibrated", "calibration", "posterior_calibration", "ood"}
    assert stored["units"]["forces_sharpness_eV_per_A"] == "eV/Å"
    assert set(stored["sets"]) == set(results)
    for name, metrics in results.items():
        assert set(stored["sets"][name]) == set(metrics)
        for metric, value in metrics.items():
            if isinstance(value, float) and math.isnan(value):
                assert stored["sets"][name][metric] is None
            else:
                assert stored["sets"][name][metric] == pytest.approx(value, rel=1e-12)
    for name, values in evaluation["ood"]["auroc"].items():
        assert stored["ood"]["auroc"][name] == pytest.approx(values, rel=1e-12)

    for picture in PLOT_FILES:
        content = (report_dir / picture).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 5000, picture
    saved = np.load(report_dir / "predictions_test.npz")
    np.testing.assert_array_equal(saved[keys.NUM_ATOMS], [f.num_atoms for f in read_frames(data_sets["test"])])

    report = (report_dir / "report.md").read_text()
    assert "## uncertainty: in-distribution vs out-of-distribution" in report
    assert "### out-of-distribution detection" in report
    for name in sets:
        assert f"### {name}" in report and f"| {name} |" in report
    for picture in PLOT_FILES:
        assert f"`{picture}`" in report

    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(sets)
    assert "F RMSE [eV/Å]" in lines[0] and "E MAE [meV/at]" in lines[0]
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert f"{results['test']['forces_rmse_eV_per_A']:.4g}" in lines[2]
    summary = format_summary(evaluation)
    assert summary.startswith(table) and "AUROC" in summary and "recalibration" not in summary


def direct_ood_scores(prediction):
    """Per-structure OOD scores by an explicit loop over structures."""
    energy, largest, mean, energy_epistemic, largest_epistemic, largest_relative = [], [], [], [], [], []
    start = 0
    for b, count in enumerate(prediction[keys.NUM_ATOMS]):
        sigma = prediction[keys.ATOMIC_FORCE_STD][start : start + count]
        variance = prediction[keys.ENERGY_VAR_EPISTEMIC][b] + prediction[keys.ENERGY_VAR_ALEATORIC][b]
        energy.append(1000 * math.sqrt(variance) / count)
        largest.append(sigma.max())
        mean.append(sigma.mean())
        energy_epistemic.append(1000 * math.sqrt(prediction[keys.ENERGY_VAR_EPISTEMIC][b]) / count)
        largest_epistemic.append(prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC][start : start + count].max())
        relative = [prediction[keys.ATOMIC_FORCE_STD_EPISTEMIC][i] / (math.sqrt(sum(f * f for f in prediction[keys.FORCES][i])) + 1.0)
                    for i in range(start, start + count)]
        largest_relative.append(max(relative))
        start += count
    distances = {}
    if keys.ATOMIC_FEATURE_DISTANCE in prediction:
        per_structure = np.split(prediction[keys.ATOMIC_FEATURE_DISTANCE], np.cumsum(prediction[keys.NUM_ATOMS])[:-1])
        distances = {"max_feature_distance": np.array([d.max() for d in per_structure]),
                     "mean_feature_distance": np.array([d.mean() for d in per_structure])}
    return {
        **distances,
        "energy_sigma_meV_per_atom": np.array(energy),
        "max_atomic_force_sigma_eV_per_A": np.array(largest),
        "mean_atomic_force_sigma_eV_per_A": np.array(mean),
        "energy_sigma_epistemic_meV_per_atom": np.array(energy_epistemic),
        "max_atomic_force_sigma_epistemic_eV_per_A": np.array(largest_epistemic),
        "max_relative_force_sigma_epistemic": np.array(largest_relative),
    }


@pytest.mark.parametrize("with_density", [False, True])
def test_ood_auroc_equals_sklearn_on_the_predictions(posterior, data_sets, with_density):
    import copy

    from sklearn.metrics import roc_auc_score

    from bayesrace.bayes import fit_feature_density
    from bayesrace.data import TypeMap, frames_to_graphs

    if with_density:  # the feature distances join the scores
        posterior = copy.deepcopy(posterior)
        graphs = frames_to_graphs(read_frames(data_sets["test"]), TypeMap(posterior.type_names), posterior.cutoff)
        posterior.feature_density = fit_feature_density(list(posterior.members), graphs)
    evaluation = evaluate_sets(posterior, data_sets, progress=False)
    assert set(evaluation["ood"]["auroc"]) == {"compressed"}
    distance_scores = {"max_feature_distance", "mean_feature_distance"}
    assert set(evaluation["ood"]["scores"]) == set(OOD_SCORES) - (set() if with_density else distance_scores)
    scores = {name: direct_ood_scores(predict_frames(posterior, read_frames(path))) for name, path in data_sets.items()}
    for score in evaluation["ood"]["scores"]:
        inside, outside = scores["test"][score], scores["compressed"][score]
        expected = roc_auc_score(np.r_[np.zeros(inside.size), np.ones(outside.size)], np.r_[inside, outside])
        assert evaluation["ood"]["auroc"]["compressed"][score] == pytest.approx(expected, abs=1e-12), score


# -- recalibration on a deliberately mis-scaled posterior ---------------------------------

TRUE_SIGMA_FACTOR = 4.0  # the labels scatter 4 times wider than the posterior's σ's say


def mis_scaled_frames(posterior, seed, n_frames):
    """Random molecules labelled with the posterior's own mean plus Gaussian noise of
    TRUE_SIGMA_FACTOR × its predicted σ: its σ's are too small by exactly that factor."""
    from bayesrace.data import Frame

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        symbols = "C" * int(rng.integers(2, 4)) + "H" * int(rng.integers(2, 5))
        atoms = random_molecule(rng, symbols, box=3.5, min_distance=1.1)
        frames.append(Frame(numbers=atoms.numbers.astype(np.int64), positions=atoms.positions.copy(),
                            cell=np.zeros((3, 3)), pbc=np.zeros(3, dtype=bool), source=f"random {seed}"))
    prediction = predict_frames(posterior, frames)
    sigma_energy = np.sqrt(prediction[keys.ENERGY_VAR_EPISTEMIC] + prediction[keys.ENERGY_VAR_ALEATORIC])
    sigma_forces = prediction[keys.ATOMIC_FORCE_STD]
    energies = prediction[keys.ENERGY] + TRUE_SIGMA_FACTOR * sigma_energy * rng.standard_normal(len(frames))
    noise = rng.standard_normal((len(sigma_forces), 3))
    forces = prediction[keys.FORCES] + TRUE_SIGMA_FACTOR * sigma_forces[:, None] * noise
    start = 0
    for b, frame in enumerate(frames):
        frame.energy = float(energies[b])
        frame.forces = forces[start : start + frame.num_atoms]
        start += frame.num_atoms
    return frames


def write_frames(path, frames):
    from ase.calculators.singlepoint import SinglePointCalculator

    images = []
    for frame in frames:
        atoms = Atoms(numbers=frame.numbers, positions=frame.positions)
        atoms.calc = SinglePointCalculator(atoms, energy=frame.energy, forces=frame.forces)
        images.append(atoms)
    write(path, images, format="extxyz")
    return path


@pytest.fixture(scope="module")
def mis_scaled_sets(posterior):
    return {
        "held_out": mis_scaled_frames(posterior, seed=11, n_frames=12),
        "valid": mis_scaled_frames(posterior, seed=10, n_frames=12),
    }


@pytest.mark.parametrize("method", ["isotonic", "scalar"])
def test_recalibration_fixes_a_mis_scaled_posterior(posterior, mis_scaled_sets, method, tmp_path):
    from bayesrace.bayes import calibrate_prediction

    own = {keys.META_FORCE_STD_SCALE: 2.0}  # ignored while predicting, restored afterwards
    posterior.calibration = own
    try:
        evaluation = evaluate_sets(posterior, mis_scaled_sets, report_dir=tmp_path, progress=False,
                                   calibrate_on="valid", calibration_method=method)
        assert posterior.calibration == own
        assert evaluation["posterior_calibration"] == own
    finally:
        posterior.calibration = {}
    calibration = evaluation["calibration"]
    assert calibration["fitted_on"] == "valid" and calibration["method"] == method
    before, after = evaluation["sets"], evaluation["recalibrated"]
    for name in mis_scaled_sets:
        # the predictions are the uncalibrated ones: σ too small by the factor, so an
        # overconfident curve far below the diagonal
        assert before[name]["forces_miscalibration_area"] > 0.25, name
        assert after[name]["forces_miscalibration_area"] < 0.5 * before[name]["forces_miscalibration_area"], name
        assert after[name]["forces_nll"] < before[name]["forces_nll"], name
        assert after[name]["forces_sharpness_eV_per_A"] > 2 * before[name]["forces_sharpness_eV_per_A"], name
        # recalibration changes σ's only
        assert after[name]["forces_rmse_eV_per_A"] == before[name]["forces_rmse_eV_per_A"]
    assert after["valid"]["energy_miscalibration_area"] < before["valid"]["energy_miscalibration_area"]
    if method == "scalar":
        assert calibration["parameters"][keys.META_FORCE_STD_SCALE] == pytest.approx(TRUE_SIGMA_FACTOR, rel=0.2)

    # the recalibrated numbers are those of the posterior carrying the fitted calibration
    posterior.calibration = calibration["parameters"]
    try:
        prediction = predict_frames(posterior, mis_scaled_sets["held_out"])
    finally:
        posterior.calibration = {}
    direct = set_metrics(prediction)
    for metric in ("forces_nll", "forces_miscalibration_area", "forces_ence", "energy_nll", "forces_coverage_95"):
        assert evaluation["recalibrated"]["held_out"][metric] == pytest.approx(direct[metric], rel=1e-9), metric
    saved = dict(np.load(tmp_path / "predictions_held_out.npz"))
    numpy_path = calibrate_prediction(saved, calibration["parameters"])
    np.testing.assert_allclose(numpy_path[keys.ATOMIC_FORCE_STD], prediction[keys.ATOMIC_FORCE_STD], rtol=1e-10)

    # the calibration set is flagged, left out of the OOD pairs, and both AUROC versions exist
    assert set(evaluation["ood"]["auroc"]) == set() and evaluation["ood"]["auroc_recalibrated"] == {}
    report = (tmp_path / "report.md").read_text()
    assert "### valid (calibration set, in-sample)" in report and "### held_out" in report
    assert f"Recalibration: {method}" in report
    for picture in PLOT_FILES:
        assert (tmp_path / picture).stat().st_size > 5000, picture
    stored = json.loads((tmp_path / "metrics.json").read_text())
    assert stored["calibration"]["fitted_on"] == "valid"
    assert stored["recalibrated"]["held_out"]["forces_nll"] == pytest.approx(after["held_out"]["forces_nll"])
    summary = format_summary(evaluation)
    assert "valid * before" in summary and "held_out after" in summary


def test_flagged_fractions_known_answer():
    from bayesrace.uq import flagged_fractions

    scores = {"id": {name: np.linspace(0.0, 1.0, 101) for name in THRESHOLD_SCORES},
              "ood": {name: np.array([0.5, 1.6, 2.0]) for name in THRESHOLD_SCORES}}
    scores["id"]["max_atomic_force_sigma_epistemic_eV_per_A"] = np.zeros(101)  # one member: no epistemic part
    result = flagged_fractions(scores, "id", quantile=0.5, factor=2.0)  # τ = 2 × 0.5 = 1
    assert set(result["thresholds"]) == set(THRESHOLD_SCORES) - {"max_atomic_force_sigma_epistemic_eV_per_A"}
    assert all(tau == pytest.approx(1.0) for tau in result["thresholds"].values())
    assert result["fraction"]["ood"]["max_atomic_force_sigma_eV_per_A"] == pytest.approx(2 / 3)
    assert result["fraction"]["id"]["energy_sigma_epistemic_meV_per_atom"] == 0.0


def test_recalibrated_auroc_and_bad_calibration_set(posterior, mis_scaled_sets, data_sets):
    from sklearn.metrics import roc_auc_score
    from bayesrace.bayes import calibrate_prediction

    sets = {"valid": mis_scaled_sets["valid"], "compressed": data_sets["compressed"]}
    evaluation = evaluate_sets(posterior, sets, progress=False, calibrate_on="valid")
    parameters = evaluation["calibration"]["parameters"]
    scores = {}
    for name, source in sets.items():
        frames = read_frames(source) if not isinstance(source, list) else source
        scores[name] = direct_ood_scores(calibrate_prediction(predict_frames(posterior, frames), parameters))
    for score in evaluation["ood"]["scores"]:
        inside, outside = scores["valid"][score], scores["compressed"][score]
        expected = roc_auc_score(np.r_[np.zeros(inside.size), np.ones(outside.size)], np.r_[inside, outside])
        assert evaluation["ood"]["auroc_recalibrated"]["compressed"][score] == pytest.approx(expected, abs=1e-12)
    # the thresholds bayesrace calibrate would store, from the calibration set, and who is over them
    flagged = evaluation["ood"]["flagged"]
    for score, tau in flagged["thresholds"].items():
        assert tau == pytest.approx(1.5 * np.quantile(scores["valid"][score], 0.99), rel=1e-12)
        for name in sets:
            assert flagged["fraction"][name][score] == pytest.approx(np.mean(scores[name][score] > tau))
    # two members: every score has one (the feature distance needs a density, which this posterior lacks)
    assert set(flagged["thresholds"]) == set(THRESHOLD_SCORES) - {"max_feature_distance"}

    with pytest.raises(ValueError, match="calibrate_on='nope'"):
        evaluate_sets(posterior, sets, progress=False, calibrate_on="nope")
    unlabelled = [type(f)(numbers=f.numbers, positions=f.positions, cell=f.cell, pbc=f.pbc)
                  for f in mis_scaled_sets["valid"]]
    with pytest.raises(ValueError, match="no reference energy or forces"):
        evaluate_sets(posterior, {"a": unlabelled}, progress=False, calibrate_on="a")


def test_cli_evaluate_with_recalibration(posterior, mis_scaled_sets, tmp_path, capsys):
    from bayesrace.cli import main

    posterior_path = tmp_path / "posterior.pt"
    save_posterior(posterior_path, list(posterior.members), kind="ensemble")
    valid = write_frames(tmp_path / "valid.xyz", mis_scaled_sets["valid"])
    held_out = write_frames(tmp_path / "held_out.xyz", mis_scaled_sets["held_out"])
    report = tmp_path / "report"
    code = main(["evaluate", str(posterior_path), f"id={held_out}", str(valid), "--calibrate-on", "valid",
                 "--calibration-method", "scalar", "--report", str(report), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "recalibration: scalar, fitted on `valid`" in out and "id after" in out
    stored = json.loads((report / "metrics.json").read_text())
    assert stored["calibration"]["method"] == "scalar"
    assert list(stored["recalibrated"]) == ["id", "valid"]

    code = main(["evaluate", str(posterior_path), str(valid), "--calibrate-on", "validation"])
    captured = capsys.readouterr()
    assert code == 2 and "--calibrate-on 'validation'" in captured.err and "['valid']" in captured.err
