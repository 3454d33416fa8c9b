"""An exact toy model (the paper's Figure 2 setting): classes are 2-D Gaussians N(mu_k, Sigma_k), and the
optimal noise predictions are analytic, so guided sampling can be checked against known distributions.

At log-SNR lam, z | c=k ~ N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I), hence
    eps*(z, k) = sigma (alpha^2 Sigma_k + sigma^2 I)^-1 (z - alpha mu_k)
and the unconditional marginal is the mixture over classes, eps*(z) = sum_k p(k | z) eps*(z, k).
"""

from __future__ import annotations

import math

import torch

from .schedule import alpha_sigma


class GaussianClasses:
    """model(z, lam, labels) -> eps* for classes N(means[k], covs[k]) with prior weights; label K = null.

    prediction_type: what the model returns, "epsilon" (eps*), "v_prediction" (alpha eps* - sigma x*) or "sample"
    (x* = E[x | z_lam]), all exact (SPEC §6)."""

    def __init__(self, means, covs, weights=None, prediction_type: str = "epsilon"):
        from .samplers import check_prediction_type

        self.prediction_type = check_prediction_type(prediction_type)
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        if self.means.dim() != 2 or 0 in self.means.shape:
            raise ValueError(f"means must have shape [K, D] (one mean per class), got {tuple(self.means.shape)}")
        k, d = self.means.shape
        if self.covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape {(k, d, d)}, got {tuple(self.covs.shape)}")
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else torch.as_tensor(
            weights, dtype=torch.float64)
        for name, value in (("means", self.means), ("covs", self.covs), ("weights", weights)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name} must be finite")
        if weights.shape != (k,) or bool((weights <= 0).any()):
            raise ValueError(f"weights must be {k} positive numbers")
        # eigh reads one triangle only: a covariance must be symmetric (to the rounding of float32 arithmetic)
        if bool(((self.covs - self.covs.mT).abs() > 1e-6 * self.covs.abs().amax((1, 2), keepdim=True)).any()):
            raise ValueError("covs must be symmetric")
        self.covs = (self.covs + self.covs.mT) / 2
        self.log_weights = torch.log(weights / weights.sum())
        # Sigma_k = Q_k diag(s_k) Q_k^T, so (alpha^2 Sigma_k + sigma^2 I)^-1 = Q_k diag(1 / (alpha^2 s_k + sigma^2)) Q_k^T
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)
        if bool((self.eigvals <= 0).any()):
            raise ValueError("covs must be positive definite")
        self.num_classes = k
        self.null_label = k
        self.num_labels = k + 1  # the classes and the null label
        self.sample_shape = (d,)

    def _terms(self, z: torch.Tensor, lam: torch.Tensor):
        """Per sample b and class k, in float64: Q_k^T (z - alpha mu_k), the variances of z_lam | k along
        Q_k, sigma, and log pi_k + log N(z; alpha mu_k, alpha^2 Sigma_k + sigma^2 I) (the Bayes logits)."""
        alpha, sigma = alpha_sigma(lam.double())  # [B]
        var = alpha[:, None, None] ** 2 * self.eigvals + sigma[:, None, None] ** 2  # [B, K, D]
        resid = z.double()[:, None, :] - alpha[:, None, None] * self.means  # [B, K, D]
        rotated = torch.einsum("kde,bkd->bke", self.eigvecs, resid)  # Q_k^T (z - alpha mu_k)
        log_joint = (self.log_weights - 0.5 * (rotated**2 / var).sum(-1) - 0.5 * torch.log(var).sum(-1)
                     - 0.5 * self.sample_shape[0] * math.log(2 * math.pi))
        return rotated, var, sigma, log_joint

    def _check_labels(self, labels, batch: int | None, top: int) -> None:
        """labels: integers in [0, top], of shape [batch] (any [B] for batch None)."""
        if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() \
                or labels.dtype == torch.bool or labels.dim() != 1 or batch not in (None, labels.shape[0]):
            raise ValueError(f"labels must be an integer tensor of shape [{'B' if batch is None else batch}], got "
                             f"{labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__} "
                             f"{list(getattr(labels, 'shape', []))}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > top):
            raise ValueError(f"labels must lie in [0, {top}], got values in [{int(labels.min())}, {int(labels.max())}]")

    def __call__(self, z: torch.Tensor, lam: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.sample_shape[0]:
            raise ValueError(f"z must be a tensor of shape [B, {self.sample_shape[0]}], got "
                             f"{list(getattr(z, 'shape', [])) or type(z).__name__}")
        if not isinstance(lam, torch.Tensor) or tuple(lam.shape) != (z.shape[0],):
            raise ValueError(f"lam must be a tensor of shape [{z.shape[0]}], got "
                             f"{list(getattr(lam, 'shape', [])) if isinstance(lam, torch.Tensor) else type(lam).__name__}")
        self._check_labels(labels, z.shape[0], self.null_label)  # (the toy computes on the CPU: no GPU sync lost)
        rotated, var, sigma, log_joint = self._terms(z.cpu(), lam.cpu())
        eps_k = sigma[:, None, None] * torch.einsum("kde,bke->bkd", self.eigvecs, rotated / var)  # sigma cov^-1 (..)
        resp = torch.softmax(log_joint, dim=1)  # p(k | z_lam)
        eps_uncond = (resp[..., None] * eps_k).sum(1)
        cond = labels.cpu() < self.num_classes
        eps_cond = eps_k[torch.arange(z.shape[0]), labels.cpu().clamp(max=self.num_classes - 1)]
        eps = torch.where(cond[:, None], eps_cond, eps_uncond)
        if self.prediction_type != "epsilon":
            alpha, sigma = (s[:, None] for s in alpha_sigma(lam.cpu().double()))
            x = (z.cpu().double() - sigma * eps) / alpha
            eps = x if self.prediction_type == "sample" else alpha * eps - sigma * x
        return eps.to(device=z.device, dtype=torch.float32)

    def log_posterior(self, z: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        """The Bayes classifier's logits log p(k | z_lam) + const, float64 [B, K], differentiable in z:
        the exact noisy classifier, for classifier guidance."""
        return self._terms(z, lam)[3]

    def sample_data(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact draws x ~ N(mu_c, Sigma_c) for the given labels, float32 [B, D]."""
        self._check_labels(labels, None, self.num_classes - 1)
        n = torch.randn(labels.shape[0], self.sample_shape[0], dtype=torch.float64, generator=generator)
        scale = self.eigvecs[labels] * self.eigvals[labels].sqrt()[:, None, :]  # Q diag(sqrt s)
        return (self.means[labels] + torch.einsum("bde,be->bd", scale, n)).float()


def three_classes(prediction_type: str = "epsilon") -> GaussianClasses:
    """Three overlapping 2-D classes, like the paper's Figure 2."""
    means = [[-1.0, 0.0], [1.0, 0.0], [0.0, 1.5]]
    covs = [[[0.5, 0.2], [0.2, 0.4]], [[0.4, -0.15], [-0.15, 0.5]], [[0.6, 0.0], [0.0, 0.3]]]
    return GaussianClasses(means, covs, prediction_type=prediction_type)
