// pybind11 module _bayesrace_core: the C++ engine (same code as the LAMMPS plugin) seen
// from Python, for tests and for Python-side inference with the exact C++ aggregation.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "core/aggregate.h"
#include "core/engine.h"
#include "core/json_document.h"
#include "keys.h"

namespace py = pybind11;
using namespace bayesrace;

namespace {

// metadata.json as Python's json.loads reads it: whole numbers stay int, objects become dicts
py::object to_python(const nlohmann::json &v) {
  using T = nlohmann::json::value_t;
  switch (v.type()) {
    case T::boolean: return py::bool_(v.get<bool>());
    case T::number_integer: return py::int_(v.get<int64_t>());
    case T::number_unsigned: return py::int_(v.get<uint64_t>());
    case T::number_float: return py::float_(v.get<double>());
    case T::string: return py::str(v.get_ref<const std::string &>());
    case T::array: {
      py::list l;
      for (const auto &e : v) l.append(to_python(e));
      return std::move(l);
    }
    case T::object: {
      py::dict d;
      for (const auto &kv : v.items()) d[py::str(kv.key())] = to_python(kv.value());
      return std::move(d);
    }
    default: return py::none();
  }
}

py::array_t<double> array(const double *data, std::vector<py::ssize_t> shape) {
  py::array_t<double> a(shape);
  if (a.size()) std::memcpy(a.mutable_data(), data, sizeof(double) * static_cast<size_t>(a.size()));
  return a;
}
py::array_t<double> array(const std::vector<double> &v, std::vector<py::ssize_t> shape) {
  return array(v.data(), std::move(shape));
}
py::array_t<double> scalar(double x) { return array(&x, {}); }

using DArr = py::array_t<double, py::array::c_style | py::array::forcecast>;
using IArr = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

void require_shape(const py::array &a, const char *name, std::vector<py::ssize_t> shape) {
  bool ok = a.ndim() == static_cast<py::ssize_t>(shape.size());
  for (size_t k = 0; ok && k < shape.size(); ++k) ok = shape[k] < 0 || a.shape(k) == shape[k];
  if (!ok) {
    std::string s = "(";
    for (size_t k = 0; k < shape.size(); ++k) s += (k ? ", " : "") + (shape[k] < 0 ? std::string("*") : std::to_string(shape[k]));
    throw py::value_error(std::string(name) + " must have shape " + s + ")");
  }
}

int parse_driving(const py::object &driving, int64_t M) {
  if (py::isinstance<py::str>(driving)) {
    std::string s = driving.cast<std::string>();
    if (s == "mean") return -1;
    throw py::value_error("driving must be \"mean\" or a member index, got \"" + s + "\"");
  }
  if (py::isinstance<py::bool_>(driving) || !py::isinstance<py::int_>(driving))
    throw py::value_error("driving must be \"mean\" or a member index");
  int64_t k = driving.cast<int64_t>();
  if (k < 0 || k >= M)
    throw py::value_error("driving member " + std::to_string(k) + " out of range 0.." + std::to_string(M - 1));
  return static_cast<int>(k);
}

// The dict of evaluate() / evaluate_layered() from the member outputs. The uncertainties
// are over atoms 0..n_local-1; with `ghost_owner` (ghost row n_local+g is a copy of local
// row ghost_owner[g]) the ghost rows of the member forces are first added onto their owners,
// as the LAMMPS pair style does before aggregating. Runs without the GIL until the dict.
py::dict results(const Engine &engine, const MemberOutputs &mo, int64_t n_local, int member,
                 bool compute_atomic_virial, const int64_t *ghost_owner) {
  namespace K = keys;
  const int64_t M = mo.n_members, N = mo.n_atoms;
  DrivingOutputs drive;
  AggregateOutput agg;
  std::vector<double> log_var_sum(M, 0.0), folded;
  {
    py::gil_scoped_release nogil;
    select_driving(mo, member, drive);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t i = 0; i < n_local; ++i) log_var_sum[m] += mo.log_var[m * N + i];
    const double *member_forces = mo.forces.data();
    if (ghost_owner) {
      folded = mo.forces;
      for (int64_t m = 0; m < M; ++m)
        for (int64_t g = 0; g < N - n_local; ++g)
          for (int a = 0; a < 3; ++a)
            folded[(m * N + ghost_owner[g]) * 3 + a] += folded[(m * N + n_local + g) * 3 + a];
      member_forces = folded.data();
    }
    if (mo.only_member < 0) {  // one member alone: nothing to aggregate
      AggregateInput ai;
      ai.n_members = M;
      ai.n_atoms = n_local;
      ai.stride = N;
      ai.member_forces = member_forces;
      ai.force_covariance = mo.force_cov.data();
      ai.member_atomic_energy = mo.atomic_energy.data();
      ai.member_total_energy = mo.energy.data();
      ai.log_var_sum = log_var_sum.data();
      ai.n_atoms_total = static_cast<double>(n_local);
      ai.calibration = &engine.metadata().calibration;
      ai.member_feature_distance = mo.feature_distance.empty() ? nullptr : mo.feature_distance.data();
      aggregate(ai, agg);
    }
  }

