"""The noise-conditioned perceptual encoder ``f(x, t', c)``: METHOD.md equations (12)-(13).

``f`` is the downsampling half of the *frozen* pretrained U-Net: its time (and SDXL "text_time")
embedding, ``conv_in`` and every down block, run without the up path. It is built from the U-Net's
own sub-modules, so its tensors are exactly those of a full forward (tests check this with hooks).

Feature choices (METHOD.md, "Options the authors' code has"):

- ``last``     the last down block's output (paper default; the authors' SDXL script)
- ``mid``      the mid block only (the authors' SD1.5 ``--use_middle_states``; Lin & Yang)
- ``all+mid``  every down block and the mid block (the authors' SD1.5 "multihead" scripts, with
  ``level_norm="channels"``)
- ``all``      ``conv_in`` and every down block
- ``last+mid`` the last down block and the mid block (no script of the authors uses it)

The perceptual distance (13) is the per-sample MSE of each feature level, averaged over levels
(with optional weights), after an optional per-level normalisation of the difference
(:data:`LEVEL_NORMS`): ``none`` (paper), ``channels`` (each level rescaled by ``C_last / C_level``, as
the authors' multihead scripts), ``target`` (per sample and channel, divided by the spatial standard
deviation of the target's features, as the latent perceptual loss of Berrada et al.).

:meth:`NoiseConditionedEncoder.jvp` gives the first-order form ``J_f(x*) d`` of the encoder around the
target (a forward-mode JVP): its distance agrees with the exact one to second order in the small
perturbation ``d`` and keeps its precision in half precision, where the difference of two encoder
passes drowns in rounding. The encoder does not own weights or switch adapters: the caller passes the
frozen U-Net (for LoRA, the policy U-Net inside its adapters-disabled context).

For a transformer (SD3's MMDiT, FLUX.1, PixArt-Sigma's DiT), ``f`` is its first part: the patch embedding (with positions; FLUX:
rotary ids), the timestep, guidance and pooled-text conditioning, the caption projection and the first ``K``
blocks (FLUX: double-stream, then single-stream) (``blocks``: a fraction
of the depth, a block count, or a list of block indices). Only the image tokens are compared (the text
stream is not part of the distance); they are returned channels first, ``(N, D, L)``, so the level
normalisations treat the token width as channels. ``features`` is ``last`` (the deepest chosen block) or
``all`` (each chosen block).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ncppo.errors import UsageError

FEATURE_CHOICES = ("last", "mid", "all+mid", "all", "last+mid")
TOKEN_FEATURES = ("last", "all")  # a transformer's choices
LEVEL_NORMS = ("none", "channels", "target")
DEFAULT_BLOCKS = 0.5  # half the depth: the U-Net's down path is about its first half (not yet chosen by evidence)


def _is_token_model(model) -> bool:
    return hasattr(model, "transformer_blocks") and not hasattr(model, "down_blocks")


def _token_blocks(model) -> list[torch.nn.Module]:
    """A transformer's blocks in forward order (FLUX: the double-stream blocks, then the single-stream ones)."""
    return list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", None) or [])


def block_indices(blocks, depth: int, features: str = "last") -> list[int]:
    """The transformer blocks whose image tokens are the features: ``blocks`` a fraction in (0, 1] of ``depth``
    (the first ``round(fraction * depth)``, at least 1), a count ``K >= 1``, or a list of indices."""
    if features not in TOKEN_FEATURES:
        raise UsageError(f"perceptual features {features!r} are a U-Net's; a transformer's are one of {TOKEN_FEATURES}")
    if isinstance(blocks, (list, tuple)):
        bad = [i for i in blocks if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < depth]
        if bad or not blocks:
            raise UsageError(f"unknown encoder block index {bad[0] if bad else '(none given)'!r}: this transformer "
                             f"has {depth} blocks, indices 0 to {depth - 1}")
        return sorted(set(blocks))
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        if blocks > depth:
            raise UsageError(f"encoder depth {blocks} exceeds this transformer's {depth} blocks")
        count = blocks
    else:
        count = max(1, round(float(blocks) * depth))
    return list(range(count)) if features == "all" else [count - 1]


def _check_blocks(blocks) -> None:
    if isinstance(blocks, (list, tuple)):
        if not blocks or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in blocks):
            raise UsageError(f"encoder blocks {list(blocks)!r}: block indices must be integers >= 0")
    elif isinstance(blocks, bool) or not isinstance(blocks, (int, float)):
        raise UsageError(f"encoder blocks must be a fraction of the depth, a block count or a list of indices; "
                         f"got {blocks!r}")
    elif isinstance(blocks, int) and blocks < 1:
        raise UsageError(f"encoder depth must be >= 1 block, got {blocks}")
    elif isinstance(blocks, float) and not 0 < blocks <= 1:
        raise UsageError(f"encoder blocks as a fraction of the depth must lie in (0, 1], got {blocks}")


