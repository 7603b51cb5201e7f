"""`python -m compacter_kernels`: what this install can run here, and why not where it cannot."""

import platform
import sys


def report() -> str:
    import torch

    import compacter_kernels as ck
    from compacter_kernels import backends

    lines = [f"compacter_kernels {ck.__version__} ({ck.__file__})",
             f"python {platform.python_version()}, torch {torch.__version__} "
             f"({'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only build'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1: CPU interpreter)"
                                                       if backends.triton_interpret() else ""))
    except ImportError:
        lines.append("triton: not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU: none visible (torch.cuda.is_available() is False)")
    lines.append("backends:")
    for name, status in ck.available_backends().items():
        lines.append(f"  {name:<10} {'available' if status else 'UNAVAILABLE':<12} {status.reason}")
    auto = [name for name in backends._AUTO_ORDER if ck.available_backends()[name]]
    lines.append(f"backend='auto' on CUDA tensors: {auto[0] if auto else 'reference'}; on CPU tensors: reference")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