  py::dict d;
  d[K::MEMBER_ENERGY] = array(mo.energy, {M});
  d[K::MEMBER_ATOMIC_ENERGY] = array(mo.atomic_energy, {M, N});
  d[K::MEMBER_FORCES] = array(mo.forces, {M, N, 3});
  d[K::MEMBER_VIRIAL] = array(mo.virial, {M, 3, 3});
  d[K::ATOMIC_ENERGY_LOG_VAR] = array(mo.log_var, {M, N});
  d[K::FORCE_COVARIANCE] = array(mo.force_cov, {M, N, 3, 3});
  if (!mo.feature_distance.empty()) d[K::MEMBER_FEATURE_DISTANCE] = array(mo.feature_distance, {M, N});
  d[K::ENERGY] = scalar(drive.energy);
  d[K::ATOMIC_ENERGY] = array(drive.atomic_energy, {N});
  d[K::FORCES] = array(drive.forces, {N, 3});
  d[K::VIRIAL] = array(drive.virial, {3, 3});
  if (compute_atomic_virial) {
    d[K::MEMBER_ATOMIC_VIRIAL] = array(mo.atomic_virial, {M, N, 3, 3});
    d[K::ATOMIC_VIRIAL] = array(drive.atomic_virial, {N, 3, 3});
  }
  d["only_member"] = mo.only_member;
  if (mo.only_member >= 0) return d;  // one member: no uncertainty
  d[K::ATOMIC_FORCE_STD] = array(agg.force_std, {n_local});
  d[K::ATOMIC_FORCE_STD_EPISTEMIC] = array(agg.force_std_epistemic, {n_local});
  d[K::ATOMIC_FORCE_STD_ALEATORIC] = array(agg.force_std_aleatoric, {n_local});
  d[K::ATOMIC_FORCE_STD_RELATIVE] = array(agg.force_std_relative, {n_local});
  d[K::ATOMIC_ENERGY_STD] = array(agg.atomic_energy_std, {n_local});
  d[K::FORCE_COV_EPISTEMIC] = array(agg.force_cov_epistemic, {n_local, 3, 3});
  d[K::FORCE_COV_ALEATORIC] = array(agg.force_cov_aleatoric, {n_local, 3, 3});
  d[K::ENERGY_VAR_EPISTEMIC] = scalar(agg.energy_var_epistemic);
  d[K::ENERGY_VAR_ALEATORIC] = scalar(agg.energy_var_aleatoric);
  d[K::ENERGY_STD] = scalar(agg.energy_std);
  if (!agg.feature_distance.empty()) d[K::ATOMIC_FEATURE_DISTANCE] = array(agg.feature_distance, {n_local});
  return d;
}

// alone: member `driving` by itself (what the pair style evaluates for dynamics member K on
// steps without uncertainty); "mean" cannot be evaluated alone
int64_t only_member_of(int member, bool alone) {
  if (alone && member < 0) throw py::value_error("alone=True needs driving = a member index, not \"mean\"");
  return alone ? member : -1;
}

