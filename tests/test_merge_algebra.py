"""Identities the merging methods must satisfy, on small random tensors."""
import numpy as np
import pytest
import torch
from conftest import random_layer as _layer
from conftest import sample_stats

from offline.methods import METHODS, make_method, reduce_layer
from offline.methods.base import clusters_to_map
from offline.methods.clustering import kmeans_clusters
from offline.methods.merging import merge_weights
from offline.methods.submoe import subspace_merge
from offline.moe_math import Experts


def _mats(k=3, n_out=12, n_in=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n_out, n_in, generator=g, dtype=torch.float64)


def test_full_rank_submoe_equals_frequency_weighted_average():
    """Sub-MoE's joint-SVD merge at full rank is the frequency-weighted average: the identity that
    lets production skip the SVD. Checked where production merges (SubMoE.merge, full rank by
    default and for any --rank at or above full) against the SVD path it skips."""
    experts, stats = _layer(seed=4)
    members = [1, 4, 6]
    w = merge_weights(stats.frequency, members)
    for method in (make_method("submoe"), make_method("submoe", rank=10_000)):
        m = method.merge(experts, members, members[0], stats)
        for which, mats in experts.matrices().items():
            svd, err = subspace_merge(mats[members].double(), w, rank=None)
            torch.testing.assert_close(getattr(m.expert, which)[0].double(), svd, atol=1e-5, rtol=1e-5)
            assert m.rank[which] == min(mats.shape[1], 3 * mats.shape[2]) and m.truncation_error[which] == 0
            assert err < 1e-10


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_rank_r_merge_is_projection_onto_shared_top_r_subspace(rank):
    mats = _mats()
    w = torch.tensor([0.2, 0.7, 0.1], dtype=torch.float64)
    merged, err = subspace_merge(mats, w, rank=rank)
    U = torch.linalg.svd(torch.cat(list(mats), dim=1), full_matrices=False).U[:, :rank]
    average = torch.einsum("k,kij->ij", w, mats)
    torch.testing.assert_close(merged, U @ U.T @ average, atol=1e-10, rtol=0)
    assert err > 0
    # and it is no longer the plain average
    assert not torch.allclose(merged, average)


def test_merge_weights_fall_back_to_uniform_for_never_routed_cluster():
    freq = torch.tensor([0.0, 0.0, 0.6, 0.4])
    torch.testing.assert_close(merge_weights(freq, [0, 1]), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(merge_weights(freq, [1, 2]), torch.tensor([0.0, 1.0], dtype=torch.float64))


def test_kmeans_is_seeded_and_finds_planted_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 10
    points = np.concatenate([centres[c] + rng.normal(size=(2, 16)) * 0.01 for c in (0, 1, 2, 0, 1)])
    # points 0,1,6,7 from centre 0; 2,3,8,9 from centre 1; 4,5 from centre 2
    a = kmeans_clusters(points, 3, seed=1)
    assert a == kmeans_clusters(points, 3, seed=1)
    groups = sorted(sorted(c) for c in a)
    assert groups == sorted(sorted(c) for c in kmeans_clusters(points, 3, seed=7))
    assert groups == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5]]


