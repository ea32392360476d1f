"""Active learning: oracles, acquisition by BALD, the pool loop and the on-the-fly loop.

(The LAMMPS side of the on-the-fly loop, MD segments that halt at high σ and their dumps,
is ``bayesrace.lammps``.)
"""

from ._acquisition import (
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
from ._config import (
    ActiveConfig,
    MDSection,
    OracleSection,
    active_config_from_dict,
    load_active_config,
    round_training_config,
)
from ._control import THRESHOLD_KEYS, control_thresholds
from ._onthefly import (
    OTF_LOG,
    OTF_PLOT,
    run_on_the_fly,
)
from ._oracles import (
    FromPoolOracle,
    Oracle,
    TBLiteOracle,
    label_structures,
    make_oracle,
)
from ._pool import (
    CURVE_METRICS,
    run_pool_al,
)
from ._store import read_labelled

__all__ = [
    "ActiveConfig",
    "CURVE_METRICS",
    "FromPoolOracle",
    "MDSection",
    "OTF_LOG",
    "OTF_PLOT",
    "Oracle",
    "OracleSection",
    "STRATEGIES",
    "THRESHOLD_KEYS",
    "TBLiteOracle",
    "acquisition_scores",
    "active_config_from_dict",
    "bald_energy_scores",
    "bald_force_scores",
    "control_thresholds",
    "energy_std_scores",
    "gaussian_mi",
    "joint_gaussian_mi",
    "label_structures",
    "load_active_config",
    "make_oracle",
    "member_gram",
    "mixture_mi_lower_bound",
    "mixture_mi_monte_carlo",
    "mixture_mi_pairwise",
    "mixture_mi_upper_bound",
    "read_labelled",
    "round_training_config",
    "run_on_the_fly",
    "run_pool_al",
    "select_batch",
    "structure_mixture_mi",
]
