"""What the trainer watches besides the loss: warnings a user can act on (a loss stuck at log 2, updates
set by AdamW's eps), and the stop rule for steps without a valid pair."""

from __future__ import annotations

import math

import torch

from ncppo.errors import NcppoError

FLAT_ARGUMENT = 1e-3  # argument_rms below this: the sigmoid's argument is ~0 and the loss sits at log 2
EPS_DOMINATED = 0.5  # eps_dominated_frac above this: most Adam updates are set by eps, not by the gradient


class TooManySkippedSteps(NcppoError, ValueError):
    """Too large a share of the optimiser steps had no valid pair (bad images); the message has the skip report."""


@torch.no_grad()
def eps_dominated_frac(optimizer) -> float | None:
    """Share of trained entries whose Adam denominator ``sqrt(exp_avg_sq / bias_correction2)`` is below eps.

    There ``eps`` sets the update size, not the gradient (AdamW divides by ``sqrt(v_hat) + eps``). None for
    optimizers without ``exp_avg_sq`` (8-bit AdamW keeps it quantised). ``optimizer`` may be accelerate's wrapper.
    """
    opt = getattr(optimizer, "optimizer", optimizer)
    below, total = [], 0
    for group in opt.param_groups:
        eps, beta2 = group.get("eps"), group.get("betas", (None, None))[1]
        if eps is None or beta2 is None:
            return None
        for p in group["params"]:
            state = opt.state.get(p) or {}
            v = state.get("exp_avg_sq")
            if v is None or "step" not in state or not torch.is_tensor(v) or v.dtype == torch.uint8:
                continue
            bias_correction2 = 1 - beta2 ** float(state["step"])
            below.append((v < eps * eps * bias_correction2).sum())  # sqrt(v / bc2) < eps, without the sqrt
            total += v.numel()
    if not total:
        return None
    return float(torch.stack(below).sum()) / total  # one device sync


class Diagnostics:
    """Warnings (each once, kept in ``warnings`` for ``summary.json``) and the counters a checkpoint keeps."""

    def __init__(self, config, say):
        self.config, self.say = config, say
        self.warnings: list[dict] = []
        self.counts = {"no_valid_pair": 0, "nonfinite": 0}
        self.runs = {"flat_argument": 0, "eps_dominated": 0}  # consecutive logged steps in each condition

    def state(self) -> dict:
        return {"counts": self.counts, "diagnostic_runs": self.runs, "warnings": self.warnings}

    def restore(self, state: dict) -> None:
        self.counts.update(state.get("counts", {}))
        self.runs.update(state.get("diagnostic_runs", {}))
        for w in state.get("warnings", []):
            if not any(w["code"] == x["code"] for x in self.warnings):
                self.warnings.append(w)

    def warn(self, code: str, step: int, message: str) -> None:
        if any(w["code"] == code for w in self.warnings):
            return
        self.warnings.append({"code": code, "step": step, "message": message})
        self.say(f"warning: {message}")

    def observe(self, step: int, row: dict) -> None:
        """Look at one logged row; warn once a condition has held for ``diagnostics_window`` logged steps."""
        n = self.config.diagnostics_window
        arg = row.get("argument_rms")
        if arg is not None and math.isfinite(arg):
            self.runs["flat_argument"] = self.runs["flat_argument"] + 1 if arg < FLAT_ARGUMENT else 0
            if self.runs["flat_argument"] >= n:
                self.warn("flat_loss", step, f"argument_rms has stayed below {FLAT_ARGUMENT:g} for {n} logged steps "
                          f"({arg:.2g} at step {step}): the loss sits at log 2 and the model barely learns; raise "
                          "objective.beta (or beta: auto for ncp-*, or objective.scale: noise)")
        frac = row.get("eps_dominated_frac")
        if frac is not None:
            self.runs["eps_dominated"] = self.runs["eps_dominated"] + 1 if frac > EPS_DOMINATED else 0
            if self.runs["eps_dominated"] >= n:
                self.warn("eps_dominated", step, f"most updates are below AdamW's eps: raise the loss scale or lower "
                          f"adam_epsilon (eps_dominated_frac {frac:.2f} for {n} logged steps, at step {step}; "
                          f"optim.adam_epsilon={self.config.optim.adam_epsilon:g})")

    def check_skipped(self, step: int, skip_report: str, final: bool = False) -> None:
        """Stop once more than ``max_skipped_step_fraction`` of the steps had no valid pair."""
        fraction = self.config.max_skipped_step_fraction
        if fraction is None or step == 0 or (not final and step < self.config.skipped_step_check_after):
            return
        skipped = self.counts["no_valid_pair"]
        if skipped / step > fraction:
            raise TooManySkippedSteps(
                f"train: stopping at step {step}: {skipped} of {step} optimiser steps ({skipped / step:.0%}) had no valid "
                f"pair (max_skipped_step_fraction={fraction:g}); the data's skip report: {skip_report}; fix or "
                "filter the data (ncppo data filter), or raise max_skipped_step_fraction")

    @staticmethod
    def summarise(rows: list[dict]) -> dict:
        """``{metric: {"final", "mean"}}`` of the diagnostic metrics over the logged rows."""
        out = {}
        keys = ["loss", "argument_rms", "saturated_frac", "eps_dominated_frac", "grad_norm", "grad_norm_clipped"]
        keys += sorted({k for r in rows for k in r if k.startswith("pl_over_l_t")})
        for key in keys:
            values = [float(r[key]) for r in rows if key in r and r[key] is not None and math.isfinite(float(r[key]))]
            if values:
                out[key] = {"final": values[-1], "mean": sum(values) / len(values)}
        return out
