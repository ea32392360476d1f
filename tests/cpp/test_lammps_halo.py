"""pair_style bayesrace ... halo layer (ghosts one cutoff deep, node features exchanged after
every layer) against halo shell and the binding, with the real RACE deployable (tiny,
3 members, 2 layers, float64), on 1, 2 and 4 MPI ranks.

mpirun launches are slow, so each launch runs every structure in turn (``clear`` between
them): one serial shell run, layer runs on 1, 2 and 4 ranks. Compared to 1e-10 relative:
energy, forces, virial (pressure), pe/atom, stress/atom and every uncertainty column.
Structures: PSB3 in a big box, a periodic cell smaller than twice the interaction range, a
triclinic cell, and PSB3 at one end of a long box, which `processors 4 1 1` leaves ranks
without atoms on 4 ranks. The 1- and 2-rank layer runs also run 100 NVE steps in which
atoms change rank; the two trajectories agree to round-off.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, plugin_path, toy_dir, toy_model  # noqa: E402,F401

from lmp_tools import (  # noqa: E402
    assert_same,
    lammps_input,
    lammps_instance,
    parse_lammps_result,
    parse_tagged,
    reference,
    reference_result,
    run_lmp,
    write_data,
)
from race_deployables import export_race  # noqa: E402
from test_lammps_race import cell_structure, psb3_structure  # noqa: E402

CUTOFF = 5.0
STRUCTURES = {
    "psb3": lambda: psb3_structure(),
    "cell": lambda: cell_structure(),
    "triclinic": lambda: cell_structure(seed=5, n=26, triclinic=True),
    "empty_rank": lambda: psb3_structure(origin=(5.0, 15.0, 15.0), box=(48.0, 30.0, 30.0)),
}
MD_STEPS = 100


@pytest.fixture(scope="module")
def model(core, tmp_path_factory):
    """The tiny RACE ensemble, with a threshold inside PSB3's range of σ's (the count is exercised)."""
    d = tmp_path_factory.mktemp("halo")
    plain = export_race(d / "plain.pt")
    s = psb3_structure()
    _, out = reference(core, plain, s, CUTOFF)
    return export_race(d / "race.pt", threshold=float(np.median(out[keys.ATOMIC_FORCE_STD])))


def _md_block(plugin: str, model: str, halo: str) -> str:
    """100 NVE steps of the periodic cell at 1500 K, thermo and σ's every 10 steps, owning rank per atom."""
    s = cell_structure()
    extra = (
        "neighbor 1.0 bin\nneigh_modify every 1 delay 0 check yes\n"
        "velocity all create 1500 7 loop geom\nfix nve all nve\ntimestep 0.001\nthermo 10\ncompute kin all ke\n"
        "dump dmd all custom 50 dump_md.txt id proc x y z\ndump_modify dmd sort id format float %.17g\n"
        'fix out all print 10 "MD $(step) $(pe:%.17g) $(c_kin:%.17g) $(c_ug[1]:%.17g) $(c_ug[2]:%.17g) '
        '$(c_ug[3]:%.17g) $(c_p[1]:%.17g) $(c_p[4]:%.17g)" screen yes'
    )
    text = lammps_input(plugin, model, s, settings=f"halo {halo}", dump=False, extra=extra, run=f"run {MD_STEPS}")
    return text.replace("data.lmp", "data_cell.lmp").replace("global.txt", "global_md.txt")


def _run_all(plugin: str, model: str, work: Path, halo: str, nprocs: int, md: bool, recompute: bool = False):
    """One launch: every structure (and the MD when asked); returns (output by structure, MD rows, MD dumps).
    ``recompute``: layer mode with ``recompute yes`` (each layer run again in the backward pass)."""
    work.mkdir(parents=True, exist_ok=True)
    blocks = []
    for kind, make in STRUCTURES.items():
        s = make()
        write_data(s, work / f"data_{kind}.lmp")
        processors = "processors 4 1 1" if kind == "empty_rank" and nprocs == 4 else ""
        settings = f"halo {halo}" + (" recompute yes" if recompute else "")
        text = lammps_input(plugin, model, s, settings=settings, processors=processors)
        text = (text.replace("data.lmp", f"data_{kind}.lmp").replace("dump.txt", f"dump_{kind}.txt")
                .replace("global.txt", f"global_{kind}.txt"))
        blocks.append(f'print "BEGIN {kind}"\n' + text)
    if md:
        blocks.append('print "BEGIN md"\n' + _md_block(plugin, model, halo))
    rc, out = run_lmp("clear\n".join(blocks), work, nprocs=nprocs, timeout=900)
    assert rc == 0, out[-4000:]
    assert nprocs == 1 or f"{nprocs} MPI tasks" in out
    layer_log = "pair bayesrace: halo layer" in out
    assert layer_log == (halo == "layer"), "the halo mode was not the one asked for"
    sections = dict(re.findall(r"^BEGIN (\w+)\n(.*?)(?=^BEGIN |\Z)", out, flags=re.S | re.M))
    results = {}
    for kind in STRUCTURES:
        sub = work / kind
        sub.mkdir(exist_ok=True)
        (sub / "global.txt").write_text((work / f"global_{kind}.txt").read_text())
        (sub / "dump.txt").write_text((work / f"dump_{kind}.txt").read_text())
        results[kind] = parse_lammps_result(sub)
    return results, sections, (parse_tagged(out, "MD") if md else None)


