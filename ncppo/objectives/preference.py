"""Preference objectives on per-sample losses: SFT, Diffusion-DPO (8) and Diffusion-CPO (11).

Each takes :class:`PairLosses`, the per-sample losses ``L`` of winners and losers under the policy
(and the reference, for DPO), whichever space produced them (noise space (3) or NCP space (13)), and
returns the scalar loss and detached metrics. The NCP objectives (18)-(19) are these same functions
fed perceptual losses ``PL``.

Convention for ``beta`` (METHOD.md): the factor 1/2 is written out,
``loss = -log sigmoid(-(beta/2) * ...)``, so ``beta`` means what the Diffusion-DPO paper means
(good range 2000-5000; its launchers use 5000). diffusers' DPO script's ``beta_dpo = 2500`` is the
same loss as ``beta = 5000`` here. ``beta = "auto"`` stands for a value the trainer calibrates before
the first step (:mod:`ncppo.objectives.calibration`); an uncalibrated objective refuses to run.

Flow models (Flow-SFT/DPO/CPO): the same functions fed the velocity MSE ``|| (eps - x0) - v_theta ||^2`` (per
sample, mean over latent elements), with the same convention (factor 1/2 written out; diffusers-style scripts
that write ``beta_dpo`` without it mean half our ``beta``). The scale differs from epsilon space: the velocity
target has about twice the variance of ``eps`` (unit-variance latents) and its error does not vanish at low
noise, so loss differences, and the argument at a given ``beta``, are typically a few times larger. Treat
``beta`` as a range to sweep, about 500-5000 (the DDPM range shifted down by the larger scale; not measured on
a real flow model here). ``beta: auto`` calibrates within the model's own noise space: for a flow model it puts
an NCP objective's argument where Flow-DPO's sits at ``target_beta`` (for Flow-DPO itself the ratio is 1).

Ties (label 0.5, kept with ``tie_policy: keep``) get the label-smoothed loss with label 1/2,
``-(log sigmoid(x) + log sigmoid(-x)) / 2``, symmetric in the pair's two images; CPO's behaviour-cloning
term on a tie is the mean of both images' losses. SFT has no loser to compare with and refuses ties.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ncppo.errors import UsageError

DEFAULT_BETA = 5000.0
AUTO = "auto"
SATURATION = 5.0  # a pair whose argument exceeds this has gradient weight sigmoid(-5) < 0.7%: saturated


@dataclass(frozen=True)
class PairLosses:
    """Per-sample losses, shape ``(B,)`` each; losers and references are absent when not computed."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor | None = None
    reference_w: torch.Tensor | None = None
    reference_l: torch.Tensor | None = None
    tie: torch.Tensor | None = None  # bool, shape (B,): which pairs are ties; None: none are

    @classmethod
    def from_stacked(cls, policy: torch.Tensor, reference: torch.Tensor | None, num_pairs: int,
                     tie: torch.Tensor | None = None) -> PairLosses:
        """Split losses of ``[winners; losers]`` (or winners only) stacked along the batch."""
        def split(x):
            if x is None:
                return None, None
            if x.shape[0] == num_pairs:
                return x, None
            if x.shape[0] != 2 * num_pairs:
                raise ValueError(f"expected {num_pairs} or {2 * num_pairs} losses, got {x.shape[0]}")
            return x[:num_pairs], x[num_pairs:]

        pw, pl = split(policy)
        rw, rl = split(reference)
        if tie is not None:
            tie = tie.to(device=pw.device, dtype=torch.bool)
            if tie.shape != (num_pairs,):
                raise ValueError(f"expected {num_pairs} tie flags, got shape {tuple(tie.shape)}")
            if not bool(tie.any()):
                tie = None
        return cls(pw, pl, rw, rl, tie)


def _means(losses: PairLosses) -> dict[str, torch.Tensor]:
    names = {"policy_w": "loss_w_policy", "policy_l": "loss_l_policy",
             "reference_w": "loss_w_reference", "reference_l": "loss_l_reference"}
    return {m: getattr(losses, f).detach().mean() for f, m in names.items() if getattr(losses, f) is not None}


