"""The CUDA backend's Python side: fused adapter (adapter.py) and PHM linear (phm_linear.py) on
the extension's ops. Import only once compacter_kernels._C has loaded (`_extension._register`)."""
