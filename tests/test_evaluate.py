import json
import math

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.emt import EMT
from ase.io import write

from bayesrace import keys
from bayesrace._calculator import BayesRaceCalculator
from bayesrace._data import read_frames
from bayesrace._evaluate import (
    METRIC_UNITS,
    evaluate_sets,
    format_table,
    predict_frames,
    reference_key,
)
from bayesrace._model import build_model, model_config_from
from bayesrace._posterior import Posterior

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
    return {
        "n_structures": len(frames),
        "n_atoms": int(n_atoms.sum()),
        "energy_mae_eV": np.abs(energy_error).mean(),
        "energy_rmse_meV_per_atom": 1000 * np.sqrt(np.mean((energy_error / n_atoms) ** 2)),
        "forces_mae_eV_per_A": np.abs(force_error).mean(),
        "forces_rmse_eV_per_A": np.sqrt(np.mean(force_error**2)),
        "energy_sigma_mean_meV_per_atom": 1000 * np.mean(energy_sigma / n_atoms),
        "forces_sigma_median_eV_per_A": np.median(force_sigma),
        "forces_sigma_epistemic_mean_eV_per_A": np.mean(np.concatenate(force_sigma_epistemic)),
        "spearman_energy": spearmanr(np.abs(energy_error), energy_sigma).statistic,
        "spearman_forces": spearmanr(np.linalg.norm(force_error, axis=1), force_sigma).statistic,
        "forces_nll": np.mean(0.5 * np.log(2 * np.pi * force_sigma[:, None] ** 2) + 0.5 * z**2),
        "forces_coverage_95": np.mean(np.abs(z) <= 1.959963984540054),
    }


def test_evaluate_sets_report_and_numbers(posterior, data_sets, tmp_path):
    unlabelled = write_set(tmp_path / "trajectory.xyz", seed=3, n_frames=3, box=3.0, min_distance=1.0, labelled=False)
    sets = {**data_sets, "unlabelled": unlabelled}
    report_dir = tmp_path / "report"
    results = evaluate_sets(posterior, sets, report_dir=report_dir, progress=False, batch_size=4)

    assert list(results) == ["test", "compressed", "unlabelled"]
    for name in data_sets:
        assert set(results[name]) == set(METRIC_UNITS)
        expected = direct_metrics(posterior, data_sets[name])
        for metric, value in expected.items():
            assert results[name][metric] == pytest.approx(value, rel=1e-8, abs=1e-12), (name, metric)
        for level in (68, 95, 99):
            assert 0.0 <= results[name][f"forces_coverage_{level}"] <= 1.0
    # an unlabelled set still gets its σ's, and no error metrics
    assert "energy_mae_eV" not in results["unlabelled"]
    assert results["unlabelled"]["forces_sigma_mean_eV_per_A"] > 0

    stored = json.loads((report_dir / "metrics.json").read_text())
    assert set(stored) == set(results)
    for name, metrics in results.items():
        assert set(stored[name]) == set(metrics)
        for metric, value in metrics.items():
            if isinstance(value, float) and math.isnan(value):
                assert stored[name][metric] is None
            else:
                assert stored[name][metric] == pytest.approx(value, rel=1e-12)

    for picture in ("parity_energy.png", "parity_forces.png", "error_vs_sigma.png"):
        content = (report_dir / picture).read_bytes()
        assert content.startswith(b"\x89PNG") and len(content) > 5000, picture
    saved = np.load(report_dir / "predictions_test.npz")
    np.testing.assert_array_equal(saved[keys.NUM_ATOMS], [f.num_atoms for f in read_frames(data_sets["test"])])

    report = (report_dir / "report.md").read_text()
    assert "## uncertainty: in-distribution vs out-of-distribution" in report
    for name in sets:
        assert f"## {name}" in report and f"| {name} |" in report

    table = format_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(sets)
    assert "F RMSE [eV/Å]" in lines[0] and "E MAE [meV/at]" in lines[0]
    assert len({len(line) for line in lines}) == 1  # fixed width
    assert f"{results['test']['forces_rmse_eV_per_A']:.4g}" in lines[2]
