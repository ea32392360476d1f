"""Field names shared by the data pipeline, the model, the exporter and the C++ core.

Every tensor that crosses a module boundary is named here and nowhere else; the C++
side reads the same names from the generated header ``pair_bayesrace/keys.h`` (a test
checks that the two agree). Shapes use N atoms, E directed edges, B structures,
M posterior members. Units: eV, Å.
"""

# --- structure -----------------------------------------------------------------
POSITIONS = "positions"  # [N, 3] float, Å
ATOMIC_NUMBERS = "atomic_numbers"  # [N] int64
SPECIES = "species"  # [N] int64, index into the model's type_names
CELL = "cell"  # [B, 3, 3] float, Å, rows are lattice vectors (zeros if non-periodic)
PBC = "pbc"  # [B, 3] bool
BATCH = "batch"  # [N] int64, structure index of each atom
NUM_ATOMS = "num_atoms"  # [B] int64
EDGE_INDEX = "edge_index"  # [2, E] int64, row 0 = centre i, row 1 = neighbour j
EDGE_CELL_SHIFT = "edge_cell_shift"  # [E, 3] float, integer cell multiples S: r_ij = x_j - x_i + S @ cell
EDGE_VECTORS = "edge_vectors"  # [E, 3] float, Å, r_ij
EDGE_SHIFTS = "edge_shifts"  # [E, 3] float, Å, Cartesian image shift: r_ij = x_j - x_i + shift (deployable input)

# --- labels and predictions ------------------------------------------------------
ENERGY = "energy"  # [B] eV, total energy
ATOMIC_ENERGY = "atomic_energy"  # [N] eV
FORCES = "forces"  # [N, 3] eV/Å
VIRIAL = "virial"  # [B, 3, 3] eV, W = -sum_edges r_ij (x) dE/dr_ij (LAMMPS sign)
STRESS = "stress"  # [B, 3, 3] eV/Å^3, ASE sign: -W / volume

# --- aleatoric heads of one model (NLL_JEF) ---------------------------------------
ATOMIC_ENERGY_LOG_VAR = "atomic_energy_log_var"  # [N] s_i, log eV^2, averaged over layers
ENERGY_VARIANCE = "energy_variance"  # [B] eV^2, sigma_E^2 = exp(mean_i s_i)
FORCE_COVARIANCE = "force_covariance"  # [N, 3, 3] eV^2/Å^2, Sigma_i (positive definite)

