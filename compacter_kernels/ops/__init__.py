"""Triton kernels, one file per op (Liger-Kernel layout): kernels, launchers, torch.library ops."""