py::dict evaluate(const Engine &engine, DArr positions, IArr species, IArr edge_index, py::object edge_shifts_obj,
                  py::object n_local_obj, py::object driving, bool compute_atomic_virial, bool alone) {
  namespace K = keys;
  require_shape(positions, K::POSITIONS, {-1, 3});
  const int64_t N = positions.shape(0);
  require_shape(species, K::SPECIES, {N});
  require_shape(edge_index, K::EDGE_INDEX, {2, -1});
  const int64_t E = edge_index.shape(1);
  DArr shifts;
  if (!edge_shifts_obj.is_none()) {
    shifts = edge_shifts_obj.cast<DArr>();
    require_shape(shifts, K::EDGE_SHIFTS, {E, 3});
  }
  const int64_t n_local = n_local_obj.is_none() ? N : n_local_obj.cast<int64_t>();
  const int member = parse_driving(driving, engine.metadata().n_members);

  ModelInputs in;
  in.n_atoms = N;
  in.n_local = n_local;
  in.n_edges = E;
  in.positions = positions.data();
  in.species = species.data();
  in.edge_index = edge_index.data();
  in.edge_shifts = edge_shifts_obj.is_none() ? nullptr : shifts.data();
  in.compute_atomic_virial = compute_atomic_virial;
  in.only_member = only_member_of(member, alone);

  MemberOutputs mo;
  {
    py::gil_scoped_release nogil;
    engine.evaluate(in, mo);
  }
  return results(engine, mo, n_local, member, compute_atomic_virial, nullptr);
}

// Ghost row n_local+g is a copy of local row owner[g] (one process: ghosts are periodic
// images of local atoms). What LAMMPS' forward_comm / reverse_comm do across ranks.
struct OwnerMapHalo : HaloExchange {
  int64_t n_local = 0, n_ghost = 0;
  const int64_t *owner = nullptr;
  void forward(double *features, int64_t width) override {
    for (int64_t g = 0; g < n_ghost; ++g)
      std::memcpy(features + (n_local + g) * width, features + owner[g] * width, sizeof(double) * width);
  }
  void reverse(double *grads, int64_t width) override {
    for (int64_t g = 0; g < n_ghost; ++g) {
      const double *src = grads + (n_local + g) * width;
      double *dst = grads + owner[g] * width;
      for (int64_t c = 0; c < width; ++c) dst[c] += src[c];
    }
  }
};

py::dict evaluate_layered(const Engine &engine, DArr positions, IArr species, IArr edge_index, int64_t n_local,
                          IArr ghost_owner, py::object driving, bool compute_atomic_virial, bool recompute_layers,
                          int64_t recompute_chunk, bool alone) {
  namespace K = keys;
  require_shape(positions, K::POSITIONS, {-1, 3});
  const int64_t N = positions.shape(0);
  require_shape(species, K::SPECIES, {N});
  require_shape(edge_index, K::EDGE_INDEX, {2, -1});
  require_shape(ghost_owner, "ghost_owner", {-1});
  if (n_local < 0 || n_local + ghost_owner.shape(0) != N)
    throw py::value_error("n_local (" + std::to_string(n_local) + ") + len(ghost_owner) (" +
                          std::to_string(ghost_owner.shape(0)) + ") must equal the number of atoms (" +
                          std::to_string(N) + ")");
  const int64_t *owner = ghost_owner.data();
  for (int64_t g = 0; g < N - n_local; ++g)
    if (owner[g] < 0 || owner[g] >= n_local)
      throw py::value_error("ghost_owner[" + std::to_string(g) + "] = " + std::to_string(owner[g]) +
                            " is not a local atom (0.." + std::to_string(n_local - 1) + ")");
  const int member = parse_driving(driving, engine.metadata().n_members);

  ModelInputs in;
  in.n_atoms = N;
  in.n_local = n_local;
  in.n_edges = edge_index.shape(1);
  in.positions = positions.data();
  in.species = species.data();
  in.edge_index = edge_index.data();
  in.compute_atomic_virial = compute_atomic_virial;
  in.recompute_layers = recompute_layers;
  if (recompute_chunk < 0) throw py::value_error("recompute_chunk must be >= 0 (0: the default)");
  in.recompute_chunk = recompute_chunk;
  in.only_member = only_member_of(member, alone);
  OwnerMapHalo halo;
  halo.n_local = n_local;
  halo.n_ghost = N - n_local;
  halo.owner = owner;

  MemberOutputs mo;
  {
    py::gil_scoped_release nogil;
    engine.evaluate_layered(in, halo, mo);
  }
  return results(engine, mo, n_local, member, compute_atomic_virial, owner);
}

