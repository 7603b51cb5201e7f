"""The Triton backend: fused adapter (adapter.py) and PHM linear (phm_linear.py) kernels."""
