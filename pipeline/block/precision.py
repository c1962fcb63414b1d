"""Mixed precision (--precision): the autocast a block computes under and the loss scaler it steps with.

fp32   no autocast, no scaler: the code path (and every number) of a run without the option.
bf16   torch.autocast(device, bfloat16) around a block's forward and its heads' forward; no scaler (bf16 has the
       exponent range of fp32). The block's output is bf16, so the activation a stage sends is half the bytes.
fp16   the same with float16, and one torch.amp.GradScaler per block: each block has its own loss and optimizer.

Parameters, gradients and optimizer state stay fp32 (autocast casts on the fly), and every local loss, similarity
matrix and DFA error is computed in fp32 from a float copy of the head outputs (`float32_math`): a similarity
matrix is a (B, B) matmul of unit rows, whose bf16 rounding (3 significant digits) would swamp the MSE against
the label similarities. https://pytorch.org/docs/stable/amp.html ("Autocast op reference") lists which ops autocast
lowers; matmul-like ops (linear, conv, matmul) are among them on both CPU and CUDA.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import ContextManager

import torch

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, slots=True)
class Precision:
    """How one block computes: the compute dtype of its forward on a device type (cpu or cuda)."""

    name: str = "fp32"
    device_type: str = "cpu"

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the block's activations and of the output it hands on."""
        return COMPUTE_DTYPES[self.name]

    def autocast(self) -> ContextManager:
        """Context for a block's forward and its heads' forward; nothing at all under fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler | None:
        """A fresh loss scaler for one block under fp16, else None.

        With a fused optimizer (`_step_supports_amp_scaling`, torch/optim/adam.py and sgd.py) GradScaler.step hands
        the optimizer `grad_scale` and `found_inf` tensors and never reads them on the host
        (torch/amp/grad_scaler.py, step()), and update() changes the scale on the device: no sync per step.
        """
        return torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None


AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def float32_math(device_type: str) -> ContextManager:
    """Inside: autocast is off, so loss math on float tensors runs in fp32 (nothing to do when it was off, or on a
    device type autocast does not know, such as the meta device of the dry run)."""
    if device_type in AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def supported(name: str, device_type: str) -> bool:
    """Whether this torch autocasts to `name` on the device type (and, for fp16, has a loss scaler for it).

    An autocast dtype a device does not support is not an error: torch warns and disables autocast
    (torch/amp/autocast_mode.py), so a warning counts as no.
    """
    if name == "fp32":
        return True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autocast(device_type, dtype=COMPUTE_DTYPES[name]):
                pass
            if name == "fp16":
                torch.amp.GradScaler(device_type)
        except (RuntimeError, ValueError, AttributeError, TypeError):
            return False
    return not caught