# --- predictive distribution of a posterior (M members) ---------------------------
ENERGY_VAR_EPISTEMIC = "energy_var_epistemic"  # [B] eV^2, variance of member energies
ENERGY_VAR_ALEATORIC = "energy_var_aleatoric"  # [B] eV^2, mean of member sigma_E^2
FORCE_COV_EPISTEMIC = "force_cov_epistemic"  # [N, 3, 3] eV^2/Å^2, covariance of member forces
FORCE_COV_ALEATORIC = "force_cov_aleatoric"  # [N, 3, 3] eV^2/Å^2, mean of member Sigma_i
ATOMIC_FORCE_STD = "atomic_force_std"  # [N] eV/Å, sqrt(tr(total cov) / 3)
ATOMIC_FORCE_STD_EPISTEMIC = "atomic_force_std_epistemic"  # [N] eV/Å, sqrt(tr(epistemic cov) / 3)
ATOMIC_FORCE_STD_ALEATORIC = "atomic_force_std_aleatoric"  # [N] eV/Å, sqrt(tr(aleatoric cov) / 3)
ENERGY_STD_EPISTEMIC_PER_ATOM = "energy_std_epistemic_per_atom"  # eV/atom, sqrt(energy_var_epistemic) / N (a threshold)
# the epistemic force σ relative to the force, as DeePMD-kit's relative model deviation: hot MD
# has larger forces and proportionally larger errors, so this flags novelty rather than heat
ATOMIC_FORCE_STD_RELATIVE = "atomic_force_std_relative"  # [N] 1, sigma_F,epi,i / (|F_i| + RELATIVE_FORCE_LEVEL) (a threshold)
RELATIVE_FORCE_LEVEL = 1.0  # eV/Å, keeps the relative σ finite where the mean force vanishes
ATOMIC_ENERGY_STD = "atomic_energy_std"  # [N] eV, std of member atomic energies
# distance of an atom's features to the training atoms' (bayes._feature_density): novelty at one network's cost
ATOMIC_FEATURE_DISTANCE = "atomic_feature_distance"  # [N] 1, Mahalanobis distance, mean over members
MEMBER_FEATURE_DISTANCE = "member_feature_distance"  # [M, N] 1, each member's own (empty: no density)
MEMBER_ENERGY = "member_energy"  # [M, B] eV ([M] from the deployable: one structure, local atoms)
MEMBER_FORCES = "member_forces"  # [M, N, 3] eV/Å
MEMBER_ATOMIC_ENERGY = "member_atomic_energy"  # [M, N] eV, atomic energies of each member
MEMBER_VIRIAL = "member_virial"  # [M, 3, 3] eV, W = -sum_edges r_ij (x) dE/dr_ij per member
MEMBER_ATOMIC_VIRIAL = "member_atomic_virial"  # [M, N, 3, 3] eV, edge term split half/half; empty unless requested
ATOMIC_VIRIAL = "atomic_virial"  # [N, 3, 3] eV, per-atom virial of the driving model
ENERGY_STD = "energy_std"  # [B] eV, calibrated sqrt(energy_var_epistemic + energy_var_aleatoric)

# --- property and multi-state models (Python only: bayesrace.properties) ----------------
PROPERTIES = "properties"  # [B, T] scalar targets in their own units (model.targets gives order and units)
PROPERTY_VARIANCE = "property_variance"  # [B, T] aleatoric variance of each scalar target
DIPOLE = "dipole"  # [B, 3] Debye, predicted dipole vector (its norm is the dipole target)
ATOMIC_CHARGES = "atomic_charges"  # [N] e, the dipole readout's charges (summing to 0 per structure)
STATE_ENERGIES = "state_energies"  # [B, S] eV, energy of each electronic state
STATE_FORCES = "state_forces"  # [N, S, 3] eV/Å, -dE_s/dr
STATE_ENERGY_VARIANCE = "state_energy_variance"  # [B, S] eV^2, aleatoric
STATE_FORCE_VARIANCE = "state_force_variance"  # [N, S] eV^2/Å^2, aleatoric, per Cartesian component

