"""The n×n operations of the Gram-space dual loop (``dual_ascent``) with Γ = WᵀW: products with Γ
and Γ⁻¹ (row scalings when Γ is diagonal), and the multiplier X of the tangent projection
A − W·X, from P(ΓX + XΓ) = P(H)."""
from __future__ import annotations

import torch

#: a Gram matrix Γ = WᵀW whose off-diagonal entries are below this fraction of √(Γ_ii Γ_jj) is
#: treated as diagonal inside the loop (products with Γ and Γ⁻¹ become row scalings: 5 of 11 n×n
#: products per iteration saved); points retracted onto DGram or Stiefel in float32 have ~3e-7, and
#: the reported bound is recomputed with the full Γ at the end
DIAGONAL_GRAM = 1e-5


def off_diagonal(H: torch.Tensor) -> torch.Tensor:
    """Off(H): H with its diagonal set to zero."""
    return H - torch.diag_embed(torch.diagonal(H, dim1=-2, dim2=-1))


def inverse_gram(gram: torch.Tensor) -> torch.Tensor:
    """Γ⁻¹ by Cholesky; ValueError when some Γ = WᵀW is not positive definite (W's columns dependent,
    a zero column say: no dual solve there), instead of torch's LinAlgError."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise ValueError("dualize: W's columns are linearly dependent (a zero column, say), so WᵀW is "
                         "singular and the dual solve has no start; retract W onto the manifold first")
    return torch.cholesky_inverse(chol)


def gram_products(gram: torch.Tensor, gram_inv: torch.Tensor) -> dict:
    """The tensors of X ↦ ΓX and X ↦ Γ⁻¹X (``gram_mul``): row scalings when every Γ is diagonal to
    ``DIAGONAL_GRAM``, else the matrices; key "diagonal" says which."""
    d = torch.diagonal(gram, dim1=-2, dim2=-1)
    root = d.clamp_min(0).sqrt()
    if bool((off_diagonal(gram).abs() <= DIAGONAL_GRAM * root.unsqueeze(-1) * root.unsqueeze(-2)).all()):
        return {"diagonal": True, "rows": d.unsqueeze(-1), "inv_rows": 1.0 / d.unsqueeze(-1)}
    return {"diagonal": False, "gram": gram, "gram_inv": gram_inv}


def gram_mul(a: dict, X: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """ΓX (Γ⁻¹X with ``inverse``) from the tensors of ``gram_products``."""
    if a["diagonal"]:
        return (a["inv_rows"] if inverse else a["rows"]) * X
    return (a["gram_inv"] if inverse else a["gram"]) @ X


def normal_solver(gram: torch.Tensor, denom: torch.Tensor, diagonal: bool, offdiag: bool) -> dict:
    """The tensors of H ↦ X with P(ΓX + XΓ) = P(H), the multiplier of the tangent projection
    (``normal_solve``). Diagonal Γ (points on Stiefel or DGram): X = P(H) ⊘ (Γᵢᵢ + Γⱼⱼ). Stiefel off
    the manifold: the same division in Γ's eigenbasis, exact (the diagonal one left A_t off the
    tangent space by ~|Off(Γ)|). DGram has no such closed form for P = Off; its points off the
    manifold (bf16 storage: cosines ~1e-3) keep the diagonal solve, tangent to that accuracy."""
    if diagonal or offdiag:
        return {"denom": denom}
    d, Q = torch.linalg.eigh(gram)
    return {"eigenbasis": Q, "pair": d.unsqueeze(-1) + d.unsqueeze(-2)}


def normal_solve(a: dict, H: torch.Tensor, project) -> torch.Tensor:
    """X with P(ΓX + XΓ) = P(H) from the tensors of ``normal_solver``."""
    if "denom" in a:
        return project(H) / a["denom"]
    Q = a["eigenbasis"]
    return Q @ ((Q.mT @ H @ Q) / a["pair"]) @ Q.mT
