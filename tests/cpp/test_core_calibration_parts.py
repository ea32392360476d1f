"""The C++ core's calibration by parts (method split): the engine applies a deployable's
epistemic and aleatoric maps exactly as ``bayesrace.bayes.calibrate_prediction`` does, and
refuses a total map beside a part map."""

from __future__ import annotations

import numpy as np
import pytest

from bayesrace import keys
from cpp_fixtures import FILTERS

pytestmark = FILTERS

from cpp_fixtures import core, toy_dir, toy_model  # noqa: E402,F401
from test_core_engine import close, numpy_aggregate, structure_inputs, torchscript  # noqa: E402
from test_core_metadata import _expect_error  # noqa: E402
from toy_deployable import write_toy  # noqa: E402

UNCALIBRATED = {"calibration": {"force_std_scale": 1.0, "energy_std_scale": 1.0}}
FIELDS = ("atomic_force_std", "atomic_force_std_epistemic", "atomic_force_std_aleatoric", "atomic_energy_std",
          "force_cov_epistemic", "force_cov_aleatoric", "energy_var_epistemic", "energy_var_aleatoric",
          "energy_std")


def test_engine_applies_maps_by_parts_as_python_does(core, toy_model, tmp_path):
    from bayesrace.bayes import calibrate_prediction

    x, species, ei, shifts = structure_inputs("periodic")
    n = len(x)
    plain = numpy_aggregate(torchscript(toy_model, x, species, ei, shifts, n, False), n, UNCALIBRATED)
    epi = np.quantile(plain["atomic_force_std_epistemic"], [0.25, 0.75])
    ale = np.quantile(plain["atomic_force_std_aleatoric"], [0.2, 0.5, 0.8])
    e_epi, e_ale = (float(np.sqrt(plain[name])) / n for name in ("energy_var_epistemic", "energy_var_aleatoric"))
    cal = {
        "force_std_scale": 1.3, "energy_std_scale": 0.7,
        "force_epistemic_std_map": {"sigma": epi.tolist(), "calibrated": [0.1, 0.9]},
        "force_aleatoric_std_map": {"sigma": ale.tolist(), "calibrated": [0.01, 0.02, 0.5]},
        "energy_epistemic_std_map": {"sigma": [2.0 * e_epi], "calibrated": [0.3]},
        "energy_aleatoric_std_map": {"sigma": [0.5 * e_ale, 3.0 * e_ale], "calibrated": [0.01, 0.02]},
    }
    path = tmp_path / "parts.pt"
    write_toy(str(path), metadata_override={"calibration": cal})
    got = core.Engine(str(path)).evaluate(x, species, ei, shifts)
    prediction = {name: np.atleast_1d(plain[name]) for name in FIELDS}
    prediction.update({keys.NUM_ATOMS: np.array([n]), keys.BATCH: np.zeros(n, dtype=np.int64)})
    want = calibrate_prediction(prediction, cal)
    for name in FIELDS:
        close(np.atleast_1d(got[name]), want[name], 1e-12)
    # the parts are mapped differently: the total's ratio varies beyond either scale alone
    ratio = got["atomic_force_std"] / plain["atomic_force_std"]
    assert ratio.max() > 2.0 * ratio.min()


@pytest.mark.parametrize("calibration, fragments", [
    ({"force_std_map": {"sigma": [0.1], "calibrated": [0.2]},
      "force_epistemic_std_map": {"sigma": [0.1], "calibrated": [0.2]}},
     ["'calibration.force_std_map' cannot be given together with 'force_epistemic_std_map'"]),
    ({"energy_aleatoric_std_map": {"sigma": [0.2, 0.1], "calibrated": [0.2, 0.3]}},
     ["'calibration.energy_aleatoric_std_map.sigma' must be strictly increasing"]),
    ({"force_aleatoric_std_map": [0.1]}, ["'calibration.force_aleatoric_std_map' must be an object"]),
])
def test_bad_maps_by_parts_are_refused_naming_the_field(core, tmp_path, calibration, fragments):
    path = tmp_path / "bad.pt"
    write_toy(str(path), metadata_override={"calibration": {**UNCALIBRATED["calibration"], **calibration}})
    _expect_error(core, path, *fragments)