// A map {sigma: [...], calibrated: [...]} (or None) into `into`, checked as the metadata loader does.
void set_std_map(const py::object &std_map, const std::string &field, StdCalibration &into) {
  if (std_map.is_none()) return;
  if (!py::isinstance<py::dict>(std_map))
    throw py::value_error(field + " must be None or a dict {'" + keys::META_MAP_SIGMA + "': [...], '" +
                          keys::META_MAP_CALIBRATED + "': [...]}");
  py::dict d = std_map.cast<py::dict>();
  for (const char *key : {keys::META_MAP_SIGMA, keys::META_MAP_CALIBRATED})
    if (!d.contains(key)) throw py::value_error(field + " has no '" + key + "'");
  into.map_sigma = d[keys::META_MAP_SIGMA].cast<std::vector<double>>();
  into.map_calibrated = d[keys::META_MAP_CALIBRATED].cast<std::vector<double>>();
  check_std_map(into.map_sigma, into.map_calibrated, field);  // std::invalid_argument -> ValueError
}

py::array_t<double> calibration_ratio_py(DArr sigma, double scale, py::object std_map) {
  StdCalibration cal;
  cal.scale = scale;
  set_std_map(std_map, "std_map", cal);
  py::array_t<double> out(std::vector<py::ssize_t>(sigma.shape(), sigma.shape() + sigma.ndim()));
  const double *x = sigma.data();
  double *r = out.mutable_data();
  for (py::ssize_t k = 0; k < sigma.size(); ++k) r[k] = cal.ratio(x[k]);
  return out;
}

py::dict aggregate_py(DArr member_forces, DArr force_covariance, DArr member_atomic_energy, DArr member_total_energy,
                      DArr log_var_sum, double n_atoms_total, double force_std_scale, double energy_std_scale,
                      py::object force_std_map, py::object energy_std_map) {
  require_shape(member_forces, keys::MEMBER_FORCES, {-1, -1, 3});
  const int64_t M = member_forces.shape(0), n = member_forces.shape(1);
  require_shape(force_covariance, keys::FORCE_COVARIANCE, {M, n, 3, 3});
  require_shape(member_atomic_energy, keys::MEMBER_ATOMIC_ENERGY, {M, n});
  require_shape(member_total_energy, "member_total_energy", {M});
  require_shape(log_var_sum, "log_var_sum", {M});
  AggregateInput ai;
  ai.n_members = M;
  ai.n_atoms = n;
  ai.stride = n;
  ai.member_forces = member_forces.data();
  ai.force_covariance = force_covariance.data();
  ai.member_atomic_energy = member_atomic_energy.data();
  ai.member_total_energy = member_total_energy.data();
  ai.log_var_sum = log_var_sum.data();
  ai.n_atoms_total = n_atoms_total;
  Calibration cal;
  cal.force.scale = force_std_scale;
  cal.energy.scale = energy_std_scale;
  set_std_map(force_std_map, keys::META_FORCE_STD_MAP, cal.force);
  set_std_map(energy_std_map, keys::META_ENERGY_STD_MAP, cal.energy);
  ai.calibration = &cal;
  AggregateOutput agg;
  aggregate(ai, agg);
  namespace K = keys;
  py::dict d;
  d[K::ATOMIC_FORCE_STD] = array(agg.force_std, {n});
  d[K::ATOMIC_FORCE_STD_EPISTEMIC] = array(agg.force_std_epistemic, {n});
  d[K::ATOMIC_FORCE_STD_ALEATORIC] = array(agg.force_std_aleatoric, {n});
  d[K::ATOMIC_FORCE_STD_RELATIVE] = array(agg.force_std_relative, {n});
  d[K::ATOMIC_ENERGY_STD] = array(agg.atomic_energy_std, {n});
  d[K::FORCE_COV_EPISTEMIC] = array(agg.force_cov_epistemic, {n, 3, 3});
  d[K::FORCE_COV_ALEATORIC] = array(agg.force_cov_aleatoric, {n, 3, 3});
  d[K::ENERGY_VAR_EPISTEMIC] = scalar(agg.energy_var_epistemic);
  d[K::ENERGY_VAR_ALEATORIC] = scalar(agg.energy_var_aleatoric);
  d[K::ENERGY_STD] = scalar(agg.energy_std);
  return d;
}

}  // namespace

