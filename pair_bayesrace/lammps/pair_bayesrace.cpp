/* ----------------------------------------------------------------------
   bayesrace LAMMPS plugin: pair_style bayesrace (GPL-2.0, as LAMMPS)
------------------------------------------------------------------------- */

#include "pair_bayesrace.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "force.h"
#include "memory.h"
#include "neigh_list.h"
#include "neighbor.h"
#include "update.h"

#include "core/aggregate.h"
#include "core/engine.h"

#include <climits>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

using namespace LAMMPS_NS;

namespace {

// rank of this process among the ranks of its node (for cuda device selection)
int node_local_rank(MPI_Comm world) {
  MPI_Comm node;
  int me = 0, lr = 0;
  MPI_Comm_rank(world, &me);
  MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, me, MPI_INFO_NULL, &node);
  MPI_Comm_rank(node, &lr);
  MPI_Comm_free(&node);
  return lr;
}

// libtorch allocates and frees tensors of tens to hundreds of MB in every step (edge
// features, autograd buffers). glibc serves blocks that large with mmap and returns them
// with munmap, so every step faulted the same memory in again: measured on 10^4 atoms,
// more system time than compute. Served from the heap and never trimmed, the pages of one
// step are reused by the next. Once per process; the process keeps its peak heap.
// Trimming is off entirely (-1, as documented in mallopt(3)): a threshold of INT_MAX still
// trimmed, since one step frees more than 2 GB at 10^4 atoms with 4 members.
void keep_large_blocks_on_the_heap()
{
#if defined(__GLIBC__)
  static bool done = false;
  if (done) return;
  done = true;
  mallopt(M_MMAP_MAX, 0);
  mallopt(M_TRIM_THRESHOLD, -1);
#endif
}

// closer than this (Å, as bayesrace.data) two atoms count as one position
constexpr double MIN_DISTANCE = 1e-8;

}    // namespace

/* ---------------------------------------------------------------------- */

PairBayesRace::PairBayesRace(LAMMPS *lmp) :
    Pair(lmp), device("cpu"), driving_member(-1), uq_every(0), n_members(0), econv(1.0), cut_model(0.0),
    cutsq_model(0.0), halo_layer(false), halo_auto(true), recompute_layers(false), moving(Moving::NOTHING), comm_rows(nullptr), comm_width(0), uq(nullptr),
    uq_nmax(0), uq_step(-1), energy_sigma(0.0), energy_var_epi(0.0), energy_var_ale(0.0), energy_n_atoms(0.0), halo(this)
{
  single_enable = 0;
  restartinfo = 0;
  one_coeff = 1;
  manybody_flag = 1;
  ghostneigh = 1;
  no_virial_fdotr_compute = 1;
  centroidstressflag = CENTROID_NOTAVAIL;
  comm_reverse = 0;
  keep_large_blocks_on_the_heap();
}

PairBayesRace::~PairBayesRace()
{
  if (copymode) return;
  memory->destroy(uq);
  if (allocated) {
    memory->destroy(setflag);
    memory->destroy(cutsq);
    memory->destroy(cutghost);
  }
}

void PairBayesRace::allocate()
{
  allocated = 1;
  const int n = atom->ntypes + 1;
  memory->create(setflag, n, n, "pair:setflag");
  memory->create(cutsq, n, n, "pair:cutsq");
  memory->create(cutghost, n, n, "pair:cutghost");
  for (int i = 0; i < n; i++)
    for (int j = 0; j < n; j++) {
      setflag[i][j] = 0;
      cutsq[i][j] = cutghost[i][j] = 0.0;
    }
}

/* ----------------------------------------------------------------------
   pair_style bayesrace [device cpu|cuda|cuda:K] [dynamics mean|member K] [uncertainty every N]
                        [halo shell|layer] [recompute yes|no]
------------------------------------------------------------------------- */

