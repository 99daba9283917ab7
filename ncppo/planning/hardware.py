"""GPUs (peak dense tensor-core throughput and memory) and the optimiser's state bytes per parameter.

The peaks are the vendors' dense figures (no 2:4 sparsity) for the SXM parts unless named otherwise:
a run reaches a fraction of them (model FLOPs utilisation, printed beside every time estimate).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ncppo.errors import UsageError

DEFAULT_UTILIZATION = 0.35  # a plausible MFU for a U-Net step with small convolutions and attention at 1-4k tokens
MEMORY_RESERVE = 0.10  # of the GPU's memory kept for the CUDA context, cuDNN workspaces and fragmentation


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    tflops: dict  # precision -> peak dense TFLOP/s


GPUS = {
    "h100": GPU("NVIDIA H100 SXM 80GB", 80, {"bf16": 989.4, "fp16": 989.4, "no": 494.7}),
    "h100-pcie": GPU("NVIDIA H100 PCIe 80GB", 80, {"bf16": 756.0, "fp16": 756.0, "no": 378.0}),
    "h200": GPU("NVIDIA H200 SXM 141GB", 141, {"bf16": 989.4, "fp16": 989.4, "no": 494.7}),
    "a100": GPU("NVIDIA A100 SXM 80GB", 80, {"bf16": 312.0, "fp16": 312.0, "no": 156.0}),
    "a100-40gb": GPU("NVIDIA A100 SXM 40GB", 40, {"bf16": 312.0, "fp16": 312.0, "no": 156.0}),
    "l40s": GPU("NVIDIA L40S 48GB", 48, {"bf16": 362.05, "fp16": 362.05, "no": 183.0}),
}
PRECISION_NOTE = {"bf16": "bf16 tensor cores", "fp16": "fp16 tensor cores",
                  "no": "TF32 tensor cores (float32 training; PyTorch uses TF32 for convolutions by default)"}


def gpu(name: str) -> GPU:
    key = name.lower()
    if key not in GPUS:
        close = difflib.get_close_matches(key, list(GPUS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UsageError(f"unknown GPU {name!r}; known GPUs: {', '.join(GPUS)}.{hint}")
    return GPUS[key]


def optimizer_state_bytes(numels, optimizer: str) -> int:
    """AdamW's two moments per trainable parameter: float32 (8 bytes) for ``adamw``; for ``adamw8bit``
    (bitsandbytes) one byte each plus a float32 scale per block of 256, and float32 for tensors under
    4096 elements (bitsandbytes' ``min_8bit_size``)."""
    if optimizer == "adamw":
        return sum(8 * n for n in numels)
    if optimizer == "adamw8bit":
        return sum(8 * n if n < 4096 else 2 * n + 2 * 4 * -(-n // 256) for n in numels)
    raise UsageError(f"unknown optimizer {optimizer!r}; expected adamw or adamw8bit")
