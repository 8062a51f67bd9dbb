"""Grouping experts by what they compute on calibration tokens."""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning


def cosine_from_gram(g: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of the vectors behind a Gram matrix (an all-zero vector stays the zero vector)."""
    norms = g.diagonal().sqrt().clamp_min(1e-12)
    return g / norms[:, None] / norms[None, :]


def output_features(output_gram: torch.Tensor) -> np.ndarray:
    """One point per expert whose Euclidean geometry is that of its unit-normalised flattened
    outputs, so k-means on them clusters by cosine similarity. N points span at most N dimensions:
    the coordinates come from the N x N similarity matrix (G = Q Λ Qᵀ, X = Q Λ^½, hence X Xᵀ = G),
    which keeps every distance and centroid. The Gram matrix is accumulated over all calibration
    tokens while they stream past, so no expert's outputs need be kept."""
    eigvals, eigvecs = torch.linalg.eigh(cosine_from_gram(output_gram))
    return (eigvecs * eigvals.clamp_min(0).sqrt()).numpy()


def kmeans_clusters(features: np.ndarray, k: int, seed: int) -> list[list[int]]:
    """k-means with k-means++ initialisation, seeded; several restarts for stability.

    Always exactly k non-empty clusters: when points coincide (identical experts) k-means can
    leave a cluster empty, and the budget is then filled by splitting the largest clusters."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate points: handled below
        labels = KMeans(n_clusters=k, init="k-means++", n_init=10, random_state=seed).fit(features).labels_
    clusters = [np.flatnonzero(labels == c).tolist() for c in range(k)]
    clusters = [c for c in clusters if c]
    while len(clusters) < k:
        largest = max(clusters, key=len)
        clusters.append([largest.pop()])
    return clusters


def assign_to_centres(scores: torch.Tensor, similarity: torch.Tensor, k: int) -> list[list[int]]:
    """The k highest-scoring experts are centres (stable order on ties); every other expert joins
    the centre it is most similar to. Used by M-SMoE, MergeMoE and the pruning methods."""
    centres = torch.argsort(scores, descending=True, stable=True)[:k].tolist()
    clusters = {c: [c] for c in centres}
    for i in range(len(scores)):
        if i not in clusters:
            clusters[max(centres, key=lambda c: similarity[i, c].item())].append(i)
    return list(clusters.values())