void PairBayesRace::settings(int narg, char **arg)
{
  device = "cpu";
  driving_member = -1;
  uq_every = 0;
  halo_layer = false;
  halo_auto = true;  // layer mode when the model has per-layer methods, else shell
  recompute_layers = false;
  bool recompute_given = false;
  int iarg = 0;
  while (iarg < narg) {
    const std::string key = arg[iarg];
    if (key == "device") {
      if (iarg + 2 > narg) error->all(FLERR, "pair_style bayesrace: 'device' needs a value: cpu, cuda or cuda:K");
      device = arg[iarg + 1];
      if (device != "cpu" && device != "cuda" && device.rfind("cuda:", 0) != 0)
        error->all(FLERR, "pair_style bayesrace: unknown device '" + device + "' (expected cpu, cuda or cuda:K)");
      iarg += 2;
    } else if (key == "dynamics") {
      if (iarg + 2 > narg)
        error->all(FLERR, "pair_style bayesrace: 'dynamics' needs 'mean' or 'member K'");
      const std::string mode = arg[iarg + 1];
      if (mode == "mean") {
        driving_member = -1;
        iarg += 2;
      } else if (mode == "member") {
        if (iarg + 3 > narg) error->all(FLERR, "pair_style bayesrace: 'dynamics member' needs a member index K");
        driving_member = utils::inumeric(FLERR, arg[iarg + 2], false, lmp);
        if (driving_member < 0) error->all(FLERR, "pair_style bayesrace: 'dynamics member K' needs K >= 0");
        iarg += 3;
      } else {
        error->all(FLERR, "pair_style bayesrace: unknown dynamics '" + mode + "' (expected 'mean' or 'member K')");
      }
    } else if (key == "uncertainty") {
      if (iarg + 3 > narg || std::strcmp(arg[iarg + 1], "every") != 0)
        error->all(FLERR, "pair_style bayesrace: expected 'uncertainty every N'");
      uq_every = utils::inumeric(FLERR, arg[iarg + 2], false, lmp);
      if (uq_every < 1) error->all(FLERR, "pair_style bayesrace: 'uncertainty every N' needs N >= 1");
      iarg += 3;
    } else if (key == "halo") {
      const std::string mode = iarg + 1 < narg ? arg[iarg + 1] : "";
      if (mode != "shell" && mode != "layer")
        error->all(FLERR, "pair_style bayesrace: 'halo' needs 'shell' or 'layer', got '{}'", mode);
      halo_layer = mode == "layer";
      halo_auto = false;
      iarg += 2;
    } else if (key == "recompute") {
      const std::string value = iarg + 1 < narg ? arg[iarg + 1] : "";
      if (value != "yes" && value != "no")
        error->all(FLERR, "pair_style bayesrace: 'recompute' needs 'yes' or 'no', got '{}'", value);
      recompute_layers = value == "yes";
      recompute_given = true;
      iarg += 2;
    } else {
      error->all(FLERR, "pair_style bayesrace: unknown keyword '" + key +
                            "' (expected device, dynamics, uncertainty, halo or recompute)");
    }
  }
  if (recompute_given && !halo_auto && !halo_layer)
    error->all(FLERR, "pair_style bayesrace: 'recompute' applies to 'halo layer' only (halo shell evaluates the "
                      "model in one piece)");
}

/* ----------------------------------------------------------------------
   pair_coeff * * model.pt E1 ... En
------------------------------------------------------------------------- */

void PairBayesRace::coeff(int narg, char **arg)
{
  if (!allocated) allocate();
  const int ntypes = atom->ntypes;
  if (narg < 3 || std::strcmp(arg[0], "*") != 0 || std::strcmp(arg[1], "*") != 0)
    error->all(FLERR, "pair_coeff for bayesrace must be 'pair_coeff * * model.pt E1 ... En'");
  if (narg != 3 + ntypes)
    error->all(FLERR, "pair_coeff * * model.pt: expected {} element names (one per atom type, NULL to skip a type), got {}",
               ntypes, narg - 3);

  // load on every rank; agree on success so that the error is collective
  std::string msg;
  std::unique_ptr<bayesrace::Engine> loaded;
  try {
    bayesrace::EngineOptions opts;
    opts.device = device;
    opts.num_threads = 1;
    opts.local_rank = node_local_rank(world);
    loaded = std::make_unique<bayesrace::Engine>(arg[2], opts);
  } catch (std::exception &e) {
    msg = e.what();
  }
  int ok = msg.empty() ? 1 : 0, all_ok = 0;
  MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, world);
  if (!all_ok) {
    if (msg.empty()) msg = std::string("loading '") + arg[2] + "' failed on another MPI rank";
    error->all(FLERR, "pair_style bayesrace: " + msg);
  }
  engine = std::move(loaded);
  const auto &meta = engine->metadata();

  type_map.assign(ntypes + 1, -1);
  int nmapped = 0;
  std::string elements;
  for (const auto &t : meta.type_names) elements += " " + t;
  for (int i = 1; i <= ntypes; i++) {
    const std::string el = arg[2 + i];
    if (el == "NULL") continue;
    const int s = meta.species_index(el);
    if (s < 0)
      error->all(FLERR, "pair_coeff: element '{}' given for atom type {} is not in {} (model elements:{})", el, i,
                 arg[2], elements);
    type_map[i] = s;
    nmapped++;
  }
  if (nmapped == 0) error->all(FLERR, "pair_coeff: every atom type is NULL; map at least one type to an element");
  for (int i = 1; i <= ntypes; i++)
    for (int j = 1; j <= ntypes; j++) setflag[i][j] = (type_map[i] >= 0 && type_map[j] >= 0) ? 1 : 0;

  n_members = meta.n_members;
  if (driving_member >= n_members)
    error->all(FLERR, "pair_style bayesrace: dynamics member {} out of range, the model has {} members (0..{})",
               driving_member, n_members, n_members - 1);
  cut_model = meta.cutoff;
  cutsq_model = cut_model * cut_model;
  comm_reverse = 3 * n_members;

  if (comm->me == 0) {
    utils::logmesg(lmp, "pair bayesrace: " + engine->describe() + "\n");
    for (const auto &w : engine->warnings()) error->warning(FLERR, "pair bayesrace: " + w);
  }
}

