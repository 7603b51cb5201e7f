"""Swap-in for real models. Each submodule needs an optional package, imported only when used:

    from compacter_kernels.integrations.adapterhub import fuse_adapters     # needs `adapters`
    from compacter_kernels.integrations.transformers import add_adapters    # needs `transformers`

Install both with ``pip install compacter_kernels[integrations]``. Nothing is imported here, so
``import compacter_kernels`` never pulls them in.
"""