def test_expert_features_keep_the_geometry_of_the_normalised_outputs():
    """k-means runs on N x N coordinates instead of the [N, T*H] outputs: every pairwise distance
    (hence every centroid distance) and every cosine must be those of the flattened unit outputs,
    an all-zero expert included, and the planted groups must come out the same."""
    from offline.methods.clustering import cosine_from_gram, output_features
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 300, 16, generator=g)
    outputs = torch.cat([base + 0.05 * torch.randn(3, 300, 16, generator=g) for _ in range(2)] + [torch.zeros(1, 300, 16)])
    flat = outputs.reshape(len(outputs), -1).double()
    unit, gram = torch.nn.functional.normalize(flat, dim=1), flat @ flat.T
    x = torch.from_numpy(output_features(gram))
    assert x.shape == (7, 7)
    torch.testing.assert_close(torch.cdist(x, x), torch.cdist(unit, unit), atol=1e-10, rtol=0)
    torch.testing.assert_close(cosine_from_gram(gram), unit @ unit.T, atol=1e-12, rtol=0)
    groups = sorted(sorted(c) for c in kmeans_clusters(output_features(gram), 4, seed=0))
    assert groups == sorted(sorted(c) for c in kmeans_clusters(unit.numpy(), 4, seed=0)) == [[0, 3], [1, 4], [2, 5], [6]]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_methods_give_valid_maps_and_are_deterministic(method):
    experts, stats = _layer()
    a = reduce_layer(make_method(method), experts, stats, 3, seed=0)
    b = reduce_layer(make_method(method), experts, stats, 3, seed=0)
    assert len(a.experts) == 3 and a.experts.gate.shape == (3, 24, 16) and a.experts.down.shape == (3, 16, 24)
    assert sorted(set(a.expert_map) - {None}) == [0, 1, 2] and len(a.expert_map) == 8
    # pruning drops the other router experts (as published), MoNE serves them as constants; every
    # other method serves all of them by merged experts
    assert a.expert_map.count(None) == (5 if method in ("freq-prune", "reap", "man", "msan", "mone") else 0)
    assert len(a.dropped) == (5 if method in ("freq-prune", "reap", "man", "msan") else 0)
    assert a.expert_map == b.expert_map
    torch.testing.assert_close(a.experts.down, b.experts.down, atol=0, rtol=0)


def test_submoe_layer_merge_is_weighted_average_of_its_clusters():
    experts, stats = _layer(seed=3)
    r = reduce_layer(make_method("submoe"), experts, stats, 3, seed=0)
    for j, members in enumerate(r.clusters):
        w = merge_weights(stats.frequency, members).float()
        for which in ("gate", "up", "down"):
            mats = getattr(experts, which)[members]
            torch.testing.assert_close(getattr(r.experts, which)[j], torch.einsum("k,kij->ij", w, mats),
                                       atol=1e-4, rtol=1e-4)
    # and an explicit rank below full goes through the subspace projection instead
    low = reduce_layer(make_method("submoe", rank=4), experts, stats, 3, seed=0)
    assert low.expert_map == r.expert_map
    assert all(c.rank["gate"] == 4 and c.truncation_error["gate"] > 0 for c in low.merges)


def test_identical_experts_still_fill_the_budget():
    experts, stats = _layer(seed=2)
    same = Experts(*(m[:1].expand_as(m).clone() for m in experts.matrices().values()))
    stats = sample_stats(same, stats.tokens, stats.router_logits)
    for method in [m for m in METHODS if m not in ("freq-prune", "reap", "man", "msan", "mone")]:  # prunings
        r = reduce_layer(make_method(method), same, stats, 3, seed=0)
        assert len(r.experts) == 3 and sorted(set(r.expert_map)) == [0, 1, 2]
        torch.testing.assert_close(r.experts.gate, same.gate[:3], atol=1e-5, rtol=1e-5)


def test_freq_prune_keeps_the_most_frequent_experts_unchanged():
    experts, stats = _layer(seed=5)
    r = reduce_layer(make_method("freq-prune"), experts, stats, 3, seed=0)
    top = set(torch.argsort(stats.frequency, descending=True)[:3].tolist())
    kept = {c.kept for c in r.merges}
    assert kept == top
    for j, c in enumerate(r.merges):
        torch.testing.assert_close(r.experts.gate[j], experts.gate[c.kept], atol=0, rtol=0)


def test_clusters_to_map_rejects_unassigned_experts():
    with pytest.raises(ValueError, match="unassigned"):
        clusters_to_map([[0, 1], [2]], 4)


def test_method_options_are_checked():
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        make_method("nope")
    with pytest.raises(ValueError, match="--rank-ratio must be in"):
        make_method("submoe", rank_ratio=1.5)
    with pytest.raises(ValueError, match="--rank does not apply to --method average; it applies to: submoe"):
        make_method("average", rank=4)
    with pytest.raises(ValueError, match="--align-neurons does not apply to --method reap"):
        make_method("reap", align_neurons=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_any_nan_or_inf_in_a_strided_view(bad):
    from offline.moe_math import all_finite
    fused = torch.randn(4, 6, 5)
    up = fused[:, 3:]  # a view, as the source experts are read
    assert all_finite(up) and all_finite(torch.empty(0))
    fused[2, 4, 1] = bad
    assert not all_finite(up) and all_finite(fused[:, :3])
