"""Where does half precision lose the policy-reference difference? A block-by-block trace of the difference pass.

For each tiny model class, a LoRA policy away from its reference (``mixed_precision.py``'s: rank 8, B drawn
at scale 0.02) runs once in float32 as two separate passes (the truth: ``policy - reference`` per block
output, subtracted in float64) and once as the difference pass in bf16 (frozen weights bf16, LoRA float32, CPU autocast, as the trainer runs it). Per
top-level block output it reports two relative errors against the truth: the reference activation's own
(``ref``: what bf16 does to the reference's values) and the carried difference's (``diff``). The pass
promises that ``diff`` keeps half precision's relative accuracy, so ``diff`` should stay within a small factor
of ``ref``; a block where ``diff`` jumps far above ``ref`` is where the pass (or the model) loses more.

    python benchmarks/difference_trace.py                 # every class, about 10 CPU-seconds
    python benchmarks/difference_trace.py --kinds flux    # one

Writes benchmarks/results/difference_trace.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mixed_precision as mp  # noqa: E402

from ncppo.batch import PreferenceBatch  # noqa: E402
from ncppo.io import atomic_write_text  # noqa: E402
from ncppo.models.paired_arithmetic import Paired  # noqa: E402
from ncppo.models.tiny import build_tiny_pipeline  # noqa: E402
from ncppo.step import noise_pairs  # noqa: E402

KINDS = ("sd15", "sdxl", "sd3", "flux", "pixart")
RESULT = Path(__file__).parent / "results" / "difference_trace.json"


def _capture(model, store: dict):
    """Hooks recording each top-level block's output (the first tensor of a tuple), in call order."""
    def hook(_module, _inputs, output, name):
        out = output[0] if isinstance(output, (tuple, list)) else output
        if isinstance(out, torch.Tensor):
            store.setdefault(name, []).append(out)

    blocks = [(n, m) for n, m in model.unet.named_modules() if n and "lora" not in n and
              (n.count(".") == 1 and n.split(".")[0].endswith(("blocks", "transformer_blocks")) or n.count(".") == 0)]
    return [m.register_forward_hook(lambda mod, i, o, n=n: hook(mod, i, o, n)) for n, m in blocks]


def _remove(hooks) -> None:
    for handle in hooks:
        handle.remove()


def _relative(a: torch.Tensor, truth: torch.Tensor) -> float:
    return float((a.double() - truth).norm() / truth.norm())


def trace(kind: str, lora_b_scale: float = 0.02) -> list[dict]:
    pipe = build_tiny_pipeline(kind, image_size=32, seed=0)
    exact, half = (mp._model(pipe, None, "cpu", lora_b_scale, "difference") for _ in range(2))
    g = torch.Generator().manual_seed(0)
    batch = PreferenceBatch(pixel_values_w=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
                            pixel_values_l=torch.rand(2, 3, 32, 32, generator=g) * 2 - 1,
                            prompts=["a red circle", "a blue square"])
    noised = noise_pairs(exact, exact.encode_batch(batch, g), True, g)
    args = (noised.x_t, noised.t, noised.condition)
    policy, reference, fused = {}, {}, {}
    with torch.no_grad():
        hooks = _capture(exact, policy)
        exact.predict_epsilon(exact.policy, *args)
        _remove(hooks)
        with exact.frozen_unet() as frozen:
            hooks = _capture(exact, reference)
            exact.predict_epsilon(frozen, *args)
            _remove(hooks)
        half.set_frozen_dtype(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            hooks = _capture(half, fused)
            half.predict_with_reference(*args)
            _remove(hooks)
    rows = []
    for name, outs in fused.items():
        for k, out in enumerate(outs):
            if k >= len(policy.get(name, [])):
                continue
            truth = policy[name][k].double() - reference[name][k].double()
            if float(truth.norm()) == 0:
                continue  # before the first adapter: no difference yet
            ref_value = out.ref if isinstance(out, Paired) else out
            diff = out.diff if isinstance(out, Paired) and out.diff is not None else torch.zeros_like(truth)
            rows.append({"block": f"{name}[{k}]" if len(outs) > 1 else name,
                         "ref_error": _relative(ref_value, reference[name][k].double()) if ref_value is not None else None,
                         "diff_error": _relative(diff, truth),
                         "diff_over_value": float(truth.norm() / policy[name][k].double().norm())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    args = parser.parse_args()
    record = {"command": "python benchmarks/difference_trace.py " + (
        "" if args.kinds == list(KINDS) else "--kinds " + " ".join(args.kinds)), "lora_b_scale": 0.02,
        "precision": "bf16 (frozen weights bf16, LoRA float32, CPU autocast)", "models": {}}
    for kind in args.kinds:
        rows = record["models"][kind] = trace(kind)
        print(f"== {kind}")
        for r in rows:
            ref = "   -  " if r["ref_error"] is None else f"{r['ref_error']:.4f}"
            print(f"  ref {ref}  diff {r['diff_error']:.4f}  |d|/|x| {r['diff_over_value']:.1e}  {r['block']}")
    RESULT.parent.mkdir(exist_ok=True)
    atomic_write_text(RESULT, json.dumps(record, indent=1))
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
