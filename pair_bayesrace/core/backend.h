// The one small interface between the engine and the code that runs a deployable:
// TorchScript (torch::jit; shell and layer mode) and AOTInductor packages (.pt2, compiled
// code; shell mode only). The engine picks one by the file's content (deployable_format).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace bayesrace {

// Plain-array inputs of the deployable's forward() (all host memory, float64 / int64).
struct ModelInputs {
  int64_t n_atoms = 0;  // N = local + ghost/image atoms
  int64_t n_local = 0;  // atoms 0..n_local-1 are summed into the member energies
  int64_t n_edges = 0;  // E directed edges
  const double *positions = nullptr;    // [N, 3] Å
  const int64_t *species = nullptr;     // [N] model species index
  const int64_t *edge_index = nullptr;  // [2, E]: E centres i, then E neighbours j
  const double *edge_shifts = nullptr;  // [E, 3] Cartesian Å, or nullptr for zeros
  bool compute_atomic_virial = false;
  // layer mode: keep no layer's autograd graph during the forward pass and run each layer
  // again in the backward pass (peak memory of one layer instead of all, one more forward)
  bool recompute_layers = false;
  // with recompute_layers: at most this many (edge, member) pairs per piece of a layer
  // (0: the default, kRecomputeChunk); the pieces are groups of consecutive local centres
  int64_t recompute_chunk = 0;
  // >= 0: only this member's outputs are needed (dynamics member K on a step without
  // uncertainty). A backend that can evaluates it alone (TorchScript: forward_member in shell
  // mode, the per-member methods in layer mode without recompute); others evaluate every member.
  int64_t only_member = -1;
};

constexpr int64_t kRecomputeChunk = int64_t(1) << 18;

// Raw per-member outputs, float64, member-major (C order).
struct MemberOutputs {
  int64_t n_members = 0;
  int64_t n_atoms = 0;
  int64_t only_member = -1;           // >= 0: the outputs are of this member alone (n_members 1)
  std::vector<double> energy;         // [M]
  std::vector<double> atomic_energy;  // [M, N]
  std::vector<double> forces;         // [M, N, 3]
  std::vector<double> virial;         // [M, 3, 3]
  std::vector<double> atomic_virial;  // [M, N, 3, 3] or empty
  std::vector<double> log_var;        // [M, N]
  std::vector<double> force_cov;      // [M, N, 3, 3]
  // [M, N]: each member's feature distance (Mahalanobis, to its training atoms' features);
  // empty when the deployable carries no feature density (or exported before it existed)
  std::vector<double> feature_distance;
};

// Moves per-atom rows between the atoms of a domain and their copies (ghosts). Layer mode
// (see evaluate_layered) calls it between message-passing layers. The LAMMPS pair style
// implements it with forward_comm / reverse_comm, the binding from a ghost -> owner map.
// Every call is collective in LAMMPS: all ranks make the same calls in the same order.
struct HaloExchange {
  virtual ~HaloExchange() = default;
  // features [n_atoms, width] row-major; rows < n_local are set: fill the ghost rows with
  // copies of their owners' rows
  virtual void forward(double *features, int64_t width) = 0;
  // grads [n_atoms, width]: add every ghost row onto its owner's row (rows < n_local)
  virtual void reverse(double *grads, int64_t width) = 0;
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Fills `out` (resizing its vectors); throws std::runtime_error on failure.
  virtual void evaluate(const ModelInputs &in, MemberOutputs &out) = 0;
  // Layer mode: every edge centre < n_local (neighbours local or ghost), ghosts one cutoff
  // deep; node features go forward through `halo` after every layer but the last and their
  // gradients come back in reverse. Fills `out` like evaluate(): energy = local sum,
  // atomic_energy / log_var / force_cov with ghost rows zero, forces on local and ghost
  // rows (ghost rows still to be added onto their owners), virial, atomic virial.
  // Makes exactly G * (n_layers - 1) forward and as many reverse calls on `halo`, also
  // when n_local == 0 (those calls are collective in LAMMPS): G = 1 when the deployable
  // evaluates all members in one pass (embed_all, layer_all, head_all), else G = M.
  virtual void evaluate_layered(const ModelInputs &in, HaloExchange &halo, MemberOutputs &out) = 0;
  // The widths of the node-feature rows exchanged, [w_0, ..., w_K]: M * [d_0, ..., d_K] when
  // all members go together, else the deployable's layer_widths(); empty if it has no
  // per-layer methods (a deployable exported before layer mode existed).
  virtual std::vector<int64_t> layer_widths() const = 0;
  // whether ModelInputs::only_member is honoured (one member evaluated alone) in this mode
  virtual bool evaluates_one_member(bool layer_mode, bool recompute_layers) const = 0;
  // why layer_widths() is empty (a sentence for an error message), else ""
  virtual std::string layer_mode_problem() const = 0;
  virtual std::string describe() const = 0;
};

// Load a deployable: returns the backend and the text of its metadata.json.
// Throws std::runtime_error (missing file, not a TorchScript archive, no metadata.json).
std::unique_ptr<Backend> load_torchscript(const std::string &path, std::string &metadata_json);

// Called once the metadata has been validated: device ("cpu", "cuda", "cuda:K"; plain
// "cuda" picks GPU local_rank % device_count), dtype ("float64"|"float32"), number of
// members expected in the outputs.
void configure_torchscript(Backend &backend, const std::string &device, const std::string &dtype,
                           int64_t n_members, int local_rank);

struct Metadata;

// keys::FORMAT_AOTI when `path` is an AOTInductor package (a zip archive holding the record
// archive_format = "pt2"), else keys::FORMAT_TORCHSCRIPT (also for unreadable files: the
// TorchScript loader then says what is wrong).
std::string deployable_format(const std::string &path);

// Reads the metadata of a .pt2 (no compiled code is loaded yet). Throws std::runtime_error.
std::unique_ptr<Backend> load_aoti(const std::string &path, std::string &metadata_json);

// Called once the metadata has been validated: checks what the compiled code needs (device
// cpu, the torch version it was compiled with, machine and CPU ISA, input and output keys,
// models) and only then loads the compiled code.
void configure_aoti(Backend &backend, const Metadata &meta, const std::string &device);

}  // namespace bayesrace
