"""The six methods by name: a preference objective paired with a loss space.

``sft``, ``dpo``, ``cpo`` compare noise predictions (3); ``ncp-sft``, ``ncp-dpo``, ``ncp-cpo`` compare
features of the frozen U-Net's down path at ``t-1`` (12)-(17). The training step only reads the
declared needs (:attr:`Objective.needs_reference_prediction`, :attr:`Objective.uses_loser`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ncppo.objectives.preference import CPO, DEFAULT_BETA, DPO, SFT
from ncppo.objectives.spaces import NoiseSpace, PerceptualSpace
from ncppo.perception import NoiseConditionedEncoder

OBJECTIVE_NAMES = ("sft", "dpo", "cpo", "ncp-sft", "ncp-dpo", "ncp-cpo")


@dataclass(frozen=True)
class Objective:
    name: str
    space: NoiseSpace | PerceptualSpace
    preference: SFT | DPO | CPO

    @property
    def needs_reference_prediction(self) -> bool:
        """Whether the frozen reference's ``eps_ref`` must be computed (DPO and NCP-DPO)."""
        return self.preference.needs_reference

    @property
    def uses_loser(self) -> bool:
        """Whether losers are run at all (SFT trains on winners only)."""
        return self.preference.uses_loser

    @property
    def needs_frozen_unet(self) -> bool:
        """Whether the frozen pretrained U-Net is used (as reference or as the encoder ``f``)."""
        return self.needs_reference_prediction or self.space.needs_frozen_unet


def unknown_name_message(kind: str, name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}; expected one of {', '.join(choices)}.{hint}"


def make_objective(
    name: str,
    *,
    beta: float | None = None,
    cpo_lambda: float = 1.0,
    features: str = "last",
    level_weights: tuple[float, ...] | None = None,
    encoder_timestep: str = "t-1",
) -> Objective:
    """Build one of :data:`OBJECTIVE_NAMES`. ``beta`` uses METHOD.md's convention (default 5000);
    the encoder options apply to the ``ncp-*`` objectives only."""
    if name not in OBJECTIVE_NAMES:
        raise ValueError(unknown_name_message("objective", name, OBJECTIVE_NAMES))
    beta = DEFAULT_BETA if beta is None else float(beta)
    base = name.removeprefix("ncp-")
    preference = {"sft": SFT(), "dpo": DPO(beta=beta), "cpo": CPO(beta=beta, lam=cpo_lambda)}[base]
    if name.startswith("ncp-"):
        space = PerceptualSpace(NoiseConditionedEncoder(features, level_weights), encoder_timestep)
    else:
        space = NoiseSpace()
    return Objective(name, space, preference)
