"""Determinism: the switches behind --deterministic, set in every process before it touches a GPU.

[Note: determinism] A K-stage run computes what the sequential trainer computes, op for op, so on CPU the two
agree bit for bit. On a GPU the same op may not give the same bits twice: cuDNN picks convolution algorithms
by benchmarking (cudnn.benchmark) and some of them, and some backward kernels, add with atomics in whatever
order the threads finish; TF32 changes the matmul/conv precision. PyTorch's Reproducibility note
(https://pytorch.org/docs/stable/notes/randomness.html) lists the switches used here:
cudnn.deterministic = True and cudnn.benchmark = False, plus torch.use_deterministic_algorithms(True), which
makes every op with a deterministic variant use it and every op without one raise a RuntimeError
(https://pytorch.org/docs/stable/generated/torch.use_deterministic_algorithms.html). This project's ops
(linear, conv2d, batch norm, max/avg pool 2d, cross-entropy on (B, C) logits, one_hot) are not on that
function's raising list. TF32 is turned off because it is a different arithmetic, not a nondeterministic one:
it would differ from a CPU or an older GPU's results, never between two runs on one GPU.

CUBLAS_WORKSPACE_CONFIG=:4096:8: cuBLAS is reproducible only if concurrent streams do not share a workspace
(https://docs.nvidia.com/cuda/cublas/#results-reproducibility). torch before 2.10 demanded the variable under
use_deterministic_algorithms and read it once per process, at the first cuBLAS call (a static in
at::Context::alertCuBLASConfigNotDeterministic): if cuBLAS had already run without it, every later cuBLAS call
raises "Deterministic behavior was enabled ... but this operation is not deterministic because it uses
CuBLAS". torch 2.10 and later give each handle and stream its own workspace and dropped the check
(pytorch/pytorch#161749), so there the variable only sizes the workspace (also read once). Setting it here is
early enough for both: a stage process calls this first, before its device is set up, and so does the
sequential trainer; a process that already used CUDA gets a warning (set the variable in the environment).
"""

from __future__ import annotations

import os
import warnings

import torch

CUBLAS_WORKSPACE = ":4096:8"
DETERMINISTIC_WORKSPACES = (":4096:8", ":16:8")  # the two values cuBLAS documents as reproducible


def use_deterministic(enabled: bool) -> None:
    """With `enabled`, make cuDNN, cuBLAS and every torch op deterministic and turn TF32 off (see the note above);
    without, leave torch's defaults (and whatever the caller set) alone."""
    if not enabled:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in DETERMINISTIC_WORKSPACES:
        if torch.cuda.is_initialized():
            warnings.warn("--deterministic: CUDA was already in use in this process before CUBLAS_WORKSPACE_CONFIG "
                          f"was set; torch before 2.10 may refuse cuBLAS calls: set CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} "
                          "in the environment", RuntimeWarning, stacklevel=2)
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True)