@pytest.fixture(scope="module")
def runs(plugin_path, model, tmp_path_factory):
    """{(halo, nprocs): (results by structure, output by structure, MD rows)}: 4 launches; the 4-rank
    one recomputes each layer in the backward pass (``recompute yes``), so every comparison of it
    checks that mode too."""
    root = tmp_path_factory.mktemp("halo_runs")
    return {
        ("shell", 1): _run_all(plugin_path, model, root / "shell1", "shell", 1, md=False),
        ("layer", 1): _run_all(plugin_path, model, root / "layer1", "layer", 1, md=True),
        ("layer", 2): _run_all(plugin_path, model, root / "layer2", "layer", 2, md=True),
        ("layer", 4): _run_all(plugin_path, model, root / "layer4", "layer", 4, md=False, recompute=True),
    } | {"root": root}


@pytest.mark.parametrize("nprocs", [1, 2, 4])
def test_layer_equals_shell_serial(runs, nprocs):
    shell = runs[("shell", 1)][0]
    layer = runs[("layer", nprocs)][0]
    for kind in STRUCTURES:
        assert_same(layer[kind], shell[kind], rtol=1e-10)


@pytest.mark.parametrize("kind", list(STRUCTURES))
def test_layer_equals_binding(core, model, runs, kind):
    want = reference_result(core, model, STRUCTURES[kind](), CUTOFF)
    for nprocs in (1, 2, 4):
        assert_same(runs[("layer", nprocs)][0][kind], want, rtol=1e-10)
    assert 0 < want["n_over"] < len(want["id"]) or kind != "psb3"


def test_layer_runs_with_empty_ranks_and_one_cutoff_halo(runs):
    out4 = runs[("layer", 4)][1]["empty_rank"]
    nlocal = re.search(r"Nlocal:\s+(\S+) ave\s+(\S+) max\s+(\S+) min", out4)
    assert nlocal and float(nlocal.group(3)) == 0.0, "expected a rank without atoms"
    # the halo: shell mode ghosts n_layers x cutoff + skin deep, layer mode cutoff + skin
    ghosts = {}
    for halo in ("shell", "layer"):
        out = runs[(halo, 1)][1]["cell"]
        ghosts[halo] = float(re.search(r"Nghost:\s+(\S+)", out).group(1))
        cut = re.search(r"ghost atom cutoff = (\S+)", out)
        assert cut, out[-2000:]
        assert float(cut.group(1)) == pytest.approx(2 * CUTOFF + 2.0 if halo == "shell" else CUTOFF + 2.0)
    assert ghosts["layer"] < ghosts["shell"]


def test_layer_md_same_on_1_and_2_ranks(runs):
    one, two = runs[("layer", 1)][2], runs[("layer", 2)][2]
    assert one.shape == (MD_STEPS // 10 + 1, 8) and two.shape == one.shape
    scale = np.abs(one).max(0)
    np.testing.assert_allclose(two, one, rtol=1e-9, atol=1e-9 * scale.max())
    # the energy is conserved to the usual level (dt = 1 fs, 1500 K)
    total = one[:, 1] + one[:, 2]
    assert np.ptp(total) < 0.05 * np.ptp(one[:, 1]) + 1e-3
    # atoms changed rank during the 2-rank run
    from lmp_tools import read_dump_frames

    frames = read_dump_frames(runs["root"] / "layer2" / "dump_md.txt")
    assert len(frames) == MD_STEPS // 50 + 1
    procs = [np.asarray(f["columns"]["proc"]).astype(int) for f in frames]
    assert set(procs[0]) == {0, 1} and any((p != procs[0]).any() for p in procs[1:]), "no atom changed rank"


def test_halo_keyword_errors(plugin_path, toy_model, tmp_path):
    """A bad halo value and a model without per-layer methods are refused with the reason."""
    lmp = lammps_instance()
    if plugin_path:
        lmp.command(f"plugin load {plugin_path}")
    with pytest.raises(Exception, match="'halo' needs 'shell' or 'layer', got 'deep'"):
        lmp.command("pair_style bayesrace halo deep")
    with pytest.raises(Exception, match="'recompute' needs 'yes' or 'no', got 'maybe'"):
        lmp.command("pair_style bayesrace recompute maybe")
    with pytest.raises(Exception, match="'recompute' applies to 'halo layer' only"):
        lmp.command("pair_style bayesrace halo shell recompute yes")
    lmp.close()
    s = psb3_structure()
    write_data(s, tmp_path / "data.lmp")
    inp = lammps_input(plugin_path, toy_model, s, settings="halo layer", dump=False)
    rc, out = run_lmp(inp, tmp_path)
    assert rc != 0
    assert "cannot run layer mode: it has no per-layer methods" in out, out[-2000:]
