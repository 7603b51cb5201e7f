"""The kernel backends' ops: one folder per backend, one file per op (Liger-Kernel's layout).

    autograd.py   what every backend shares: entry points, layout rule, autograd registrations,
                  the ops' differentiable math; imports no backend
    triton/       the Triton kernels, their launchers and torch.library ops (common.py: the pieces
                  both ops use)
    cuda/         the CUDA extension's Python side (imported by compacter_kernels._extension once
                  compacter_kernels._C has loaded)
"""
