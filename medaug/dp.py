"""Differentially private training, per patient: DP-SGD with Opacus's per-sample gradients and accountant.

The unit of privacy is the patient, not the image. Each step draws every training patient
independently with probability ``q`` (Poisson sampling) and one item of each drawn patient,
so a patient's whole contribution to a step is one example, clipped once. Each example is
noised ``K`` times (several timesteps and noises, *noise multiplicity*, Dockhorn et al. 2022,
DPDM) and its per-sample gradient is the mean over those ``K`` before clipping: it costs no
privacy and lowers the gradient's variance. The clipped gradients are summed, Gaussian noise of
std ``sigma * max_grad_norm`` is added and the sum is divided by the expected batch ``q * P``
(P patients). The accountant (RDP by default) turns ``(sigma, q, steps)`` into ε at δ; the EMA
of the weights is post-processing and keeps the guarantee.

MONAI's ``DiffusionModelUNet`` (Conv, GroupNorm, Linear, Embedding, attention through
``scaled_dot_product_attention``) works with Opacus's hook-based ``GradSampleModule`` as it is
(tests/test_dp.py checks its per-sample gradients against one-at-a-time gradients).

Example::

    dp = PrivateTraining(net, patient_codes(patients), DPSettings(enabled=True, target_epsilon=10),
                         expected_batch=32, max_steps=800)
    fit(net, ema, optimizer, DiffusionStep(net, ...), settings, privacy=dp)
    dp.epsilon()   # ε at dp.delta after the steps taken
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class DPSettings:
    """``training.dp``: give ``target_epsilon`` (the noise is chosen to reach it at ``training.max_steps``)
    or ``noise_multiplier`` (sigma), not both. ``delta=None`` is ``0.1 / patients``; ``max_grad_norm`` is the
    per-patient clipping bound C; ``noise_multiplicity`` the noises per example averaged before clipping."""

    enabled: bool = False
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    max_grad_norm: float = 1.0
    noise_multiplicity: int = 4
    accountant: str = "rdp"  # rdp | prv | gdp (Opacus's accountants)

    @classmethod
    def from_config(cls, section: Mapping | None) -> "DPSettings":
        section = dict(section or {})
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"training.dp: unknown key(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**section)


def patient_codes(patients: Sequence[str]) -> torch.Tensor:
    """``(N,)`` int64 codes ``0..P-1`` of the items' patients (in order of first appearance)."""
    codes: dict[str, int] = {}
    return torch.tensor([codes.setdefault(p, len(codes)) for p in patients], dtype=torch.long)


def train_patients(prepared_dir) -> list[str]:
    """The patient (pseudonym) of every train item of a prepared dataset, in :func:`load_split`'s row order."""
    from .data import read_manifest

    return [r["patient"] for r in read_manifest(prepared_dir) if r["split"] == "train"]


def poisson_patient_rows(patient_of: torch.Tensor, rate: float, generator: torch.Generator) -> torch.Tensor:
    """Rows of one private step: each patient is drawn with probability ``rate``, independently, and one
    of its items uniformly. ``patient_of`` (N,) int64 codes ``0..P-1``; returns ``(B,)`` int64 rows, B ~ Bin(P, q),
    never two rows of one patient."""
    device = generator.device
    patient_of = patient_of.to(device)
    num_patients = int(patient_of.max()) + 1
    drawn = torch.rand(num_patients, generator=generator, device=device) < rate
    order = torch.randperm(patient_of.numel(), generator=generator, device=device)  # a random item first ...
    order = order[torch.sort(patient_of[order], stable=True).indices]  # ... within each patient
    grouped = patient_of[order]
    first = torch.ones_like(grouped, dtype=torch.bool)
    first[1:] = grouped[1:] != grouped[:-1]
    rows = order[first]  # one random item of every patient, in patient order
    return rows[drawn[patient_of[rows]]]


def epsilon_of(
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    history: Sequence[Sequence[float]] = (),
) -> float:
    """ε at ``delta`` after ``steps`` Poisson-subsampled Gaussian steps (Opacus's accountant), composed with
    earlier ``history`` segments ``(noise_multiplier, sample_rate, steps)`` (a resumed run's)."""
    from opacus.accountants import create_accountant

    segments = [(float(s), float(q), int(k)) for s, q, k in history if k > 0]
    segments += [(noise_multiplier, sample_rate, steps)] if steps > 0 else []
    if not segments:
        return 0.0
    acc = create_accountant(mechanism=accountant)
    acc.history = segments
    return float(acc.get_epsilon(delta=delta))


