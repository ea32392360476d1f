"""The embedded PSB3 data set (bayesrace.data), generated small."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tblite.interface", reason="tblite (GFN2-xTB) is not installed")

from bayesrace.data import TypeMap, isolated_atom_energies, read_frames  # noqa: E402
from bayesrace.data import PSB3_FILES, TORSION_DIHEDRAL, build_psb3, generate_psb3  # noqa: E402

SCALE = 0.05


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """The same small data set generated twice with the same seed."""
    first = tmp_path_factory.mktemp("psb3_first")
    second = tmp_path_factory.mktemp("psb3_second")
    manifest = generate_psb3(first, seed=3, scale=SCALE, progress=False)
    generate_psb3(second, seed=3, scale=SCALE, progress=False)
    return first, second, manifest


def test_built_geometry():
    atoms = build_psb3()
    assert atoms.get_chemical_formula(mode="hill") == "C5H8N"
    distances = atoms.get_all_distances()
    np.fill_diagonal(distances, np.inf)
    assert distances.min() > 0.95  # no overlapping atoms
    assert abs(atoms.get_dihedral(*TORSION_DIHEDRAL) - 180.0) < 1e-6  # planar all-trans


def test_files_and_manifest(generated):
    out, _, manifest = generated
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["seed"] == 3 and on_disk["scale"] == SCALE
    assert on_disk["method"] == "GFN2-xTB"
    assert on_disk["temperatures_K"]["in_distribution"] == [300.0, 450.0, 600.0]
    assert on_disk["wall_time_s"] > 0
    assert set(on_disk["files"]) == set(PSB3_FILES)
    assert on_disk["files"] == manifest["files"]

    counts = {}
    for name in PSB3_FILES:
        frames = read_frames(out / name)  # checks finiteness, shapes and distances
        assert len(frames) == on_disk["files"][name]["frames"] > 0
        counts[name] = len(frames)
        for frame in frames:
            assert np.all(np.isfinite(frame.forces)) and np.isfinite(frame.energy)
            assert "config_type" in frame.info and "temperature_K" in frame.info
    # 4:1:1 split of the in-distribution frames
    assert counts["train.xyz"] == 4 * counts["valid.xyz"] == 4 * counts["test_id.xyz"]
    assert counts["isolated_atoms.xyz"] == 3


def test_contents_are_psb3(generated):
    out, _, _ = generated
    type_map = TypeMap(["H", "C", "N"])
    for name in ("train.xyz", "valid.xyz", "test_id.xyz", "test_ood_hot.xyz", "test_ood_torsion.xyz"):
        for frame in read_frames(out / name):
            assert np.bincount(type_map.species(frame.numbers), minlength=3).tolist() == [8, 5, 1]
            assert not frame.pbc.any()
            # a bound C5H8N+: energies far below the sum of the atoms, forces not absurd
            assert -480.0 < frame.energy < -460.0
            assert np.abs(frame.forces).max() < 50.0

    temperatures = {f.info["temperature_K"] for f in read_frames(out / "train.xyz")}
    assert temperatures == {300.0, 450.0, 600.0}
    hot = {f.info["temperature_K"] for f in read_frames(out / "test_ood_hot.xyz")}
    assert hot == {1000.0, 1500.0}

    # hotter MD samples higher energies on average
    def mean_energy(frames, temperature):
        return np.mean([f.energy for f in frames if f.info["temperature_K"] == temperature])

    in_distribution = [f for n in ("train.xyz", "valid.xyz", "test_id.xyz") for f in read_frames(out / n)]
    hot_frames = read_frames(out / "test_ood_hot.xyz")
    assert mean_energy(hot_frames, 1500.0) > mean_energy(in_distribution, 300.0)

    isolated = isolated_atom_energies(read_frames(out / "isolated_atoms.xyz"))
    assert sorted(isolated) == ["C", "H", "N"]
    assert all(value < 0 for value in isolated.values())


def test_torsion_scan_spans_0_to_180(generated):
    import ase.io

    out, _, _ = generated
    images = ase.io.read(out / "test_ood_torsion.xyz", index=":")
    dihedrals = np.array([a.get_dihedral(*TORSION_DIHEDRAL) for a in images])
    folded = np.minimum(dihedrals, 360.0 - dihedrals)  # the same torsion either way round
    assert folded.min() < 0.5 and folded.max() > 179.5
    np.testing.assert_allclose(folded, [a.info["dihedral_deg"] for a in images], atol=0.5)
    energies = np.array([a.get_potential_energy() for a in images])
    assert energies.argmin() == len(images) - 1  # the all-trans minimum lies at 180 deg
    assert energies.max() - energies.min() > 0.5  # the twisted cation costs a barrier (eV)


def test_same_seed_same_bytes(generated):
    first, second, _ = generated
    for name in PSB3_FILES:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    first_manifest = json.loads((first / "manifest.json").read_text())
    second_manifest = json.loads((second / "manifest.json").read_text())
    assert first_manifest["files"] == second_manifest["files"]  # sha256 included


def test_bad_scale(tmp_path):
    with pytest.raises(ValueError):
        generate_psb3(tmp_path, scale=0.0, progress=False)


def test_torsion_frames_beyond_the_training_twists(tmp_path):
    """write_torsion_beyond_training keeps the scan's frames whose C=C twist is outside the
    training set's range (1° of slack), whatever the sign of the dihedral, and refuses a scan
    that the training set covers entirely."""
    import ase.io

    from bayesrace.data import TORSION_DIHEDRAL, write_torsion_beyond_training
    from bayesrace.data._psb3 import _TORSION_ROTATING_ATOMS, build_psb3

    def twisted(angle):
        atoms = build_psb3()
        mask = [i in _TORSION_ROTATING_ATOMS for i in range(len(atoms))]
        atoms.set_dihedral(*TORSION_DIHEDRAL, angle, mask=mask)
        return atoms

    ase.io.write(tmp_path / "train.xyz", [twisted(a) for a in (150.0, 170.0, -175.0, 180.0)])
    ase.io.write(tmp_path / "test_ood_torsion.xyz", [twisted(a) for a in (0.0, 60.0, 148.0, 149.5, 160.0, 180.0)])
    result = write_torsion_beyond_training(tmp_path)
    assert result["n_frames"] == 3 and result["n_torsion"] == 6
    assert result["train_range_deg"] == pytest.approx([150.0, 180.0])
    kept = ase.io.read(result["path"], ":")
    twists = [abs(((a.get_dihedral(*TORSION_DIHEDRAL) + 180.0) % 360.0) - 180.0) for a in kept]
    assert twists == pytest.approx([0.0, 60.0, 148.0])

    ase.io.write(tmp_path / "test_ood_torsion.xyz", [twisted(a) for a in (155.0, 179.0)])
    with pytest.raises(ValueError, match="inside the training range"):
        write_torsion_beyond_training(tmp_path)


def test_thermal_torsion_holds_the_twist_with_thermal_forces(tmp_path):
    """write_thermal_torsion samples 300 K MD with the C=C twist held at each angle: every frame
    sits at its angle, its xTB forces are thermal (not the near-zero forces of a relaxed scan),
    the 90° twist costs more energy than the planar frames, and the same seed gives the same bytes."""
    from bayesrace.data import write_thermal_torsion
    from bayesrace.data._psb3 import _twist_deg

    angles = (0.0, 90.0)
    result = write_thermal_torsion(tmp_path, angles_deg=angles, frames_per_angle=2, progress=False)
    frames = read_frames(result["path"])
    assert result["n_frames"] == len(frames) == 4
    import ase.io

    atoms = ase.io.read(result["path"], index=":")
    twists = np.array([_twist_deg(a) for a in atoms])
    assert np.allclose(twists, np.repeat(angles, 2), atol=1e-3)
    mean_force = np.array([np.linalg.norm(frame.forces, axis=1).mean() for frame in frames])
    assert mean_force.min() > 0.5  # eV/Å: thermal; the relaxed scan's frames sit near 0.2
    energies = np.array([frame.energy for frame in frames])
    assert energies[2:].min() > energies[:2].max()  # the twisted cation lies above cis
    again = write_thermal_torsion(tmp_path, angles_deg=angles, frames_per_angle=2, progress=False,
                                  out_name="again.xyz")
    assert (tmp_path / "again.xyz").read_bytes() == (tmp_path / "test_ood_torsion_thermal.xyz").read_bytes()
    assert again["n_frames"] == 4


def test_thermal_torsion_rejects_empty_requests(tmp_path):
    from bayesrace.data import write_thermal_torsion

    with pytest.raises(ValueError, match="frames_per_angle"):
        write_thermal_torsion(tmp_path, angles_deg=(90.0,), frames_per_angle=0, progress=False)
