"""The six methods by name: a preference objective paired with a loss space.

``sft``, ``dpo``, ``cpo`` compare noise predictions (3); ``ncp-sft``, ``ncp-dpo``, ``ncp-cpo`` compare
features of the frozen U-Net's down path at ``t-1`` (12)-(17). The training step only reads the
declared needs (:attr:`Objective.needs_reference_prediction`, :attr:`Objective.uses_loser`).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, replace

from ncppo.errors import UsageError
from ncppo.objectives.preference import AUTO, CPO, DEFAULT_BETA, DPO, SFT
from ncppo.objectives.spaces import NoiseSpace, PerceptualSpace
from ncppo.perception import DEFAULT_BLOCKS, NoiseConditionedEncoder

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

    @property
    def supports_ties(self) -> bool:
        """Whether tied pairs can be trained (with a loss symmetric in the two images)."""
        return self.preference.supports_ties

    @property
    def needs_calibration(self) -> bool:
        """Whether ``beta`` is ``'auto'`` and must be calibrated before training (``calibrate_beta``)."""
        return self.preference.beta == AUTO

    def validate(self, model) -> None:
        """Check the objective against the model before training (e.g. a transformer's encoder depth and
        block indices against its block count): a ``UsageError`` naming the bad option."""
        if self.space.needs_frozen_unet:
            self.space.encoder.levels(model.unet)

    def with_beta(self, beta: float) -> Objective:
        """The same objective with a numeric ``beta`` (after calibration)."""
        return replace(self, preference=replace(self.preference, beta=float(beta)))


def unknown_name_message(kind: str, name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown {kind} {name!r}; expected one of {', '.join(choices)}.{hint}"


def make_objective(
    name: str,
    *,
    beta: float | str | None = None,
    cpo_lambda: float = 1.0,
    features: str = "last",
    level_weights: tuple[float, ...] | None = None,
    level_norm: str = "none",
    encoder_timestep: str = "t-1",
    scale: str = "noise",
    distance: str = "auto",
    encoder_dtype: str = "model",
    encoder_blocks: float | int | tuple[int, ...] | None = None,
) -> Objective:
    """Build one of :data:`OBJECTIVE_NAMES`.

    ``beta`` uses METHOD.md's convention (default 5000) or is ``"auto"`` (calibrated by
    :func:`ncppo.objectives.calibrate_beta`; refused for SFT, which has no sigmoid). The other options
    apply to the ``ncp-*`` objectives only (see :class:`PerceptualSpace` and
    :class:`NoiseConditionedEncoder`): ``features``, ``level_weights``, ``level_norm``, ``encoder_timestep``,
    ``scale`` (``paper`` | ``noise``), ``distance`` (``auto`` | ``exact`` | ``linear``), ``encoder_dtype``
    (``model`` | ``fp32``), ``encoder_blocks`` (a transformer's encoder depth: a fraction of its blocks, a
    count or a list of indices; default half). Invalid values raise a ``ValueError`` listing the valid ones.
    """
    if name not in OBJECTIVE_NAMES:
        raise UsageError(unknown_name_message("objective", name, OBJECTIVE_NAMES))
    base = name.removeprefix("ncp-")
    if isinstance(beta, str):
        if beta != AUTO:
            raise UsageError(f"beta must be a number or 'auto', got {beta!r}")
        if base == "sft":
            raise UsageError(f"beta 'auto' calibrates a sigmoid's argument; {name} has none (and no beta)")
    else:
        beta = DEFAULT_BETA if beta is None else float(beta)
    preference = {"sft": SFT(), "dpo": DPO(beta=beta), "cpo": CPO(beta=beta, lam=cpo_lambda)}[base]
    blocks = DEFAULT_BLOCKS if encoder_blocks is None else (
        tuple(encoder_blocks) if isinstance(encoder_blocks, (list, tuple)) else encoder_blocks)
    encoder = NoiseConditionedEncoder(features, tuple(level_weights) if level_weights is not None else None, level_norm,
                                      blocks)
    perceptual = PerceptualSpace(encoder, encoder_timestep, scale, distance, encoder_dtype)  # validates the options
    space = perceptual if name.startswith("ncp-") else NoiseSpace()
    return Objective(name, space, preference)