class PrivateTraining:
    """The private step :func:`medaug.training.fit` takes as ``privacy``: :meth:`rows` draws the step's items,
    :meth:`privatize` turns the per-sample gradients of the loss's backward into the noised, clipped mean in
    ``p.grad``. ``expected_batch`` is the expected number of patients per step (``training.batch_size``).
    A run resumed at ``start_step`` passes its checkpoint's ``meta["dp"]`` as ``prior``: its steps are composed
    with the new ones (whose noise may differ), so ε stays the whole run's."""

    def __init__(
        self,
        net: nn.Module,
        patient_of: torch.Tensor,
        settings: DPSettings,
        *,
        expected_batch: int,
        max_steps: int,
        start_step: int = 0,
        prior: Mapping | None = None,
    ):
        from opacus import GradSampleModule

        s = settings
        self.num_patients = int(patient_of.max()) + 1 if patient_of.numel() else 0
        if self.num_patients < 2:
            raise ValueError(f"training.dp needs at least 2 training patients, the train split has {self.num_patients}")
        if (s.target_epsilon is None) == (s.noise_multiplier is None):
            raise ValueError(
                "training.dp: set exactly one of target_epsilon and noise_multiplier (got "
                f"target_epsilon={s.target_epsilon}, noise_multiplier={s.noise_multiplier})"
            )
        delta = 0.1 / self.num_patients if s.delta is None else float(s.delta)
        if not 0 < delta < 1 / self.num_patients:
            raise ValueError(
                f"training.dp.delta={delta:g} must be in (0, 1/patients = {1 / self.num_patients:.3g}): "
                "a larger delta allows leaking a whole patient; leave it null for 0.1/patients"
            )
        if s.max_grad_norm <= 0 or s.noise_multiplicity < 1:
            raise ValueError(
                f"training.dp: max_grad_norm={s.max_grad_norm} must be > 0 and "
                f"noise_multiplicity={s.noise_multiplicity} >= 1"
            )
        self.sample_rate = min(1.0, expected_batch / self.num_patients)
        if self.sample_rate == 1.0:
            warnings.warn(
                f"training.batch_size={expected_batch} >= {self.num_patients} patients: every patient is "
                "in every step (sampling rate 1, no amplification by subsampling)",
                stacklevel=2,
            )
        if s.noise_multiplier is not None:
            self.noise_multiplier = float(s.noise_multiplier)
        else:
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=s.target_epsilon,
                    target_delta=delta,
                    sample_rate=self.sample_rate,
                    steps=max_steps,
                    accountant=s.accountant,
                )
            )
        self.settings, self.delta, self.net, self.patient_of = s, delta, net, patient_of
        self.steps = self.start_step = start_step
        self.history = [tuple(h) for h in (prior or {}).get("history", [])]
        if sum(h[2] for h in self.history) != start_step:
            raise ValueError(
                f"training.dp: the checkpoint at step {start_step} records "
                f"{sum(h[2] for h in self.history)} private steps (trained without training.dp?); "
                "train afresh in another paths.train_dir"
            )
        if self.history and (self.history[-1][1] != self.sample_rate or prior.get("delta") != delta):
            raise ValueError(
                f"training.dp: resuming with another sampling rate or delta than the checkpoint's "
                f"(q {self.history[-1][1]:.3g} -> {self.sample_rate:.3g}, delta {prior.get('delta')} -> "
                f"{delta:g}); keep training.batch_size and training.dp.delta, or train afresh"
            )
        try:
            self.grad_sampler = GradSampleModule(net, loss_reduction="mean")  # hooks on net's own layers
        except NotImplementedError as e:  # e.g. BatchNorm: a patient's statistics leak into the others' gradients
            raise ValueError(
                f"training.dp: {type(net).__name__} has layers Opacus cannot make private ({e}); "
                "use GroupNorm/LayerNorm networks such as MONAI's DiffusionModelUNet"
            ) from None
        self.params = [p for p in net.parameters() if p.requires_grad]
        log.info(
            "DP training per patient: %d patients, q=%.3f, sigma=%.3f, C=%g, delta=%.2g, %d noises per example; "
            "epsilon after %d steps: %.2f",
            self.num_patients,
            self.sample_rate,
            self.noise_multiplier,
            s.max_grad_norm,
            delta,
            s.noise_multiplicity,
            max_steps,
            self.epsilon(max_steps),
        )

    def rows(self, generator: torch.Generator) -> torch.Tensor:
        """This step's rows: one item per Poisson-drawn patient, each repeated ``noise_multiplicity`` times."""
        rows = poisson_patient_rows(self.patient_of, self.sample_rate, generator)
        return rows.repeat_interleave(self.settings.noise_multiplicity)

    def per_example_grads(self, n: int) -> list[torch.Tensor]:
        """The per-example gradients ``(n, *p.shape)`` of the last backward: the mean over each example's
        ``noise_multiplicity`` consecutive rows (zeros when the step drew nobody)."""
        k = self.settings.noise_multiplicity
        out = []
        for p in self.params:
            g = getattr(p, "grad_sample", None)
            out.append(
                torch.zeros(0, *p.shape, device=p.device) if g is None or n == 0 else g.reshape(n, k, *p.shape).mean(1)
            )
            p.grad_sample = None
        return out

    def privatize(self, step: int, num_rows: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """After the loss's backward over ``num_rows`` rows: clip every example's gradient to ``max_grad_norm``,
        sum, add N(0, (sigma C)^2) noise drawn from ``generator``, divide by the expected batch; into ``p.grad``."""
        k, clip = self.settings.noise_multiplicity, self.settings.max_grad_norm
        n = num_rows // k
        grads = self.per_example_grads(n)
        device = self.params[0].device
        norms = torch.zeros(n, device=device)
        for g in grads:
            norms += g.flatten(1).float().pow(2).sum(1)
        norms = norms.sqrt()
        factor = (clip / (norms + 1e-6)).clamp(max=1.0)
        expected = self.sample_rate * self.num_patients
        for p, g in zip(self.params, grads):
            noise = torch.randn(p.shape, generator=generator, device=generator.device).to(p.device)
            summed = torch.einsum("i,i...->...", factor, g) if n else torch.zeros_like(p)
            p.grad = ((summed + self.noise_multiplier * clip * noise) / expected).to(p.dtype)
        self.steps = step + 1
        return {
            "privacy/batch_patients": torch.tensor(float(n), device=device),
            "privacy/clipped_share": (norms > clip).float().mean() if n else torch.tensor(0.0, device=device),
        }

    def epsilon(self, steps: int | None = None) -> float:
        """ε at :attr:`delta` after ``steps`` (default: the steps taken)."""
        steps = self.steps if steps is None else steps
        return epsilon_of(
            self.noise_multiplier,
            self.sample_rate,
            steps - self.start_step,
            self.delta,
            self.settings.accountant,
            self.history,
        )

    def metrics(self) -> dict[str, float]:
        """What is logged at every log step: ε at δ after the steps taken."""
        return {"privacy/epsilon": self.epsilon()}

    def meta(self) -> dict:
        """The checkpoint's ``meta["dp"]``: the guarantee and how it was reached."""
        s = asdict(self.settings)
        return {
            "dp": dict(
                unit="patient",
                epsilon=self.epsilon(),
                delta=self.delta,
                steps=self.steps,
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                patients=self.num_patients,
                max_grad_norm=s["max_grad_norm"],
                noise_multiplicity=s["noise_multiplicity"],
                accountant=s["accountant"],
                history=[list(h) for h in self.history]
                + (
                    [[self.noise_multiplier, self.sample_rate, self.steps - self.start_step]]
                    if self.steps > self.start_step
                    else []
                ),
            )
        }


def describe(dp: Mapping | None) -> str:
    """One line for a data card or a log: the guarantee of a checkpoint's ``meta["dp"]`` (or that there is none)."""
    if not dp:
        return "none (trained without differential privacy)"
    return (
        f"(ε = {dp['epsilon']:.2f}, δ = {dp['delta']:.2g}) per {dp['unit']}, DP-SGD with Opacus "
        f"({dp['accountant']} accountant, noise multiplier {dp['noise_multiplier']:.3g}, sampling rate "
        f"{dp['sample_rate']:.3g}, clip {dp['max_grad_norm']:g}, {dp['steps']} steps)"
    )


def private_training(
    net: nn.Module,
    section: Mapping | None,
    patients: Sequence[str],
    *,
    expected_batch: int,
    max_steps: int,
    start_step: int = 0,
    world_size: int = 1,
    latent: bool = False,
    activation_checkpointing: bool = False,
    prior: Mapping | None = None,
) -> PrivateTraining | None:
    """The :class:`PrivateTraining` of ``training.dp`` (``None`` when off), refusing what it cannot make private."""
    settings = DPSettings.from_config(section)
    if not settings.enabled:
        return None
    for bad, why in (
        (world_size > 1, f"{world_size} processes (run it on one)"),
        (latent, "latent diffusion (the autoencoder is trained without privacy; train in pixel space)"),
        (
            activation_checkpointing,
            "training.activation_checkpointing (recomputed layers would "
            "record their per-sample gradients twice; set it false)",
        ),
    ):
        if bad:
            raise ValueError(f"training.dp.enabled=true does not support {why}")
    return PrivateTraining(
        net,
        patient_codes(patients),
        settings,
        expected_batch=expected_batch,
        max_steps=max_steps,
        start_step=start_step,
        prior=prior,
    )