def _preference_metrics(inside: torch.Tensor, tie: torch.Tensor | None) -> dict[str, torch.Tensor]:
    inside = inside.detach()
    decisive = inside if tie is None or bool(tie.all()) else inside[~tie]
    return {
        # implicit reward margin r_w - r_l; accuracy counts a tie as half, as METHOD.md (decisive pairs only)
        "implicit_acc": (decisive > 0).float().mean() + 0.5 * (decisive == 0).float().mean(),
        "reward_margin": inside.mean(),
        # the sigmoid's argument: near 0 the loss sits at log 2; beyond SATURATION the pair stops teaching
        "argument_rms": inside.pow(2).mean().sqrt(),
        "saturated_frac": (inside > SATURATION).float().mean(),
    }


def _sigmoid_loss(inside: torch.Tensor, tie: torch.Tensor | None) -> torch.Tensor:
    """Per pair ``-log sigmoid(x)``; for a tie, the label-1/2 form ``-(log sigmoid(x) + log sigmoid(-x)) / 2``."""
    decisive = -F.logsigmoid(inside)
    if tie is None:
        return decisive
    return torch.where(tie, -(F.logsigmoid(inside) + F.logsigmoid(-inside)) / 2, decisive)


def _check_beta(beta, objective: str) -> float:
    if isinstance(beta, str):
        raise UsageError(f"{objective}: beta {beta!r} has not been calibrated; run ncppo.objectives.calibrate_beta "
                         "(the Trainer does) or give a number")
    return beta


def _require(losses: PairLosses, *fields: str, objective: str) -> None:
    missing = [f for f in fields if getattr(losses, f) is None]
    if missing:
        raise ValueError(f"{objective} needs per-sample losses for {', '.join(missing)}")


@dataclass(frozen=True)
class SFT:
    """``loss = L^w_theta``: the diffusion loss on winners only."""

    needs_reference = False
    uses_loser = False
    supports_ties = False
    beta = None

    def __call__(self, losses: PairLosses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if losses.tie is not None:
            raise UsageError("SFT trains on winners only and cannot use ties; use tie_policy 'drop'")
        loss = losses.policy_w.mean()
        return loss, {"loss": loss.detach(), **_means(losses)}


@dataclass(frozen=True)
class DPO:
    """(8) ``-log sigmoid(-(beta/2) * ((L^w_theta - L^w_ref) - (L^l_theta - L^l_ref)))``."""

    beta: float | str = DEFAULT_BETA
    needs_reference = True
    uses_loser = True
    supports_ties = True

    def __call__(self, losses: PairLosses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(losses, "policy_l", "reference_w", "reference_l", objective="DPO")
        beta = _check_beta(self.beta, "DPO")
        model_diff = losses.policy_w.float() - losses.policy_l.float()
        ref_diff = losses.reference_w.float() - losses.reference_l.float()
        inside = -(beta / 2) * (model_diff - ref_diff)
        loss = _sigmoid_loss(inside, losses.tie).mean()
        return loss, {"loss": loss.detach(), **_means(losses), **_preference_metrics(inside, losses.tie)}


@dataclass(frozen=True)
class CPO:
    """(11) ``-log sigmoid(-(beta/2) * (L^w_theta - L^l_theta)) + lambda * L^w_theta`` (reference-free).

    ``lam = 0`` reproduces the authors' public code, which dropped the behaviour-cloning term.
    """

    beta: float | str = DEFAULT_BETA
    lam: float = 1.0
    needs_reference = False
    uses_loser = True
    supports_ties = True

    def __call__(self, losses: PairLosses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(losses, "policy_l", objective="CPO")
        beta = _check_beta(self.beta, "CPO")
        inside = -(beta / 2) * (losses.policy_w.float() - losses.policy_l.float())
        preference = _sigmoid_loss(inside, losses.tie).mean()
        cloned = losses.policy_w
        if losses.tie is not None:  # a tie has two winners: clone both
            cloned = torch.where(losses.tie, (losses.policy_w + losses.policy_l) / 2, losses.policy_w)
        behaviour_cloning = cloned.mean()
        loss = preference + self.lam * behaviour_cloning
        return loss, {
            "loss": loss.detach(),
            "preference_loss": preference.detach(),
            "bc_loss": behaviour_cloning.detach(),
            **_means(losses),
            **_preference_metrics(inside, losses.tie),
        }
