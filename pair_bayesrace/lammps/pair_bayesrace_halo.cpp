/* ----------------------------------------------------------------------
   bayesrace LAMMPS plugin: pair_style bayesrace (GPL-2.0, as LAMMPS)

   The halo of a subdomain, methods of PairBayesRace: how deep the ghosts reach and what
   the pair communicates.
   halo shell: ghosts n_layers*cutoff + skin deep (the communication cutoff is raised).
   halo layer: ghosts cutoff + skin deep (LAMMPS' own cutoff); the pair is the core's
     bayesrace::HaloExchange (PairBayesRace::Halo): after every message-passing layer the node features of the
     owners are copied onto their ghosts (forward_comm), and in the backward pass the
     gradients of the ghost rows are added onto their owners (reverse_comm).
   Both: per-member ghost forces go back to their owners (reverse_comm, 3M per atom).
------------------------------------------------------------------------- */

#include "pair_bayesrace.h"

#include "atom.h"
#include "comm.h"
#include "error.h"
#include "neighbor.h"

#include "core/engine.h"

#include <algorithm>
#include <cstring>

using namespace LAMMPS_NS;

/* ---------------------------------------------------------------------- */

void PairBayesRace::init_halo()
{
  const auto &meta = engine->metadata();
  comm_forward = 0;
  comm_reverse = 3 * n_members;
  if (halo_auto) {
    halo_layer = !engine->layer_widths().empty();
    if (!halo_layer && comm->me == 0)
      utils::logmesg(lmp, "pair bayesrace: halo shell, because the model cannot run layer mode: {}\n",
                     engine->layer_mode_problem());
  }
  if (recompute_layers && !halo_layer)
    error->all(FLERR, "pair_style bayesrace: 'recompute yes' needs halo layer, and the model {} cannot run it: {}",
               engine->path(), engine->layer_mode_problem());
  ghostneigh = halo_layer ? 0 : 1;  // layer mode: neighbours of local atoms only; read by comm->init()
  if (!halo_layer) {
    neighbor->add_request(this, NeighConst::REQ_FULL | NeighConst::REQ_GHOST);
    // exact ghost shell: an atom's energy depends on atoms up to n_layers * cutoff away
    const double range = meta.interaction_range() + neighbor->skin;
    if (comm->cutghostuser < range) {
      comm->cutghostuser = range;
      if (comm->me == 0)
        utils::logmesg(lmp,
                       "pair bayesrace: communication cutoff set to {:.6g} (n_layers {} x cutoff {:.6g} + skin)\n",
                       range, meta.n_layers, cut_model);
    }
    return;
  }

  const std::vector<int64_t> &widths = engine->layer_widths();
  if (widths.empty())
    error->all(FLERR, "pair_style bayesrace halo layer: the model {} cannot run layer mode: {} (or use 'halo shell')",
               engine->path(), engine->layer_mode_problem());
  // h_1 .. h_{K-1} cross ranks (h_0 depends on species only, h_K feeds local readouts only);
  // LAMMPS sizes its buffers from these maxima when comm->init() runs after this
  int widest = 0;
  for (size_t k = 1; k + 1 < widths.size(); k++) widest = std::max(widest, static_cast<int>(widths[k]));
  comm_forward = widest;
  comm_reverse = std::max(3 * n_members, widest);
  neighbor->add_request(this, NeighConst::REQ_FULL);
  if (comm->me == 0)
    utils::logmesg(lmp,
                   "pair bayesrace: halo layer: ghosts one cutoff ({:.6g}) + skin deep, node features (up to {} "
                   "values per atom) exchanged after each of {} layers\n",
                   cut_model, widest, meta.n_layers);
}

/* ----------------------------------------------------------------------
   Move rows [nall][width] of `rows` (indexed by LAMMPS atom): forward (owners -> ghosts)
   or reverse (ghosts added onto owners). Collective.
------------------------------------------------------------------------- */