# --- metadata.json inside the deployable (checked by the C++ loader) --------------------
METADATA_FILE = "metadata.json"  # name of the extra file that holds the metadata
META_FORMAT_VERSION = "format_version"  # int, = 1
META_TYPE_NAMES = "type_names"  # list of element symbols, species index = position
META_CUTOFF = "cutoff"  # float, Å, neighbour cutoff of one layer
META_N_LAYERS = "n_layers"  # int, interaction range = n_layers * cutoff
META_UNITS = "units"  # str, "metal" (eV, Å)
META_DTYPE = "dtype"  # str, "float64" or "float32"
META_N_MEMBERS = "n_members"  # int, M
META_CALIBRATION = "calibration"  # object: force_std_scale, energy_std_scale, optional maps
META_FORCE_STD_SCALE = "force_std_scale"  # float s_F: calibrated force sigma = s_F * g_F(sigma)
META_ENERGY_STD_SCALE = "energy_std_scale"  # float s_E: calibrated energy sigma per atom = s_E * g_E(sigma/N)
META_FORCE_STD_MAP = "force_std_map"  # optional object {sigma: [...], calibrated: [...]}: g_F, monotone knots
META_ENERGY_STD_MAP = "energy_std_map"  # optional, g_E on the per-atom energy sigma (sigma_E / N)
# calibration by parts (method "split"): per quantity either its total map above or these two,
# each mapping that part's own raw sigma (forces per atom, energy per atom of a structure);
# the calibrated total is sqrt(c_epistemic^2 + c_aleatoric^2), s_F / s_E applied to both parts
META_FORCE_EPISTEMIC_STD_MAP = "force_epistemic_std_map"  # optional map of sqrt(tr Sigma_epi / 3)
META_FORCE_ALEATORIC_STD_MAP = "force_aleatoric_std_map"  # optional map of sqrt(tr Sigma_ale / 3)
META_ENERGY_EPISTEMIC_STD_MAP = "energy_epistemic_std_map"  # optional map of sqrt(var_epi) / N
META_ENERGY_ALEATORIC_STD_MAP = "energy_aleatoric_std_map"  # optional map of sqrt(var_ale) / N
META_MAP_SIGMA = "sigma"  # knots x_k of a map: strictly increasing, > 0
META_MAP_CALIBRATED = "calibrated"  # values y_k: non-decreasing, > 0; outside [x_1, x_K] g is proportional
META_THRESHOLDS = "thresholds"  # object: atomic_force_std
META_SHORTEST_CONTACTS = "shortest_contacts"  # optional [T][T] Å (null: pair unseen): training's closest approach
META_FEATURE_DENSITY = "feature_density"  # optional object, informative: training_atoms [T], regularisation
META_SIGMA_CAPS = "sigma_caps"  # object, informative: the members' caps of the aleatoric sigmas (0 = none)
META_FORCE_SIGMA_CAP = "force_sigma_cap"  # eV/Å: per-atom force sigma bent smoothly toward e x this above it
META_ENERGY_SIGMA_CAP = "energy_sigma_cap"  # eV: the same for the structure energy sigma
META_BAYESRACE_VERSION = "bayesrace_version"  # str
META_TORCH_VERSION = "torch_version"  # str
META_TRAINING_DATA_SHA256 = "training_data_sha256"  # str
META_POSTERIOR = "posterior"  # str, kind of posterior (ensemble, mve, swag, ivon, laplace, shallow)

# --- the AOTInductor deployable (.pt2, shell mode only): metadata fields and names inside -----
META_FORMAT = "deployable_format"  # str, FORMAT_TORCHSCRIPT (also when absent) or FORMAT_AOTI
FORMAT_TORCHSCRIPT = "torchscript"  # a TorchScript archive (torch.jit.save): shell and layer mode
FORMAT_AOTI = "aoti"  # an AOTInductor package (.pt2): compiled code, shell mode only
META_INPUT_KEYS = "input_keys"  # list of str, .pt2: order of the compiled models' inputs
META_OUTPUT_KEYS = "output_keys"  # list of str, .pt2: order of the compiled models' outputs
META_AOTI_MODELS = "aoti_models"  # list of str, .pt2: the compiled models in the package (names below)
AOTI_MODEL_PLAIN = "without_atomic_virial"  # .pt2 model: compute_atomic_virial false
AOTI_MODEL_ATOMIC_VIRIAL = "with_atomic_virial"  # .pt2 model: compute_atomic_virial true
LOCAL_ATOMS = "local_atoms"  # [n_local] int64, .pt2 input: its length is n_local (values unused)
META_MACHINE = "machine"  # str, .pt2: architecture it was compiled for (platform.machine(), e.g. x86_64)
META_CPU_ISA = "cpu_isa"  # str, .pt2: vector ISA of the compiled kernels (e.g. avx2, avx512; "" none)
META_COMPILED_ON = "compiled_on"  # str, .pt2: CPU model that compiled it (kernels use its -march=native)
ARCHIVE_METADATA_RECORD = "extra/metadata.json"  # where either archive keeps the metadata (zip record)

ALL_KEYS = tuple(
    value for name, value in sorted(globals().items()) if name.isupper() and isinstance(value, str)
)
