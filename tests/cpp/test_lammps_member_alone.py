"""``pair_style bayesrace dynamics member K``: on steps without uncertainty the pair style
evaluates member K alone (one network instead of M); on steps that report uncertainty, every
member. The trajectory must be the one of member K evaluated with every member on every
step (``uncertainty every 1``), to round-off, in shell mode and in layer mode on 1 and 2
ranks (atoms change rank), and the σ's on the reporting steps must agree too."""

from __future__ import annotations

import numpy as np
import pytest

from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path, toy_dir, toy_model  # noqa: E402,F401

from lmp_tools import lammps_input, parse_tagged, run_lmp, write_data  # noqa: E402
from race_deployables import export_race  # noqa: E402
from test_lammps_race import cell_structure  # noqa: E402

STEPS = 60
MEMBER = 1


def _block(plugin: str, model: str, settings: str, tag: str) -> str:
    """60 NVE steps of a periodic cell at 1500 K driven by member 1; every 10 steps: pe, ke,
    the σ's and every atom's position (by a sum that any moved atom changes)."""
    s = cell_structure()
    extra = (
        "neighbor 1.0 bin\nneigh_modify every 1 delay 0 check yes\n"
        "velocity all create 1500 11 loop geom\nfix nve all nve\ntimestep 0.001\nthermo 10\ncompute kin all ke\n"
        "variable wx atom x*(id+0.5)\nvariable wy atom y*(id+1.5)\ncompute sx all reduce sum v_wx v_wy\n"
        f'fix out all print 10 "{tag} $(step) $(pe:%.17g) $(c_kin:%.17g) $(c_ug[1]:%.17g) $(c_ug[3]:%.17g) '
        '$(c_ug[6]:%.17g) $(c_ug[7]:%.17g) $(c_sx[1]:%.17g) $(c_sx[2]:%.17g)" screen yes'
    )
    return lammps_input(plugin, model, s, settings=f"dynamics member {MEMBER} {settings}", dump=False, extra=extra,
                        run=f"run {STEPS}").replace("global.txt", f"global_{tag}.txt")


@pytest.fixture(scope="module")
def trajectories(plugin_path, tmp_path_factory):
    """{(halo, nprocs): (MD rows with member 1 alone between reports, MD rows with every member
    every step, output)}: three launches."""
    root = tmp_path_factory.mktemp("member_alone")
    model = export_race(root / "race.pt")
    result = {}
    for halo, nprocs in (("shell", 1), ("layer", 1), ("layer", 2)):
        work = root / f"{halo}{nprocs}"
        work.mkdir()
        write_data(cell_structure(), work / "data.lmp")
        text = (_block(plugin_path, model, f"halo {halo}", "ALONE") + "clear\n"
                + _block(plugin_path, model, f"halo {halo} uncertainty every 1", "EVERY"))
        rc, out = run_lmp(text, work, nprocs=nprocs, timeout=900)
        assert rc == 0, out[-4000:]
        result[(halo, nprocs)] = (parse_tagged(out, "ALONE"), parse_tagged(out, "EVERY"), out)
    return result


@pytest.mark.parametrize("case", [("shell", 1), ("layer", 1), ("layer", 2)])
def test_member_alone_follows_the_same_trajectory(trajectories, case):
    alone, every, out = trajectories[case]
    assert alone.shape == (STEPS // 10 + 1, 9) and every.shape == alone.shape
    assert "dynamics member 1: that member alone on steps without uncertainty" in out, out[-3000:]
    scale = np.abs(every).max(0)
    np.testing.assert_allclose(alone, every, rtol=1e-9, atol=1e-9 * scale.max())
    # the run moved: positions and energies changed over the 60 steps
    assert np.ptp(every[:, 1]) > 1e-3 and np.ptp(every[:, 7]) > 1e-2


def test_member_alone_same_on_1_and_2_ranks_and_both_modes(trajectories):
    ref = trajectories[("layer", 1)][0]
    for case in (("shell", 1), ("layer", 2)):
        np.testing.assert_allclose(trajectories[case][0], ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())


def test_recompute_logs_every_member(plugin_path, toy_model, tmp_path):
    """recompute yes evaluates every member on every step, and the log says so."""
    model = export_race(tmp_path / "race.pt")
    s = cell_structure()
    write_data(s, tmp_path / "data.lmp")
    rc, out = run_lmp(lammps_input(plugin_path, model, s, settings="dynamics member 0 halo layer recompute yes"),
                      tmp_path)
    assert rc == 0, out[-3000:]
    assert "dynamics member 0: every member on every step" in out