/* ---------------------------------------------------------------------- */

void PairBayesRace::init_style()
{
  if (!engine) error->all(FLERR, "pair_style bayesrace: no model loaded (missing pair_coeff * * model.pt ...)");
  if (force->newton_pair == 0)
    error->all(FLERR, "pair_style bayesrace requires newton pair on (ghost forces and member forces are "
                      "reverse-communicated); remove 'newton off' / use 'newton on'");
  const std::string units = update->unit_style;
  if (units == "metal") {
    econv = 1.0;
  } else if (units == "real") {
    econv = utils::get_conversion_factor(utils::ENERGY, utils::METAL2REAL);
  } else {
    error->all(FLERR, "pair_style bayesrace supports units metal (native: eV, Å) and real (kcal/mol), not '{}'",
               units);
  }

  init_halo();
  if (driving_member >= 0 && comm->me == 0)
    utils::logmesg(lmp, engine->evaluates_one_member(halo_layer, recompute_layers)
                            ? "pair bayesrace: dynamics member {}: that member alone on steps without uncertainty, "
                              "every member on steps that report it\n"
                            : "pair bayesrace: dynamics member {}: every member on every step (this deployable or "
                              "mode cannot evaluate one member alone)\n",
                   driving_member);
}

double PairBayesRace::init_one(int i, int j)
{
  if (setflag[i][j] == 0)
    error->all(FLERR,
               "pair_style bayesrace: atom types {} and {} are not both mapped to model elements; NULL types "
               "need pair_style hybrid/overlay",
               i, j);
  cutghost[i][j] = cutghost[j][i] = cut_model;
  return cut_model;
}

/* ---------------------------------------------------------------------- */

