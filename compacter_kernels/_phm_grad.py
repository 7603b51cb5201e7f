"""Gradient of the PHM weight H = sum_i kron(A[i], B[i]) with respect to its factors.

Pure torch (no extension): shared by the CUDA op's registered autograd and the Triton backend.
"""
from typing import Optional, Tuple

import torch


def phm_weight_backward(
    grad_H: torch.Tensor, rule: torch.Tensor, left: torch.Tensor, right: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(dA, dS, dT) from dH, or (dA, dB, None) when ``right`` is None (B = left given directly).

    With dH viewed as dH4[a, p, c, q] = dH[a*(I/n)+p, c*(O/n)+q] and B[i] = S[i] @ T[i]:

        dA[i, a, c] = sum_{p,q} dH4[a, p, c, q] * B[i, p, q]
        dB[i, p, q] = sum_{a,c} A[i, a, c] * dH4[a, p, c, q]
        dS[i] = dB[i] @ T[i]^T          dT[i] = S[i]^T @ dB[i]

    Low-precision inputs are computed in float32 (the factors are small: the cost is in dH) and
    each gradient is returned in the dtype of its input.
    """
    n, Ib = rule.shape[0], left.shape[1]
    Ob = (left if right is None else right).shape[2]
    ct = torch.promote_types(left.dtype, torch.float32)  # float32, or float64 for float64 inputs
    A, S = rule.to(ct), left.to(ct)
    T = None if right is None else right.to(ct)
    dH4 = grad_H.to(ct).reshape(n, Ib, n, Ob)
    B = S if T is None else torch.bmm(S, T)
    grad_rule = torch.einsum("apcq,ipq->iac", dH4, B)
    dB = torch.einsum("iac,apcq->ipq", A, dH4)
    if T is None:
        return grad_rule.to(rule.dtype), dB.to(left.dtype), None
    grad_left = torch.bmm(dB, T.transpose(1, 2))
    grad_right = torch.bmm(S.transpose(1, 2), dB)
    return grad_rule.to(rule.dtype), grad_left.to(left.dtype), grad_right.to(right.dtype)