def feature_names(features: str, num_down_blocks: int) -> list[str]:
    """Names of the feature levels a choice returns, in order (``down_i`` is down block ``i``'s output)."""
    last = f"down_{num_down_blocks - 1}"
    if features == "last":
        return [last]
    if features == "last+mid":
        return [last, "mid"]
    if features == "mid":
        return ["mid"]
    if features == "all":
        return ["conv_in"] + [f"down_{i}" for i in range(num_down_blocks)]
    if features == "all+mid":
        return [f"down_{i}" for i in range(num_down_blocks)] + ["mid"]
    raise UsageError(f"unknown perceptual feature choice {features!r}; expected one of {FEATURE_CHOICES}")


@dataclass(frozen=True)
class NoiseConditionedEncoder:
    """``f``: maps ``(x, t', c)`` to a list of feature tensors of a frozen U-Net's down path."""

    features: str = "last"
    level_weights: tuple[float, ...] | None = None  # one per level; None = equal weights
    level_norm: str = "none"  # one of LEVEL_NORMS
    blocks: float | int | tuple[int, ...] = DEFAULT_BLOCKS  # a transformer's depth (see block_indices)

    def __post_init__(self):
        if self.features not in FEATURE_CHOICES:
            raise UsageError(
                f"unknown perceptual feature choice {self.features!r}; expected one of {FEATURE_CHOICES}"
            )
        if self.level_norm not in LEVEL_NORMS:
            raise UsageError(f"unknown level_norm {self.level_norm!r}; expected one of {LEVEL_NORMS}")
        if self.level_weights is not None and any(w < 0 for w in self.level_weights):
            raise UsageError("perceptual level weights must be non-negative")
        _check_blocks(self.blocks)

    def levels(self, unet: torch.nn.Module) -> list[str]:
        """The feature levels this choice returns for ``unet`` (checked against ``level_weights``)."""
        if _is_token_model(unet):
            if type(unet).__name__ not in TOKEN_PATHS:
                raise UsageError(f"no perceptual encoder for {type(unet).__name__}; transformers supported: "
                                 f"{', '.join(TOKEN_PATHS)}")
            names = [f"block_{i}" for i in block_indices(self.blocks, len(_token_blocks(unet)), self.features)]
        else:
            names = feature_names(self.features, len(unet.down_blocks))
        if self.level_weights is not None and len(self.level_weights) != len(names):
            raise UsageError(
                f"features={self.features!r} has {len(names)} levels ({names}) but "
                f"{len(self.level_weights)} level weights were given"
            )
        return names

    def __call__(
        self,
        unet: torch.nn.Module,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        return _features(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, self.levels(unet))

    def jvp(
        self,
        unet: torch.nn.Module,
        sample: torch.Tensor,
        tangent: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(f(sample), J_f(sample) tangent)`` in one forward-mode pass; gradients flow into ``tangent``."""
        from torch.func import jvp
        from torch.nn.attention import SDPBackend, sdpa_kernel

        names = self.levels(unet)
        dtype = unet.dtype

        def f(x):
            return tuple(_features(unet, x, timestep, encoder_hidden_states, added_cond_kwargs, names))

        # Autocast would cast the primal of float32 weights to half precision but not its tangent (a dtype
        # mismatch); with float32 weights the JVP then runs in float32, with half-precision weights in theirs.
        device = sample.device.type
        autocast = torch.autocast(device, enabled=False) if dtype == torch.float32 else contextlib.nullcontext()
        # the fused attention kernels have no forward-mode derivative; the math kernel has
        with sdpa_kernel(SDPBackend.MATH), autocast:
            primal, tangents = jvp(f, (sample.to(dtype).contiguous(),), (tangent.to(dtype).contiguous(),))
        return list(primal), list(tangents)

    def distance(self, feats_a: Sequence[torch.Tensor], feats_b: Sequence[torch.Tensor]) -> torch.Tensor:
        """(13) per-sample perceptual loss ``|| f(a) - f(b) ||^2`` (mean over feature dims), shape ``(N,)``;
        ``feats_b`` is the target (its statistics normalise the levels under ``level_norm='target'``)."""
        return perceptual_distance(feats_a, feats_b, self.level_weights, self.level_norm)

    def tangent_distance(self, tangents: Sequence[torch.Tensor], target: Sequence[torch.Tensor]) -> torch.Tensor:
        """``|| J_f(x*) d ||^2`` per sample with the same reduction and normalisation as :meth:`distance`."""
        return self.tangent_inner(tangents, tangents, target)

    def tangent_inner(self, u: Sequence[torch.Tensor], v: Sequence[torch.Tensor], target: Sequence[torch.Tensor]
                      ) -> torch.Tensor:
        """``<J u, J v>`` per sample, the bilinear form whose diagonal is :meth:`tangent_distance`: with it a
        difference of two distances is computed from the difference of their tangents, not by cancellation."""
        return _reduce([a.float() for a in u], target, self.level_weights, self.level_norm, [b.float() for b in v])


def _level_factor(target: torch.Tensor, channels_last: int, level_norm: str) -> torch.Tensor | float:
    if level_norm == "channels":
        return channels_last / target.shape[1]
    if level_norm == "target":
        spread = target.detach().float().flatten(2).std(dim=2).clamp(min=1e-6)
        return 1.0 / spread.view(*spread.shape, *([1] * (target.ndim - 2)))
    return 1.0


def _reduce(differences, target, level_weights, level_norm: str, others=None) -> torch.Tensor:
    """Per sample, the weighted mean over levels of ``mean((d s)^2)`` (or ``mean((d s)(e s))`` with ``others``)."""
    if len(differences) != len(target) or not differences:
        raise ValueError("both feature lists must have the same, non-zero number of levels")
    weights = list(level_weights) if level_weights is not None else [1.0] * len(differences)
    total = sum(weights)
    if total <= 0:
        raise ValueError("perceptual level weights must not all be zero")
    channels_last = target[-1].shape[1]
    others = differences if others is None else others
    per_level = []
    for d, e, b, w in zip(differences, others, target, weights, strict=True):
        factor = _level_factor(b, channels_last, level_norm)
        per_level.append(((d * factor) * (e * factor)).flatten(1).mean(dim=1) * (w / total))
    return torch.stack(per_level).sum(dim=0)


def perceptual_distance(
    feats_a: Sequence[torch.Tensor],
    feats_b: Sequence[torch.Tensor],
    level_weights: Sequence[float] | None = None,
    level_norm: str = "none",
) -> torch.Tensor:
    """Weighted mean over levels of each level's per-sample MSE (computed in float32), each level's
    difference normalised as ``level_norm`` says (``feats_b`` is the target)."""
    if len(feats_a) != len(feats_b):
        raise ValueError("both feature lists must have the same, non-zero number of levels")
    return _reduce([a.float() - b.float() for a, b in zip(feats_a, feats_b)], feats_b, level_weights, level_norm)


def _features(model, sample, timestep, encoder_hidden_states, added_cond_kwargs, names) -> list[torch.Tensor]:
    if _is_token_model(model):
        return TOKEN_PATHS[type(model).__name__](model, sample, timestep, encoder_hidden_states, added_cond_kwargs,
                                                 [int(n.split("_")[1]) for n in names])
    return _down_path(model, sample, timestep, encoder_hidden_states, added_cond_kwargs, names)


def _sd3_tokens(model, sample, timestep, encoder_hidden_states, added_cond_kwargs, indices) -> list[torch.Tensor]:
    """``SD3Transformer2DModel.forward`` up to block ``max(indices)``: the image tokens after each chosen block."""
    pooled = (added_cond_kwargs or {}).get("text_embeds")
    if pooled is None:
        raise UsageError("an SD3-class transformer needs the pooled text embedding (Condition.text_embeds)")
    if sample.ndim != 4 or sample.shape[1] != model.config.in_channels:
        raise ValueError(f"encoder input must be (N, {model.config.in_channels}, H, W); got {tuple(sample.shape)}")
    dtype = model.dtype
    hidden = model.pos_embed(sample.to(dtype)).contiguous()
    temb = model.time_text_embed(timestep, pooled.to(dtype))
    context = model.context_embedder(encoder_hidden_states.to(dtype))
    found = {}
    for i, block in enumerate(model.transformer_blocks[: max(indices) + 1]):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                joint_attention_kwargs=None)
        found[i] = hidden
    return [found[i].transpose(1, 2) for i in indices]


def _flux_tokens(model, sample, timestep, encoder_hidden_states, added_cond_kwargs, indices) -> list[torch.Tensor]:
    """``FluxTransformer2DModel.forward`` on the packed latents up to block ``max(indices)`` (double-stream blocks
    first, then single-stream ones): the image tokens after each chosen block. ``timestep`` is ``sigma T``."""
    from ncppo.batch import Condition
    from ncppo.models.transformers_backbone import flux_inputs, pack_latents

    added = added_cond_kwargs or {}
    if added.get("text_embeds") is None:
        raise UsageError("a FLUX-class transformer needs the pooled text embedding (Condition.text_embeds)")
    dtype = model.dtype
    condition = Condition(encoder_hidden_states.to(dtype), added["text_embeds"], None, added.get("guidance"))
    inputs = flux_inputs(sample, timestep, condition)
    hidden = model.x_embedder(pack_latents(sample.to(dtype)))
    step = inputs["timestep"].to(hidden.dtype) * 1000  # the forward's own arithmetic, for identical tensors
    guidance = inputs["guidance"]
    if guidance is None:
        temb = model.time_text_embed(step, inputs["pooled_projections"])
    else:
        temb = model.time_text_embed(step, guidance.to(hidden.dtype) * 1000, inputs["pooled_projections"])
    context = model.context_embedder(condition.encoder_hidden_states)
    rotary = model.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
    found = {}
    for i, block in enumerate(_token_blocks(model)[: max(indices) + 1]):
        context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                image_rotary_emb=rotary, joint_attention_kwargs=None)
        found[i] = hidden
    return [found[i].transpose(1, 2) for i in indices]


def _pixart_tokens(model, sample, timestep, encoder_hidden_states, added_cond_kwargs, indices) -> list[torch.Tensor]:
    """``PixArtTransformer2DModel.forward`` up to block ``max(indices)``: the image tokens after each chosen block
    (its blocks cross-attend to the masked T5 tokens: there is no text stream to leave out)."""
    from ncppo.models.transformers_backbone import PIXART_NO_SIZE

    mask = (added_cond_kwargs or {}).get("encoder_attention_mask")
    hidden = sample.to(model.dtype)
    if mask is not None and mask.ndim == 2:  # the forward's own conversion to an additive bias
        mask = ((1 - mask.to(hidden.dtype)) * -10000.0).unsqueeze(1)
    n = hidden.shape[0]
    hidden = model.pos_embed(hidden)
    emb, _ = model.adaln_single(timestep, dict(PIXART_NO_SIZE), batch_size=n, hidden_dtype=hidden.dtype)
    context = model.caption_projection(encoder_hidden_states.to(model.dtype)).view(n, -1, hidden.shape[-1])
    found = {}
    for i, block in enumerate(model.transformer_blocks[: max(indices) + 1]):
        hidden = block(hidden, attention_mask=None, encoder_hidden_states=context, encoder_attention_mask=mask,
                       timestep=emb, cross_attention_kwargs=None, class_labels=None)
        found[i] = hidden
    return [found[i].transpose(1, 2) for i in indices]


TOKEN_PATHS = {"SD3Transformer2DModel": _sd3_tokens, "FluxTransformer2DModel": _flux_tokens,
               "PixArtTransformer2DModel": _pixart_tokens}


def _down_path(unet, sample, timestep, encoder_hidden_states, added_cond_kwargs, names) -> list[torch.Tensor]:
    """The first half of ``UNet2DConditionModel.forward``, stopping at the deepest feature asked for."""
    config = unet.config
    if sample.ndim != 4 or sample.shape[1] != config.in_channels:
        raise ValueError(
            f"encoder input must be (N, {config.in_channels}, H, W) for this U-Net; got {tuple(sample.shape)}"
        )
    if config.addition_embed_type == "text_time" and not (
        added_cond_kwargs and "text_embeds" in added_cond_kwargs and "time_ids" in added_cond_kwargs
    ):
        raise UsageError("an SDXL-class U-Net needs added_cond_kwargs with 'text_embeds' and 'time_ids'")
    if config.class_embed_type is not None or config.num_class_embeds is not None:
        raise UsageError("class-conditioned U-Nets are not supported by the perceptual encoder")

    sample = sample.to(unet.dtype)
    encoder_hidden_states = encoder_hidden_states.to(unet.dtype)  # an fp32 encoder gets half-precision embeddings
    if config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    aug_emb = unet.get_aug_embed(
        emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )
    if aug_emb is not None:
        emb = emb + aug_emb
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    encoder_hidden_states = unet.process_encoder_hidden_states(
        encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs or {}
    )

    wanted = set(names)
    found: dict[str, torch.Tensor] = {}
    hidden = unet.conv_in(sample)
    found["conv_in"] = hidden
    deepest = len(unet.down_blocks) - 1 if "mid" in wanted else max(
        (int(n.split("_")[1]) for n in wanted if n.startswith("down_")), default=-1
    )
    for i, block in enumerate(unet.down_blocks[: deepest + 1]):
        if getattr(block, "has_cross_attention", False):
            hidden, _ = block(hidden_states=hidden, temb=emb, encoder_hidden_states=encoder_hidden_states)
        else:
            hidden, _ = block(hidden_states=hidden, temb=emb)
        found[f"down_{i}"] = hidden
    if "mid" in wanted:
        if unet.mid_block is None:
            raise UsageError("this U-Net has no mid block; choose features 'last' or 'all'")
        if getattr(unet.mid_block, "has_cross_attention", False):
            found["mid"] = unet.mid_block(hidden, emb, encoder_hidden_states=encoder_hidden_states)
        else:
            found["mid"] = unet.mid_block(hidden, emb)
    return [found[n] for n in names]
