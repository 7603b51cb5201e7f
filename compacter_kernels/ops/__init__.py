"""The kernel backends' ops: one folder per backend, one file per op (Liger-Kernel's layout).

    common.py     what both backends share: the named Projection, the layout the kernels read,
                  autocast, the ops' differentiable math, and what the adapter Functions share
    triton/       adapter.py, phm_linear.py: each op's kernels, its forward and backward
                  launchers, their custom ops and its autograd Function; kron.py the Kronecker and
                  activation building blocks, grads.py the backward's reductions and factor
                  gradients, config.py every tile rule, launch.py what every launch shares
    cuda/         adapter.py, phm_linear.py: one autograd Function per op over the CUDA
                  extension's C++ ops (imported by compacter_kernels._extension once
                  compacter_kernels._C has loaded)
"""
