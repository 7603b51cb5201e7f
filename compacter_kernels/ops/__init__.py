"""The kernel backends' ops, one file per op (Liger-Kernel layout): Triton kernels with their
launchers and torch.library registrations (adapter.py, phm_linear.py), the CUDA extension's
Python side (cuda_adapter.py, cuda_phm_linear.py), and the glue they share (_common.py)."""
