"""Preference objectives on per-sample losses: SFT, Diffusion-DPO (8) and Diffusion-CPO (11).

Each takes :class:`PairLosses`, the per-sample losses ``L`` of winners and losers under the policy
(and the reference, for DPO), whichever space produced them (noise space (3) or NCP space (13)), and
returns the scalar loss and detached metrics. The NCP objectives (18)-(19) are these same functions
fed perceptual losses ``PL``.

Convention for ``beta`` (METHOD.md): the factor 1/2 is written out,
``loss = -log sigmoid(-(beta/2) * ...)``, so ``beta`` means what the Diffusion-DPO paper means
(good range 2000-5000; its launchers use 5000). diffusers' DPO script's ``beta_dpo = 2500`` is the
same loss as ``beta = 5000`` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

DEFAULT_BETA = 5000.0


@dataclass(frozen=True)
class PairLosses:
    """Per-sample losses, shape ``(B,)`` each; losers and references are absent when not computed."""

    policy_w: torch.Tensor
    policy_l: torch.Tensor | None = None
    reference_w: torch.Tensor | None = None
    reference_l: torch.Tensor | None = None

    @classmethod
    def from_stacked(cls, policy: torch.Tensor, reference: torch.Tensor | None, num_pairs: int) -> PairLosses:
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
        return cls(pw, pl, rw, rl)


def _means(losses: PairLosses) -> dict[str, torch.Tensor]:
    names = {"policy_w": "loss_w_policy", "policy_l": "loss_l_policy",
             "reference_w": "loss_w_reference", "reference_l": "loss_l_reference"}
    return {m: getattr(losses, f).detach().mean() for f, m in names.items() if getattr(losses, f) is not None}


def _preference_metrics(inside: torch.Tensor) -> dict[str, torch.Tensor]:
    inside = inside.detach()
    return {
        # implicit reward margin r_w - r_l; accuracy counts a tie as half, as METHOD.md
        "implicit_acc": (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean(),
        "reward_margin": inside.mean(),
    }


def _require(losses: PairLosses, *fields: str, objective: str) -> None:
    missing = [f for f in fields if getattr(losses, f) is None]
    if missing:
        raise ValueError(f"{objective} needs per-sample losses for {', '.join(missing)}")


@dataclass(frozen=True)
class SFT:
    """``loss = L^w_theta``: the diffusion loss on winners only."""

    needs_reference = False
    uses_loser = False

    def __call__(self, losses: PairLosses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = losses.policy_w.mean()
        return loss, {"loss": loss.detach(), **_means(losses)}


@dataclass(frozen=True)
class DPO:
    """(8) ``-log sigmoid(-(beta/2) * ((L^w_theta - L^w_ref) - (L^l_theta - L^l_ref)))``."""

    beta: float = DEFAULT_BETA
    needs_reference = True
    uses_loser = True

    def __call__(self, losses: PairLosses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(losses, "policy_l", "reference_w", "reference_l", objective="DPO")
        model_diff = losses.policy_w - losses.policy_l
        ref_diff = losses.reference_w - losses.reference_l
        inside = -(self.beta / 2) * (model_diff.float() - ref_diff.float())
        loss = -F.logsigmoid(inside).mean()
        return loss, {"loss": loss.detach(), **_means(losses), **_preference_metrics(inside)}


@dataclass(frozen=True)
class CPO:
    """(11) ``-log sigmoid(-(beta/2) * (L^w_theta - L^l_theta)) + lambda * L^w_theta`` (reference-free).

    ``lam = 0`` reproduces the authors' public code, which dropped the behaviour-cloning term.
    """

    beta: float = DEFAULT_BETA
    lam: float = 1.0
    needs_reference = False
    uses_loser = True

    def __call__(self, losses: PairLosses) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _require(losses, "policy_l", objective="CPO")
        inside = -(self.beta / 2) * (losses.policy_w.float() - losses.policy_l.float())
        preference = -F.logsigmoid(inside).mean()
        behaviour_cloning = losses.policy_w.mean()
        loss = preference + self.lam * behaviour_cloning
        return loss, {
            "loss": loss.detach(),
            "preference_loss": preference.detach(),
            "bc_loss": behaviour_cloning.detach(),
            **_means(losses),
            **_preference_metrics(inside),
        }
