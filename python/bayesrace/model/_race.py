"""The RACE model: an E(3)-equivariant message-passing potential with restratification.

Per layer (see docs/design.md): a species-dependent self-interaction of h as the skip; h is
lifted by a linear map; each edge carries the message TP(h_j, Y(r̂_ij)) weighted by a
bias-free radial MLP of the Bessel basis (the l=0 spherical harmonic makes h_j itself one
of the paths, i.e. the concatenation [h_j, TP(h_j, Y)] of the paper); messages are summed
over neighbours and divided by √N_avg (the product runs as plain torch, ``_paths``, with
the coefficients of e3nn's module); a linear map brings them back to the hidden
irreps; the channel-wise tensor product with the fixed initial feature a⁽¹⁾ (the
"restratification") and a linear map give the new h, to which the skip is added. Every
layer reads out per-atom energy and aleatoric heads; energies are summed over layers,
heads averaged. Forces and virial come from autograd with respect to the edge vectors,
which serves periodic cells and LAMMPS ghost atoms alike.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
from e3nn import nn as e3nn_nn
from e3nn import o3

from .. import keys
from ._message_square import MessageSquare
from ._paths import MessagePaths, component_major
from ._radial import BesselBasis, _default_dtype, capped_log_variance, isolation_gate
from ._readout import Readout

COVARIANCE_KINDS = ("cholesky", "equivariant")


@dataclasses.dataclass
class ModelConfig:
    """Hyperparameters of one RACE network (a named preset fills them in)."""

    cutoff: float = 5.0  # Å, radius of one message-passing layer
    n_layers: int = 3  # interaction range is n_layers * cutoff
    channels: int = 32  # multiplicity of every irrep in the hidden features
    l_max: int = 2  # highest rotation order of spherical harmonics and features
    n_radial: int = 8  # Bessel functions
    envelope_p: int = 2  # exponent of the polynomial cutoff envelope
    radial_hidden: int = 64  # width of the bias-free radial MLP
    radial_layers: int = 2
    readout_hidden: int = 16  # scalars (and gated vectors) inside each readout
    avg_num_neighbors: float = 0.0  # 0: measured on the training data
    covariance: str = "cholesky"  # "cholesky" (invariant, as in the paper) | "equivariant"
    covariance_floor: float = 1e-3  # (eV/Å)^2 added to every force covariance
    # the learned part of E_i (readouts and shift) is multiplied by a gate that is 0 for an atom
    # without neighbours (``isolation_gate``): an isolated atom has exactly its reference energy.
    # Models saved before this existed load with False (``model_config_from_record``).
    isolated_atom_limit: bool = True
    # aleatoric σ's are bent smoothly toward e × these above them (``capped_log_variance``): per-atom
    # force σ [eV/Å] and structure energy σ [eV]; 0 switches a cap off (models saved before: off)
    force_sigma_cap: float = 10.0
    energy_sigma_cap: float = 100.0
    # add each atom's channel-wise squared message (``_message_square``): angles at the centre
    message_square: bool = False

    def validate(self) -> None:
        if self.covariance not in COVARIANCE_KINDS:
            raise ValueError(
                f"model.covariance is {self.covariance!r}; expected one of {list(COVARIANCE_KINDS)}"
            )
        for name in ("n_layers", "channels", "n_radial", "radial_hidden", "radial_layers", "readout_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {getattr(self, name)}")
        if self.cutoff <= 0:
            raise ValueError(f"model.cutoff must be positive (Å), got {self.cutoff}")
        if not 0 <= self.l_max <= 3:
            raise ValueError(f"model.l_max must be 0..3, got {self.l_max}")
        if self.force_sigma_cap < 0 or self.energy_sigma_cap < 0:
            raise ValueError("model.force_sigma_cap and model.energy_sigma_cap must be >= 0 (0 switches the cap off)")
        if self.envelope_p < 2:
            raise ValueError(f"model.envelope_p must be >= 2 for smooth forces, got {self.envelope_p}")


PRESETS: Dict[str, Dict[str, object]] = {
    # message_square: on acac (450 structures, one core each, side by side) base with it reached
    # a validation force RMSE of 54.6 against 64.0 meV/Å without after 12 minutes (73 vs 84 epochs)
    # fast enough for tests and the two-minute demo
    "tiny": dict(n_layers=2, channels=8, l_max=1, radial_hidden=16, readout_hidden=8, message_square=True),
    # the default of the main job: a few minutes of CPU training on PSB3 (l_max=2 costs ~4x on CPU)
    "small": dict(n_layers=3, channels=16, l_max=1, radial_hidden=32, readout_hidden=16, message_square=True),
    # twice small's channels: ahead of small after ~5 minutes of one core
    "base": dict(n_layers=3, channels=32, l_max=1, radial_hidden=32, readout_hidden=16, message_square=True),
    "medium": dict(n_layers=4, channels=32, l_max=2, radial_hidden=64, readout_hidden=16, message_square=True),
    # the seed paper's size and structure (linear messages, no square)
    "paper": dict(n_layers=5, channels=64, l_max=3, cutoff=5.5, radial_hidden=64, readout_hidden=32),
}


# fields added after models were first saved, with the value that reproduces those models
LEGACY_MODEL_FIELDS: Dict[str, object] = {"isolated_atom_limit": False, "force_sigma_cap": 0.0,
                                          "energy_sigma_cap": 0.0, "message_square": False}


def model_config_from_record(fields: Dict[str, object]) -> ModelConfig:
    """The ModelConfig of a saved model (posterior or checkpoint record): a field it predates
    takes the value that reproduces what was trained."""
    return ModelConfig(**{**LEGACY_MODEL_FIELDS, **fields})


def model_config_from(preset: str = "small", **overrides) -> ModelConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; expected one of {sorted(PRESETS)}")
    config = ModelConfig(**{**PRESETS[preset], **overrides})
    config.validate()
    return config


def _message_tensor_product(irreps_node: o3.Irreps, irreps_sh: o3.Irreps, l_max: int):
    """Channel-wise ("uvu") products of node features with spherical harmonics, kept to
    the irreps that appear in the hidden features."""
    allowed = {(l, (-1) ** l) for l in range(l_max + 1)}
    irreps_out: List = []
    instructions = []
    for i1, (mul, ir1) in enumerate(irreps_node):
        for i2, (_, ir2) in enumerate(irreps_sh):
            for ir_out in ir1 * ir2:
                if (ir_out.l, ir_out.p) in allowed:
                    instructions.append((i1, i2, len(irreps_out), "uvu", True))
                    irreps_out.append((mul, ir_out))
    irreps_out = o3.Irreps(irreps_out)
    irreps_sorted, permutation, _ = irreps_out.sort()
    instructions = [(i1, i2, permutation[i_out], mode, w) for i1, i2, i_out, mode, w in instructions]
    product = o3.TensorProduct(
        irreps_node, irreps_sh, irreps_sorted, instructions, shared_weights=False, internal_weights=False
    )
    return product, irreps_sorted


class RaceLayer(torch.nn.Module):
    def __init__(
        self,
        irreps_in: o3.Irreps,
        irreps_hidden: o3.Irreps,
        irreps_sh: o3.Irreps,
        irreps_initial: o3.Irreps,
        n_species: int,
        config: ModelConfig,
    ):
        super().__init__()
        self.skip = o3.FullyConnectedTensorProduct(irreps_in, o3.Irreps(f"{n_species}x0e"), irreps_hidden)
        self.linear_up = o3.Linear(irreps_in, irreps_in)
        self.message_product, irreps_messages = _message_tensor_product(irreps_in, irreps_sh, config.l_max)
        # no biases and SiLU(0) = 0: a zero basis (at the cutoff) gives a zero message
        self.radial_mlp = e3nn_nn.FullyConnectedNet(
            [config.n_radial] + [config.radial_hidden] * config.radial_layers + [self.message_product.weight_numel],
            torch.nn.functional.silu,
        )
        # the same products in plain torch (what forward runs), coefficients read off a float64
        # copy of the e3nn module so they keep float64 precision when the model is converted
        self.paths = MessagePaths(copy.deepcopy(self.message_product).to(torch.float64), torch.float64)
        self.register_buffer("up_order", component_major(irreps_in), persistent=False)
        self.register_buffer("message_layout", torch.argsort(self.paths.message_order), persistent=False)
        self.linear_down = o3.Linear(irreps_messages, irreps_hidden)
        self.has_square = bool(config.message_square)
        self.square = MessageSquare(irreps_hidden) if self.has_square else torch.nn.Identity()
        n_channels = irreps_initial.num_irreps
        self.restratify = o3.TensorProduct(
            irreps_initial,
            irreps_hidden,
            irreps_hidden,
            [(0, i, i, "uuu", False) for i, (mul, _) in enumerate(irreps_hidden) if mul == n_channels],
        )
        self.linear_out = o3.Linear(irreps_hidden, irreps_hidden)
        self.inv_sqrt_neighbors = 1.0 / math.sqrt(config.avg_num_neighbors)

    def forward(
        self,
        h: torch.Tensor,
        species_one_hot: torch.Tensor,
        initial: torch.Tensor,
        radial: torch.Tensor,
        sh: torch.Tensor,
        centre: torch.Tensor,
        neighbour: torch.Tensor,
        n_centres: int = -1,
    ) -> torch.Tensor:
        """The new h of the first ``n_centres`` atoms (all when -1) from h of every atom:
        every edge centre must be one of them, neighbours may be any atom (a ghost)."""
        n = h.shape[0] if n_centres < 0 else n_centres
        skip = self.skip(h[:n], species_one_hot[:n])
        h_up = self.linear_up(h)[:, self.up_order]
        summed = self.paths(h_up.unsqueeze(0), sh.unsqueeze(0), self.radial_mlp(radial).unsqueeze(0), centre,
                            neighbour, n)[0]
        h_new = self.linear_down(summed[:, self.message_layout] * self.inv_sqrt_neighbors)
        if self.has_square:
            h_new = h_new + self.square(h_new)
        return self.linear_out(self.restratify(initial[:n], h_new)) + skip


def add_trunk(module: torch.nn.Module, config: ModelConfig, n_species: int, n_scalars_out: int,
              n_vectors_out: int) -> None:
    """Gives ``module`` RACE's trunk: ``spherical_harmonics``, ``radial_basis``, ``embedding``,
    ``initial_feature``, and ``layers`` with one ``Readout`` per layer in ``readouts``, each
    reading out ``n_scalars_out`` scalars and ``n_vectors_out`` vectors per atom (RACE's heads,
    or the property models' targets)."""
    irreps_sh = o3.Irreps.spherical_harmonics(config.l_max)
    irreps_scalar = o3.Irreps(f"{config.channels}x0e")
    irreps_hidden = o3.Irreps([(config.channels, (l, (-1) ** l)) for l in range(config.l_max + 1)])
    # e3nn computes its Clebsch–Gordan and normalisation constants in the default dtype:
    # built under float32 they carry float32 error into a float64 model, and the paper
    # preset (l_max 3, 5 layers) was equivariant to 5e-10 instead of 1e-15
    with _default_dtype(torch.float64):
        module.spherical_harmonics = o3.SphericalHarmonics(irreps_sh, normalize=True, normalization="component")
        module.radial_basis = BesselBasis(config.cutoff, config.n_radial, config.envelope_p)
        module.embedding = o3.Linear(o3.Irreps(f"{n_species}x0e"), irreps_scalar)
        module.initial_feature = o3.Linear(irreps_scalar, irreps_scalar)
        layers, readouts, irreps_in = [], [], irreps_scalar
        for _ in range(config.n_layers):
            layers.append(RaceLayer(irreps_in, irreps_hidden, irreps_sh, irreps_scalar, n_species, config))
            readouts.append(Readout(irreps_hidden, n_scalars_out, n_vectors_out, config.readout_hidden))
            irreps_in = irreps_hidden
        module.layers = torch.nn.ModuleList(layers)
        module.readouts = torch.nn.ModuleList(readouts)


class RACE(torch.nn.Module):
    """One RACE network with NLL_JEF heads.

    ``forward(data)`` takes a collated batch (``bayesrace.keys``) and returns the atomic
    and total energies, forces, virial and stress (autograd with respect to the edge
    vectors), and the aleatoric energy variance and force covariance of every atom.
    """

    def __init__(
        self,
        config: ModelConfig,
        type_names: List[str],
        reference_energies: Optional[List[float]] = None,
        energy_shift: float = 0.0,
        energy_scale: float = 1.0,
        trained_heads: Optional[List[str]] = None,
    ):
        super().__init__()
        config.validate()
        if config.avg_num_neighbors <= 0:
            raise ValueError("model.avg_num_neighbors must be set (measured on training data) before building")
        self.config = config
        self.type_names: List[str] = list(type_names)
        self.cutoff = float(config.cutoff)
        self.n_layers = int(config.n_layers)
        self.equivariant_covariance = config.covariance == "equivariant"
        self.covariance_floor = float(config.covariance_floor)
        self.isolated_atom_limit = bool(config.isolated_atom_limit)
        self.force_sigma_cap, self.energy_sigma_cap = float(config.force_sigma_cap), float(config.energy_sigma_cap)
        # Which aleatoric heads the loss trained (an MSE-trained member has none): an
        # untrained head reports zero variance instead of noise from its random weights.
        self.energy_head_trained = True
        self.force_head_trained = True
        self.set_trained_heads(["energy", "forces"] if trained_heads is None else trained_heads)
        n_species = len(type_names)

        # outputs per atom and layer: energy, log-variance s, and either l1..l6 of the
        # Cholesky factor (invariant) or a log-isotropic part plus three vectors
        n_scalars = 2 + (1 if self.equivariant_covariance else 6)
        n_vectors = 3 if self.equivariant_covariance else 0
        add_trunk(self, config, n_species, n_scalars, n_vectors)

        if reference_energies is None:
            reference_energies = [0.0] * n_species
        if len(reference_energies) != n_species:
            raise ValueError(f"{len(reference_energies)} reference energies for {n_species} types")
        self.register_buffer("reference_energies", torch.tensor(reference_energies, dtype=torch.float64))
        self.register_buffer("energy_shift", torch.tensor(float(energy_shift), dtype=torch.float64))
        self.register_buffer("energy_scale", torch.tensor(float(energy_scale), dtype=torch.float64))
        # learned log-scale of the energy variance and of the force covariance: the readouts have
        # no bias, so without it the heads must build their level out of the features (slow)
        self.head_log_variance_offset = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # models saved before the offset existed load with a zero offset, as they were trained
        name = prefix + "head_log_variance_offset"
        if name not in state_dict:
            state_dict[name] = torch.zeros_like(self.head_log_variance_offset.detach())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.jit.unused
    def set_trained_heads(self, heads: List[str]) -> None:
        unknown = set(heads) - {"energy", "forces"}
        if unknown:
            raise ValueError(f"unknown aleatoric heads {sorted(unknown)}; expected 'energy' and/or 'forces'")
        self.energy_head_trained = "energy" in heads
        self.force_head_trained = "forces" in heads

    @property
    @torch.jit.unused
    def trained_heads(self) -> List[str]:
        return [name for name, on in (("energy", self.energy_head_trained), ("forces", self.force_head_trained)) if on]

    # -- the atom-wise network, in the pieces a layer-by-layer evaluation calls ----------
    @torch.jit.unused
    def feature_widths(self) -> List[int]:
        """[d_0, ..., d_K]: the width of the flattened node features h_0 (the embedding) and
        of h_k after each layer k."""
        return [self.embedding.irreps_out.dim] + [layer.linear_out.irreps_out.dim for layer in self.layers]

    @torch.jit.unused
    def readout_width(self) -> int:
        """n_out: the width of one layer's readout (energy, log-variance, covariance heads)."""
        return self.readouts[0].linear_out.irreps_out.dim

    def embed_species(self, species: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(one-hot species, h_0, the initial feature a⁽¹⁾) of every atom: species only."""
        one_hot = torch.nn.functional.one_hot(species, len(self.type_names)).to(dtype)
        h = self.embedding(one_hot)
        return one_hot, h, self.initial_feature(h)

    def edge_geometry(self, edge_vectors: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(radial basis, spherical harmonics) of every edge."""
        lengths = torch.sqrt(torch.sum(edge_vectors * edge_vectors, dim=1))
        sh = self.spherical_harmonics(edge_vectors)
        return self.radial_basis(lengths), sh

    def interaction(
        self,
        index: int,
        h: torch.Tensor,
        one_hot: torch.Tensor,
        initial: torch.Tensor,
        radial: torch.Tensor,
        sh: torch.Tensor,
        edge_index: torch.Tensor,
        n_centres: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Layer ``index`` and its readout: (h_{index+1}, r_index) of the first ``n_centres``
        atoms (every edge centre is one of them)."""
        result: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        # a runtime index into a ModuleList: TorchScript unrolls the loop and compares
        for k, (layer, readout) in enumerate(zip(self.layers, self.readouts)):
            if k == index:
                h_new = layer(h, one_hot, initial, radial, sh, edge_index[0], edge_index[1], n_centres)
                out = readout(h_new)
                if self.isolated_atom_limit:
                    out = self.gate_energy(out, radial, edge_index[0], n_centres, k == 0)
                result = (h_new, out)
        if result is None:
            raise IndexError(f"layer {index} out of range")
        return result

    def gate_energy(self, readout: torch.Tensor, radial: torch.Tensor, centre: torch.Tensor, n_centres: int,
                    first_layer: bool) -> torch.Tensor:
        """The readout with its energy column times the isolation gate; the first layer's also
        carries the energy shift (in units of the scale), so the shift vanishes with the gate."""
        energy = readout[:, 0]
        if first_layer:
            energy = energy + self.energy_shift.to(readout.dtype) / self.energy_scale.to(readout.dtype)
        gated = energy * isolation_gate(radial, centre, n_centres)
        return torch.cat([gated.unsqueeze(1), readout[:, 1:]], dim=1)

    def layer_step(
        self, index: int, h: torch.Tensor, species: torch.Tensor, edge_index: torch.Tensor,
        edge_vectors: torch.Tensor, n_centres: int,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``interaction`` with the species features and edge geometry computed here: what a
        layer-by-layer evaluation (the deployable's ``layer``) calls."""
        one_hot, _, initial = self.embed_species(species, h.dtype)
        radial, sh = self.edge_geometry(edge_vectors)
        return self.interaction(index, h, one_hot, initial, radial, sh, edge_index, n_centres)

    def combine_readouts(
        self, outputs: torch.Tensor, species: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(atomic energy, log-variance, force covariance) from the readouts of every layer,
        ``outputs`` [layers, N, n_out], and the species of those N atoms."""
        n_atoms = species.shape[0]
        dtype = outputs.dtype
        scale = self.energy_scale.to(dtype)
        # with the isolated-atom limit the shift is inside the (gated) first readout
        shift = torch.zeros_like(self.energy_shift) if self.isolated_atom_limit else self.energy_shift
        atomic_energy = (
            scale * outputs[:, :, 0].sum(dim=0)
            + shift.to(dtype)
            + self.reference_energies.to(dtype)[species]
        )
        heads = outputs[:, :, 1:].mean(dim=0)  # uncertainty heads are averaged over layers
        offset = self.head_log_variance_offset.to(dtype)
        log_var = capped_log_variance(heads[:, 0] + 2.0 * torch.log(scale) + offset[0], self.energy_sigma_cap)
        if not self.energy_head_trained:
            log_var = torch.full_like(log_var, -math.inf)
        eye = torch.eye(3, dtype=dtype, device=outputs.device)
        if self.equivariant_covariance:
            # exp(a) I + sum_k v_k v_k^T: positive definite, and R Σ R^T under any rotation
            # or reflection because each v_k is a polar vector (1o)
            iso = torch.exp(heads[:, 1])
            vectors = heads[:, 2:].reshape(n_atoms, 3, 3)
            covariance = iso[:, None, None] * eye + torch.einsum("nki,nkj->nij", vectors, vectors)
            covariance = covariance * scale * scale
        else:
            l = heads[:, 1:7]
            zero = torch.zeros_like(l[:, 0])
            factor = torch.stack(
                [
                    torch.stack([torch.exp(l[:, 0]), zero, zero], dim=-1),
                    torch.stack([l[:, 5], torch.exp(l[:, 1]), zero], dim=-1),
                    torch.stack([l[:, 4], l[:, 3], torch.exp(l[:, 2])], dim=-1),
                ],
                dim=1,
            ) * scale
            covariance = factor @ factor.transpose(1, 2)
        covariance = covariance * torch.exp(offset[1]) + self.covariance_floor * eye
        # the cap acts on the per-atom σ² = tr Σ / 3 and rescales Σ as a whole (stays positive definite)
        log_sigma2 = torch.log(torch.diagonal(covariance, dim1=-2, dim2=-1).sum(-1) / 3.0)
        capped = capped_log_variance(log_sigma2, self.force_sigma_cap)
        covariance = covariance * torch.exp(capped - log_sigma2)[:, None, None]
        if not self.force_head_trained:
            covariance = torch.zeros_like(covariance)
        return atomic_energy, log_var, covariance

    def atomic_outputs(
        self, species: torch.Tensor, edge_index: torch.Tensor, edge_vectors: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """Per-atom energy, log-variance and force covariance from species and edge vectors."""
        n_atoms = species.shape[0]
        radial, sh = self.edge_geometry(edge_vectors)
        one_hot, h, initial = self.embed_species(species, edge_vectors.dtype)
        per_layer: List[torch.Tensor] = []
        for index in range(self.n_layers):
            h, readout = self.interaction(index, h, one_hot, initial, radial, sh, edge_index, n_atoms)
            per_layer.append(readout)
        atomic_energy, log_var, covariance = self.combine_readouts(torch.stack(per_layer, dim=0), species)
        return {
            keys.ATOMIC_ENERGY: atomic_energy,
            keys.ATOMIC_ENERGY_LOG_VAR: log_var,
            keys.FORCE_COVARIANCE: covariance,
        }

    # -- a batch of structures ---------------------------------------------------------
    def forward(
        self, data: Dict[str, torch.Tensor], compute_forces: bool = True, compute_virial: bool = False
    ) -> Dict[str, torch.Tensor]:
        positions = data[keys.POSITIONS]
        edge_index = data[keys.EDGE_INDEX]
        batch = data[keys.BATCH]
        num_atoms = data[keys.NUM_ATOMS]
        n_structures = num_atoms.shape[0]
        centre = edge_index[0]
        neighbour = edge_index[1]
        shifts = torch.einsum("ek,ekl->el", data[keys.EDGE_CELL_SHIFT], data[keys.CELL][batch[centre]])
        edge_vectors = (positions[neighbour] - positions[centre] + shifts).detach()
        if compute_forces or compute_virial:
            edge_vectors.requires_grad_(True)
        out = self.atomic_outputs(data[keys.SPECIES], edge_index, edge_vectors)
        atomic_energy = out[keys.ATOMIC_ENERGY]
        dtype = atomic_energy.dtype
        energy = torch.zeros(n_structures, dtype=dtype, device=positions.device).index_add(0, batch, atomic_energy)
        out[keys.ENERGY] = energy
        mean_log_var = torch.zeros(n_structures, dtype=dtype, device=positions.device).index_add(
            0, batch, out[keys.ATOMIC_ENERGY_LOG_VAR]
        ) / num_atoms.to(dtype)
        out[keys.ENERGY_VARIANCE] = torch.exp(mean_log_var)
        if compute_forces or compute_virial:
            # create_graph keeps the force loss differentiable with respect to the weights
            grads = torch.autograd.grad(
                [energy.sum()], [edge_vectors], create_graph=self.training, allow_unused=True
            )
            dE_dr = grads[0]
            if dE_dr is None:
                dE_dr = torch.zeros_like(edge_vectors)
            if compute_forces:
                forces = torch.zeros_like(positions).index_add(0, centre, dE_dr).index_add(0, neighbour, -dE_dr)
                out[keys.FORCES] = forces
            if compute_virial:
                edge_virial = -edge_vectors.unsqueeze(2) * dE_dr.unsqueeze(1)
                virial = torch.zeros(n_structures, 3, 3, dtype=dtype, device=positions.device).index_add(
                    0, batch[centre], edge_virial
                )
                out[keys.VIRIAL] = virial
                volume = torch.abs(torch.linalg.det(data[keys.CELL]))
                out[keys.STRESS] = -virial / volume.clamp(min=1e-12)[:, None, None]
        return out


def build_model(
    config: ModelConfig,
    type_names: List[str],
    reference_energies: Optional[List[float]] = None,
    energy_shift: float = 0.0,
    energy_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    seed: Optional[int] = None,
) -> RACE:
    if seed is not None:
        torch.manual_seed(seed)
    model = RACE(config, type_names, reference_energies, energy_shift, energy_scale)
    return model.to(dtype)