PYBIND11_MODULE(_bayesrace_core, m) {
  m.doc() = "bayesrace C++ engine (the code the LAMMPS plugin runs)";
  m.attr("FORMAT_VERSION") = kFormatVersion;
  m.attr("TORCH_VERSION") = torch_build_version();
  m.attr("BAYESRACE_VERSION") = bayesrace_build_version();

  py::class_<Engine>(m, "Engine")
      .def(py::init([](const std::string &path, const std::string &device, int num_threads) {
             EngineOptions o;
             o.device = device;
             o.num_threads = num_threads;
             return std::make_unique<Engine>(path, o);
           }),
           py::arg("path"), py::arg("device") = "cpu", py::arg("num_threads") = 1,
           "Load a deployable. num_threads sets torch's intra-op threads for the whole process "
           "(1 by default, as in LAMMPS; 0 leaves it unchanged).")
      .def_property_readonly("metadata",
                             [](const Engine &e) {
                               return to_python(parse_json_document(e.metadata().raw_json, e.path()));
                             })
      .def_property_readonly("warnings", &Engine::warnings)
      .def_property_readonly("path", &Engine::path)
      .def_property_readonly("device", &Engine::device)
      .def("__repr__", [](const Engine &e) { return "<bayesrace Engine: " + e.describe() + ">"; })
      .def("evaluate", &evaluate, py::arg(keys::POSITIONS), py::arg(keys::SPECIES), py::arg(keys::EDGE_INDEX),
           py::arg(keys::EDGE_SHIFTS) = py::none(), py::arg("n_local") = py::none(), py::arg("driving") = "mean",
           py::arg("compute_atomic_virial") = false, py::arg("alone") = false,
           "Run all members and aggregate. Returns a dict of float64 numpy arrays: raw member outputs, "
           "driving energy/forces/virial (driving='mean' or a member index), and calibrated uncertainties "
           "over atoms 0..n_local-1 (rows beyond n_local are not folded back onto their owners). "
           "alone=True with driving=K: member K by itself when the deployable can (what pair_style bayesrace runs for "
           "'dynamics member K' on steps without uncertainty): member arrays of that member only, no uncertainties; "
           "only_member says which member the arrays hold (-1: every member).")
      .def("evaluate_layered", &evaluate_layered, py::arg(keys::POSITIONS), py::arg(keys::SPECIES),
           py::arg(keys::EDGE_INDEX), py::arg("n_local"), py::arg("ghost_owner"), py::arg("driving") = "mean",
           py::arg("compute_atomic_virial") = false, py::arg("recompute_layers") = false, py::arg("recompute_chunk") = 0,
           py::arg("alone") = false,
           "Layer mode (what pair_style bayesrace ... halo layer runs): rows 0..n_local-1 local, ghost row "
           "n_local+g a periodic image of local row ghost_owner[g] (positions carry the image shift); every edge "
           "centre < n_local. Node features are copied to the ghost rows after every layer and their gradients "
           "added back onto the owners. Returns the dict of evaluate(): member and driving arrays with N rows "
           "(ghost rows of the forces and atomic virial not folded), uncertainties over the local atoms with the "
           "ghost member forces folded onto their owners. recompute_layers: keep no layer's graph in the forward "
           "pass, run each layer again in the backward pass, in pieces of at most recompute_chunk (edge, member) "
           "pairs (0: the default), so memory follows a piece, not the domain; one more forward pass.")
      .def_property_readonly("layer_widths", &Engine::layer_widths,
                             "[w_0..w_K]: the widths of the node-feature rows exchanged (M * d_k when the "
                             "deployable evaluates its members together; empty: no layer mode)");

  m.def("aggregate", &aggregate_py, py::arg(keys::MEMBER_FORCES), py::arg(keys::FORCE_COVARIANCE),
        py::arg(keys::MEMBER_ATOMIC_ENERGY), py::arg("member_total_energy"), py::arg("log_var_sum"),
        py::arg("n_atoms_total"), py::arg(keys::META_FORCE_STD_SCALE) = 1.0, py::arg(keys::META_ENERGY_STD_SCALE) = 1.0,
        py::arg(keys::META_FORCE_STD_MAP) = py::none(), py::arg(keys::META_ENERGY_STD_MAP) = py::none(),
        "The C++ aggregation formulas on given member arrays (same function as the LAMMPS plugin), calibrated "
        "by the scales and optional maps {'sigma': [...], 'calibrated': [...]} of the metadata's calibration.");
  m.def("calibration_ratio", &calibration_ratio_py, py::arg(keys::META_MAP_SIGMA), py::arg("scale") = 1.0,
        py::arg("std_map") = py::none(),
        "r(σ) = scale·g(σ)/σ elementwise: the factor the C++ calibration applies to a σ (r(0) = scale·y_1/x_1).");
}