void PairBayesRace::communicate(Moving what, double *rows, int width, bool reverse_direction)
{
  moving = what;
  comm_rows = rows;
  comm_width = width;
  if (reverse_direction) {
    comm_reverse = width;
    comm->reverse_comm(this, width);
  } else {
    comm_forward = width;
    comm->forward_comm(this, width);
  }
  moving = Moving::NOTHING;
  comm_rows = nullptr;
}

// model rows < nl are the mapped local atoms, rows >= nl the mapped ghosts (model2lmp)
void PairBayesRace::halo_forward(double *features, int64_t width)
{
  const int w = static_cast<int>(width);
  const size_t nall = static_cast<size_t>(atom->nlocal + atom->nghost);
  const int N = static_cast<int>(model2lmp.size());
  int nl = 0;
  while (nl < N && model2lmp[nl] < atom->nlocal) nl++;
  halo_rows.assign(nall * w, 0.0);    // NULL-typed atoms send zero rows
  for (int k = 0; k < nl; k++)
    std::memcpy(&halo_rows[static_cast<size_t>(model2lmp[k]) * w], features + static_cast<size_t>(k) * w,
                sizeof(double) * w);
  communicate(Moving::FEATURES, halo_rows.data(), w, false);
  for (int k = nl; k < N; k++)
    std::memcpy(features + static_cast<size_t>(k) * w, &halo_rows[static_cast<size_t>(model2lmp[k]) * w],
                sizeof(double) * w);
}

void PairBayesRace::halo_reverse(double *grads, int64_t width)
{
  const int w = static_cast<int>(width);
  const size_t nall = static_cast<size_t>(atom->nlocal + atom->nghost);
  const int N = static_cast<int>(model2lmp.size());
  halo_rows.assign(nall * w, 0.0);
  for (int k = 0; k < N; k++)
    std::memcpy(&halo_rows[static_cast<size_t>(model2lmp[k]) * w], grads + static_cast<size_t>(k) * w,
                sizeof(double) * w);
  communicate(Moving::FEATURE_GRADIENTS, halo_rows.data(), w, true);
  for (int k = 0; k < N && model2lmp[k] < atom->nlocal; k++)
    std::memcpy(grads + static_cast<size_t>(k) * w, &halo_rows[static_cast<size_t>(model2lmp[k]) * w],
                sizeof(double) * w);
}

/* ----------------------------------------------------------------------
   pack / unpack: features (forward), feature gradients and member forces (reverse) are
   all rows of comm_rows, comm_width values each
------------------------------------------------------------------------- */

int PairBayesRace::pack_forward_comm(int n, int *list, double *buf, int /*pbc_flag*/, int * /*pbc*/)
{
  if (moving != Moving::FEATURES)  // (comm_rows is null when this rank holds no atom at all)
    error->one(FLERR, "pair_style bayesrace: forward communication requested outside a feature exchange");
  const size_t w = comm_width;
  for (int i = 0; i < n; i++) std::memcpy(buf + i * w, comm_rows + static_cast<size_t>(list[i]) * w, sizeof(double) * w);
  return static_cast<int>(n * w);
}

void PairBayesRace::unpack_forward_comm(int n, int first, double *buf)
{
  const size_t w = comm_width;
  std::memcpy(comm_rows + static_cast<size_t>(first) * w, buf, sizeof(double) * w * n);
}

int PairBayesRace::pack_reverse_comm(int n, int first, double *buf)
{
  if (moving != Moving::FEATURE_GRADIENTS && moving != Moving::MEMBER_FORCES)
    error->one(FLERR, "pair_style bayesrace: reverse communication requested outside a gradient or force exchange");
  const size_t w = comm_width;
  std::memcpy(buf, comm_rows + static_cast<size_t>(first) * w, sizeof(double) * w * n);
  return static_cast<int>(n * w);
}

void PairBayesRace::unpack_reverse_comm(int n, int *list, double *buf)
{
  const size_t w = comm_width;
  for (int i = 0; i < n; i++) {
    double *dst = comm_rows + static_cast<size_t>(list[i]) * w;
    const double *src = buf + i * w;
    for (size_t k = 0; k < w; k++) dst[k] += src[k];
  }
}