void PairBayesRace::compute(int eflag, int vflag)
{
  ev_init(eflag, vflag);
  if (!engine) error->all(FLERR, "pair_style bayesrace: no model loaded");

  double **x = atom->x;
  double **f = atom->f;
  const int *type = atom->type;
  const int nlocal = atom->nlocal;
  const int nall = nlocal + atom->nghost;
  const int M = n_members;

  // model atoms: mapped local atoms first, then mapped ghosts
  lmp2model.assign(nall, -1);
  model2lmp.clear();
  int nl = 0;
  for (int i = 0; i < nall; i++) {
    if (type_map[type[i]] < 0) continue;
    lmp2model[i] = static_cast<int>(model2lmp.size());
    model2lmp.push_back(i);
    if (i < nlocal) nl++;
  }
  const int N = static_cast<int>(model2lmp.size());
  pos.resize(3 * static_cast<size_t>(N));
  spec.resize(N);
  for (int k = 0; k < N; k++) {
    const int i = model2lmp[k];
    pos[3 * k] = x[i][0];
    pos[3 * k + 1] = x[i][1];
    pos[3 * k + 2] = x[i][2];
    spec[k] = type_map[type[i]];
  }

  // directed edges among local and ghost atoms (explicit images: zero shifts); in layer
  // mode the list has no ghost centres (gnum = 0)
  edges.clear();
  edges_j.clear();
  // contact ratios only on steps that report uncertainty (one sqrt per edge of a local centre)
  const bayesrace::Metadata &meta = engine->metadata();
  const bool contacts_now = meta.has_contacts() && uncertainty_wanted(eflag_atom);
  if (contacts_now) contact.assign(nl, meta.no_contact_ratio);
  const int ntot = list->inum + list->gnum;
  for (int ii = 0; ii < ntot; ii++) {
    const int i = list->ilist[ii];
    const int mi = lmp2model[i];
    if (mi < 0) continue;
    const int *jlist = list->firstneigh[i];
    const int jnum = list->numneigh[i];
    for (int jj = 0; jj < jnum; jj++) {
      const int j = jlist[jj] & NEIGHMASK;
      const int mj = lmp2model[j];
      if (mj < 0) continue;
      const double dx = x[j][0] - x[i][0], dy = x[j][1] - x[i][1], dz = x[j][2] - x[i][2];
      const double rsq = dx * dx + dy * dy + dz * dz;
      if (rsq < cutsq_model) {
        // the edge direction is undefined: the model would return NaN, with zero σ
        if (rsq < MIN_DISTANCE * MIN_DISTANCE)
          error->one(FLERR, "pair_style bayesrace: atoms {} and {} are {:.3g} Å apart (at least {:.0e} expected): "
                     "atoms on one position give NaN energies and forces", atom->tag[i], atom->tag[j],
                     std::sqrt(rsq), MIN_DISTANCE);
        if (contacts_now && mi < nl)
          contact[mi] = std::min(contact[mi], std::sqrt(rsq) / meta.shortest_contact(spec[mi], spec[mj]));
        edges.push_back(mi);
        edges_j.push_back(mj);
      }
    }
  }
  const int64_t E = static_cast<int64_t>(edges.size());
  edges.insert(edges.end(), edges_j.begin(), edges_j.end());

  bayesrace::MemberOutputs &mo = member_out;
  // no local atoms: no local energy, nothing to add; but layer mode's exchanges are collective
  const bool evaluated = nl > 0 || halo_layer;
  if (evaluated) {
    bayesrace::ModelInputs in;
    in.n_atoms = N;
    in.n_local = nl;
    in.n_edges = E;
    in.positions = pos.data();
    in.species = spec.data();
    in.edge_index = edges.data();
    in.edge_shifts = nullptr;
    in.compute_atomic_virial = vflag_atom != 0;
    in.recompute_layers = recompute_layers;
    // dynamics member K on a step without uncertainty: member K alone (M times cheaper)
    in.only_member = (driving_member >= 0 && !uncertainty_wanted(eflag_atom)) ? driving_member : -1;
    bayesrace::DrivingOutputs &drive = driving_out;
    try {
      if (halo_layer)
        engine->evaluate_layered(in, halo, mo);
      else
        engine->evaluate(in, mo);
      bayesrace::select_driving(mo, driving_member, drive);
    } catch (std::exception &e) {
      error->one(FLERR, std::string("pair_style bayesrace: model evaluation failed: ") + e.what());
    }

    for (int k = 0; k < N; k++) {
      const int i = model2lmp[k];
      f[i][0] += econv * drive.forces[3 * k];
      f[i][1] += econv * drive.forces[3 * k + 1];
      f[i][2] += econv * drive.forces[3 * k + 2];
    }
    if (eflag_global) eng_vdwl += econv * drive.energy;
    if (eflag_atom)
      for (int k = 0; k < nl; k++) eatom[model2lmp[k]] += econv * drive.atomic_energy[k];
    if (vflag_global) {
      const double *W = drive.virial;
      virial[0] += econv * W[0];
      virial[1] += econv * W[4];
      virial[2] += econv * W[8];
      virial[3] += econv * W[1];
      virial[4] += econv * W[2];
      virial[5] += econv * W[5];
    }
    if (vflag_atom) {
      for (int k = 0; k < N; k++) {
        const double *W = &drive.atomic_virial[9 * static_cast<size_t>(k)];
        double *v = vatom[model2lmp[k]];
        v[0] += econv * W[0];
        v[1] += econv * W[4];
        v[2] += econv * W[8];
        v[3] += econv * W[1];
        v[4] += econv * W[2];
        v[5] += econv * W[5];
      }
    }
  }

  if (!uncertainty_wanted(eflag_atom)) return;

  // ---- uncertainty: fold ghost member forces onto their owners, reduce global sums
  const size_t stride = 3 * static_cast<size_t>(M);
  member_f.assign(static_cast<size_t>(nall) * stride, 0.0);
  if (evaluated)
    for (int k = 0; k < N; k++) {
      double *dst = &member_f[model2lmp[k] * stride];
      for (int m = 0; m < M; m++)
        for (int a = 0; a < 3; a++) dst[3 * m + a] = mo.forces[(static_cast<size_t>(m) * N + k) * 3 + a];
    }
  communicate(Moving::MEMBER_FORCES, member_f.data(), 3 * M, true);

  std::vector<double> &red = reduced;
  red.assign(2 * M + 1, 0.0);
  if (evaluated)
    for (int m = 0; m < M; m++) {
      red[m] = mo.energy[m];
      double s = 0.0;
      for (int k = 0; k < nl; k++) s += mo.log_var[static_cast<size_t>(m) * N + k];
      red[M + m] = s;
    }
  red[2 * M] = nl;
  MPI_Allreduce(MPI_IN_PLACE, red.data(), 2 * M + 1, MPI_DOUBLE, MPI_SUM, world);

  agg_forces.assign(static_cast<size_t>(M) * N * 3, 0.0);
  for (int k = 0; k < nl; k++) {
    const double *src = &member_f[model2lmp[k] * stride];
    for (int m = 0; m < M; m++)
      for (int a = 0; a < 3; a++) agg_forces[(static_cast<size_t>(m) * N + k) * 3 + a] = src[3 * m + a];
  }
  bayesrace::AggregateInput ai;
  ai.n_members = M;
  ai.n_atoms = nl;
  ai.stride = N;
  ai.member_forces = agg_forces.data();
  ai.force_covariance = mo.force_cov.data();
  ai.member_atomic_energy = mo.atomic_energy.data();
  ai.member_total_energy = red.data();
  ai.log_var_sum = red.data() + M;
  ai.n_atoms_total = red[2 * M];
  ai.calibration = &engine->metadata().calibration;
  // the Engine checked that a model with a feature density returned every member's distances
  ai.member_feature_distance = has_feature_distance() && nl > 0 ? mo.feature_distance.data() : nullptr;
  bayesrace::AggregateOutput &out = aggregate_out;
  try {
    bayesrace::aggregate(ai, out);
  } catch (std::exception &e) {
    error->one(FLERR, std::string("pair_style bayesrace: aggregation failed: ") + e.what());
  }

  if (atom->nmax > uq_nmax) {
    uq_nmax = atom->nmax;
    memory->destroy(uq);
    memory->create(uq, uq_nmax, NCOLS, "pair:bayesrace:uq");
  }
  mapped_local.assign(nlocal, 0);
  for (int i = 0; i < nlocal; i++)
    for (int c = 0; c < NCOLS; c++) uq[i][c] = 0.0;
  for (int k = 0; k < nl; k++) {
    const int i = model2lmp[k];
    mapped_local[i] = 1;
    uq[i][0] = econv * out.force_std[k];
    uq[i][1] = econv * out.force_std_epistemic[k];
    uq[i][2] = econv * out.force_std_aleatoric[k];
    uq[i][3] = econv * out.atomic_energy_std[k];
    uq[i][4] = contacts_now ? contact[k] : -1.0;
    uq[i][5] = out.force_std_relative[k];  // unit-free
    uq[i][6] = out.feature_distance.empty() ? -1.0 : out.feature_distance[k];  // -1: no feature density
  }
  energy_sigma = econv * out.energy_std;
  energy_var_epi = econv * econv * out.energy_var_epistemic;
  energy_var_ale = econv * econv * out.energy_var_aleatoric;
  energy_n_atoms = ai.n_atoms_total;
  uq_step = update->ntimestep;
}

/* ---------------------------------------------------------------------- */

double PairBayesRace::memory_usage()
{
  double bytes = Pair::memory_usage();
  bytes += sizeof(double) * (member_f.capacity() + agg_forces.capacity() + pos.capacity() + halo_rows.capacity());
  bytes += sizeof(int64_t) * (edges.capacity() + edges_j.capacity() + spec.capacity());
  bytes += sizeof(double) * (NCOLS * static_cast<double>(uq_nmax) + contact.capacity());
  return bytes;
}
