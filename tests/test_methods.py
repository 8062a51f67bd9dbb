"""Each method's defining property, and its behaviour on degenerate calibration."""
import warnings

import pytest
import torch
from conftest import random_layer, sample_stats

from offline.methods import METHODS, CalibrationWarning, Grouping, MethodError, make_method, reduce_layer, reduce_layers
from offline.methods.alignment import align_to, neuron_features, neuron_permutation
from offline.methods.merging import least_squares_down, merge_weights, weighted_average
from offline.methods.reap import reap_scores
from offline.methods.submoe import whitened_low_rank
from offline.moe_math import Experts, expert_forward, expert_hidden


def _weighted_target(experts, stats, members):
    w = merge_weights(stats.frequency, members).float()
    return torch.einsum("k,ktd->td", w, stats.expert_outputs(members))


def test_mergemoe_down_projection_solves_its_least_squares():
    experts, stats = random_layer(seed=1, t=200)
    r = reduce_layer(make_method("mergemoe"), experts, stats, 3, seed=0)
    for j, members in enumerate(r.clusters):
        if len(members) == 1:
            continue
        target = _weighted_target(experts, stats, members)
        p = expert_hidden(stats.tokens, r.experts.gate[j], r.experts.up[j])
        residual = target - p @ r.experts.down[j].T
        # normal equations: the residual is orthogonal to every activation column ...
        assert (p.T @ residual).abs().max() < 1e-3 * (p.abs().max() * target.abs().max() * len(p))
        # ... so it is not above the weighted average's down projection on the same activations
        avg = weighted_average(experts, members, merge_weights(stats.frequency, members))
        assert residual.norm() <= (target - p @ avg.down[0].T).norm() + 1e-5
        # and W_G, W_U are the frequency-weighted averages (the paper's T2, T3)
        torch.testing.assert_close(r.experts.gate[j], avg.gate[0], atol=1e-5, rtol=1e-5)


def test_mergemoe_centres_are_the_most_frequent_experts():
    experts, stats = random_layer(seed=2, t=200)
    for method in ("mergemoe", "m-smoe"):
        r = reduce_layer(make_method(method), experts, stats, 3, seed=0)
        top = set(torch.argsort(stats.frequency, descending=True)[:3].tolist())
        assert all(len(set(c) & top) == 1 for c in r.clusters), (method, r.clusters)


def test_mergemoe_warns_below_the_papers_sample_threshold():
    experts, stats = random_layer(seed=1, t=16)  # 16 tokens for 24 unknowns per row: underdetermined
    stats.samples = 8
    with pytest.warns(CalibrationWarning, match="8 calibration samples.*16 tokens for 24 unknowns"):
        r = reduce_layer(make_method("mergemoe"), experts, stats, 3, seed=0)
    assert any(c.underdetermined for c in r.merges)


def test_least_squares_down_with_ridge_is_never_worse_than_its_prior():
    g = torch.Generator().manual_seed(0)
    hidden, target, prior = torch.randn(40, 24, generator=g), torch.randn(40, 16, generator=g), torch.randn(16, 24, generator=g)
    res = lambda w: (target - hidden @ w.T).norm()  # noqa: E731
    for ridge in (1e-3, 1e-1, 10.0):
        assert res(least_squares_down(hidden, target, prior, ridge)) <= res(prior) + 1e-5
    assert res(least_squares_down(hidden, target)) <= res(least_squares_down(hidden, target, prior, 1e-3)) + 1e-5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_calibration_computes_only_the_statistics_a_method_reads_and_they_are_the_full_ones(method):
    """A method's statistics computed alone (REAP's saliency from routed tokens only, no every-expert
    pass when nothing needs it) equal those of a calibration computing all of them, and the method
    gives the same layer from either."""
    from offline.calibration.stats import Accumulator
    experts, full = random_layer(seed=12, t=96)
    acc = Accumulator(len(experts), full.tokens.shape[1], needs=make_method(method).statistics, chunk_bytes=4096)
    acc.add(full.tokens, full.router_logits, full.routing, experts)
    alone = acc.stats(full.tokens, experts, full.router_logits, full.routing, full.samples)
    for name in ("output_gram", "mean_outputs", "gated_mean_outputs", "logit_gram", "saliency"):
        if name in make_method(method).statistics:
            # other chunking (4 tokens at a time), other kernels: close to the values' own scale
            want = getattr(full, name)
            torch.testing.assert_close(getattr(alone, name), want, atol=1e-5 * want.abs().max().item(), rtol=1e-4)
        else:
            assert getattr(alone, name) is None
    a, b = (reduce_layer(make_method(method), experts, s, 3, seed=0) for s in (alone, full))
    assert a.expert_map == b.expert_map
    torch.testing.assert_close(a.experts.down, b.experts.down)


def _authors_pseudo_group(saliency, expert_logits, k, gate_logits, group_size):
    """SamsungSAILMontreal/ream ream/ream.py::pseudo_group, as published (numpy loops), for checking ours."""
    import numpy as np
    import torch.nn.functional as F
    x = F.normalize(gate_logits.float().T, dim=-1, eps=1e-8)
    d_gate = torch.cdist(x, x).numpy()
    sim_gate = 1 - d_gate / d_gate.max()
    n = expert_logits.shape[0]
    d = np.zeros((n, n), dtype=np.float32)
    for i in range(n):
        for j in range(i + 1, n):
            sim = ((F.cosine_similarity(expert_logits[i], expert_logits[j]) + 1) / 2).mean().item()
            d[i, j] = d[j, i] = 1 - (sim + sim_gate[i, j]) / 2
    centroids = np.argsort(saliency.numpy(), kind="stable")[::-1].copy()[:k]
    labels = np.zeros(n) - 1
    labels[centroids] = np.arange(k)
    for c in centroids:
        group = [c]
        for ind in np.argsort(d[c], kind="stable"):
            if ind != c and labels[ind] == -1:
                group.append(ind)
            if len(group) >= group_size:
                break
        for ind in group:
            labels[ind] = labels[c]
        if (labels >= 0).all():
            break
    return sorted(sorted(np.flatnonzero(labels == j).tolist()) for j in range(k)), sorted(centroids.tolist())


@pytest.mark.parametrize("n,k,group_size", [(8, 4, 16), (8, 3, 3), (32, 16, 4)])
def test_ream_groups_as_the_authors_code_does(n, k, group_size):
    """Our REAM grouping, from statistics accumulated over the tokens, equals the authors' pseudo_group
    run on every token's gate-weighted expert outputs and router logits."""
    from offline.methods.ream import REAM
    experts, stats = random_layer(seed=21 + n + group_size, n=n, t=256)
    probs = torch.softmax(stats.router_logits.double(), -1)
    gated_mean = (stats.expert_outputs(range(n)).double() * probs.T[:, :, None]).mean(1, keepdim=True)  # [N, 1, H]
    clusters, centroids = _authors_pseudo_group(stats.saliency.float(), gated_mean.float(), k, stats.router_logits,
                                                group_size)
    g = REAM(group_size=group_size).group(stats, k, 0, experts)
    assert sorted(sorted(c) for c in g.clusters) == clusters and sorted(g.centres) == centroids
    assert all(c in members for c, members in zip(g.centres, g.clusters))
    if group_size == 16:  # the most salient centroid gathers every other non-centroid (pseudo-pruning)
        top = int(torch.argmax(stats.saliency))
        assert sorted(next(c for c in g.clusters if top in c)) == sorted({top} | set(range(n)) - set(g.centres))


def test_ream_merge_aligns_permuted_copies_and_weighs_by_saliency():
    """Permuted copies of one expert merge back into it (activation + weight alignment); a cluster of one
    is its centroid; the merged router rows (vanilla) are the centroids'; bad --group-size is refused."""
    experts, stats = random_layer(seed=9, t=256)
    g = torch.Generator().manual_seed(3)
    perms = [torch.randperm(24, generator=g) for _ in range(8)]
    copies = Experts(torch.stack([experts.gate[0][p] for p in perms]), torch.stack([experts.up[0][p] for p in perms]),
                     torch.stack([experts.down[0][:, p] for p in perms]))
    stats = sample_stats(copies, stats.tokens, stats.router_logits)
    r = reduce_layer(make_method("ream", group_size=0), copies, stats, 2, seed=0)
    for j, members in enumerate(r.clusters):
        out = expert_forward(stats.tokens, r.experts.gate[j], r.experts.up[j], r.experts.down[j])
        torch.testing.assert_close(out, stats.expert_outputs([0])[0], atol=1e-4, rtol=1e-4)
        sal = stats.saliency[members].double()
        assert r.merges[j].weights == pytest.approx((sal / sal.sum()).tolist(), abs=1e-6)
        assert r.representatives[j] == int(members[torch.argmax(sal)])
    one = reduce_layer(make_method("ream"), experts, random_layer(seed=9, t=256)[1], 7, seed=0)
    for j, members in enumerate(one.clusters):
        if len(members) == 1:
            torch.testing.assert_close(one.experts.down[j], experts.down[members[0]], atol=0, rtol=0)
    with pytest.raises(MethodError, match="--group-size 2 cannot cover 32 experts"):
        reduce_layer(make_method("ream", group_size=2), *random_layer(seed=1, n=32), 8, seed=0)


def test_reap_keeps_the_highest_scoring_experts_and_its_score_is_the_papers():
    experts, stats = random_layer(seed=4, t=128)
    probs = torch.softmax(stats.router_logits.double(), -1)
    top2 = stats.router_logits.topk(2, dim=-1).indices
    brute, outputs = [], stats.expert_outputs(range(8))
    for j in range(8):
        rows = [t for t in range(128) if j in top2[t].tolist()]
        brute.append(sum(probs[t, j] * outputs[j, t].double().norm() for t in rows) / max(1, len(rows)))
    scores = reap_scores(stats)
    torch.testing.assert_close(scores, torch.stack([torch.as_tensor(b, dtype=torch.float64) for b in brute]))
    r = reduce_layer(make_method("reap"), experts, stats, 3, seed=0)
    assert {c.kept for c in r.merges} == set(torch.argsort(scores, descending=True)[:3].tolist())
    for j, c in enumerate(r.merges):
        torch.testing.assert_close(r.experts.down[j], experts.down[c.kept], atol=0, rtol=0)


@pytest.mark.parametrize("method", ["submoe", "hc-smoe", "output-lsq", "average"])
def test_output_based_grouping_recovers_planted_pairs(method):
    """Four pairs of near-identical experts: every output-based grouping must find the pairs."""
    experts, stats = random_layer(seed=6, t=128)
    g = torch.Generator().manual_seed(1)
    pairs = Experts(*(torch.cat([m[:4], m[:4] + 0.01 * torch.randn(m[:4].shape, generator=g)])
                      for m in experts.matrices().values()))
    stats = sample_stats(pairs, stats.tokens, stats.router_logits)
    r = reduce_layer(make_method(method), pairs, stats, 4, seed=0)
    assert r.clusters == [[0, 4], [1, 5], [2, 6], [3, 7]]


def _served_error_by_loop(stats, result) -> float:
    """The remapped MoE output's relative error, token by token: top-2 of the router logits, each
    chosen router expert computing with its merged expert (independent of the code under test)."""
    num = den = 0.0
    for t in range(len(stats.tokens)):
        p = torch.softmax(stats.router_logits[t].double(), -1)
        w, ids = p.topk(2)
        w = w / w.sum()
        x = stats.tokens[t:t + 1]
        src = sum(wi * expert_forward(x, *stats.experts.expert(i))[0].double() for wi, i in zip(w, ids.tolist()))
        e = result.experts
        served = sum(wi * expert_forward(x, e.gate[j], e.up[j], e.down[j])[0].double()
                     for wi, j in zip(w, [result.expert_map[i] for i in ids.tolist()]))
        num += ((served - src) ** 2).sum().item()
        den += (src ** 2).sum().item()
    return (num / den) ** 0.5


def test_output_lsq_picks_the_grouping_with_least_held_out_error():
    from offline.methods.output_lsq import candidate_groupings, split_stats
    experts, stats = random_layer(seed=7, t=1500)
    method = make_method("output-lsq")
    r = reduce_layer(method, experts, stats, 4, seed=0)
    fit, held = split_stats(stats)
    # each candidate merged on the fit tokens, scored on the held-out ones by an independent loop
    loop = {name: _served_error_by_loop(held, reduce_layer(method, experts, fit, 4, 0, Grouping(c)))
            for name, c in candidate_groupings(stats, 4, 0).items()}
    assert set(loop) == set(r.grouping.held_out_errors)
    for name, err in loop.items():
        assert r.grouping.held_out_errors[name] == pytest.approx(err, rel=1e-4)
    assert loop[r.grouping.chosen_by] == min(loop.values())
    assert sorted(r.clusters) == sorted(sorted(c) for c in candidate_groupings(stats, 4, 0)[r.grouping.chosen_by])
    # with enough routed tokens its fitted down projections beat the plain frequency-weighted merge
    plain = reduce_layer(make_method("hc-smoe"), experts, stats, 4, seed=0, grouping=Grouping(r.clusters))
    assert _served_error_by_loop(stats, r) < _served_error_by_loop(stats, plain)


def test_output_lsq_hybrid_adds_prune_and_merge_candidates_under_the_same_measure():
    """--hybrid: REAP's pruning (all of the reduction dropped) and half of it dropped with the rest
    merged join the three groupings; each scored as they are, the least held-out error wins, and no
    candidate leaves a token fewer than top_k router experts."""
    from offline.methods.output_error import output_error
    from offline.methods.output_lsq import split_stats
    experts, stats = random_layer(seed=7, t=1500)
    method, fit, held = make_method("output-lsq", hybrid=True), *split_stats(stats)
    r = reduce_layer(method, experts, stats, 4, seed=0)
    plain = reduce_layer(make_method("output-lsq"), experts, stats, 4, seed=0).grouping.held_out_errors
    errors = r.grouping.held_out_errors
    assert set(errors) == {*plain, "drop-2+output-kmeans", "drop-4+output-kmeans"}
    assert all(errors[name] == pytest.approx(err, rel=1e-6) for name, err in plain.items())
    assert errors[r.grouping.chosen_by] == min(errors.values())
    # dropping all of the reduction is REAP: same kept experts, and so the same served output
    reap = reduce_layer(make_method("reap"), experts, fit, 4, seed=0)
    assert errors["drop-4+output-kmeans"] == pytest.approx(output_error(held, reap), rel=1e-5)
    assert "saliency" in method.statistics and "saliency" not in make_method("output-lsq").statistics
    one = reduce_layer(method, experts, stats, 1, seed=0)  # 8 -> 1 under top-2: at most 6 dropped
    assert {"drop-3+output-kmeans", "drop-6+output-kmeans"} <= set(one.grouping.held_out_errors)
    assert len(one.expert_map) - len(one.dropped) >= 2


def test_output_lsq_function_weight_fits_routed_and_function_rows_and_adds_mergemoes_grouping():
    """--function-weight W: MergeMoE's grouping competes, and each fitted W_D solves the ridge least
    squares over the routed rows stacked on one row per sampled token, target the members'
    frequency-weighted output, those rows weighing W times the routed rows in all: the normal
    equations, built here from that definition in float64, hold (and the routed rows alone do not)."""
    experts, stats = random_layer(seed=7, t=1500)
    r = reduce_layer(make_method("output-lsq", function_weight=3.0), experts, stats, 4, seed=0)
    errors = r.grouping.held_out_errors
    assert "weight-centres" in errors and errors[r.grouping.chosen_by] == min(errors.values())
    fitted = [m for m in r.merges if len(m.members) > 1 and m.ridge != "average"]
    assert fitted
    x = stats.tokens.double()
    for m in fitted:
        source = [expert_forward(x, *(t.double() for t in stats.experts.expert(i))) for i in m.members]
        g = stats.gate_weights()[:, m.members].double()
        routed = g.sum(1) > 0
        f = merge_weights(stats.frequency, m.members)
        gate, up, down = (t[0].double() for t in m.expert.matrices().values())
        h = expert_hidden(x, gate, up)
        p = h[routed] * g[routed].sum(1, keepdim=True)
        y = sum(g[routed, k, None] * source[k][routed] for k in range(len(m.members)))
        c = (3.0 * p.pow(2).sum() / h.pow(2).sum()).sqrt()
        rows, target = torch.cat([p, c * h]), torch.cat([y, c * sum(fk * s for fk, s in zip(f, source))])
        prior = sum(fk * experts.down[i].double() for fk, i in zip(f, m.members))
        scale = rows.pow(2).sum(0).mean()  # the Gram matrix's mean diagonal
        gradient = rows.T @ (rows @ down.T - target) + m.ridge * scale * (down - prior).T
        routed_only = p.T @ (p @ down.T - y) + m.ridge * p.pow(2).sum(0).mean() * (down - prior).T
        size = (rows.T @ target).norm()
        assert gradient.norm() < 1e-4 * size
        assert routed_only.norm() > 1e-2 * size


def test_neuron_alignment_recovers_a_permutation_and_preserves_the_function():
    experts, stats = random_layer(seed=8)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    shuffled = Experts(torch.stack([experts.gate[0], experts.gate[0][perm]]), torch.stack([experts.up[0], experts.up[0][perm]]),
                       torch.stack([experts.down[0], experts.down[0][:, perm]]))
    found = neuron_permutation(neuron_features(shuffled, 0), neuron_features(shuffled, 1))
    assert torch.equal(perm[found], torch.arange(24))
    aligned = align_to(shuffled, [0, 1], centre=0)
    for m in ("gate", "up", "down"):
        torch.testing.assert_close(getattr(aligned, m)[1], getattr(experts, m)[0], atol=0, rtol=0)
    # on unrelated experts alignment permutes neurons but never changes what an expert computes
    aligned = align_to(experts, [0, 3, 5], centre=3)
    for e in range(8):
        torch.testing.assert_close(expert_forward(stats.tokens, aligned.gate[e], aligned.up[e], aligned.down[e]),
                                   stats.expert_outputs([e])[0], atol=1e-4, rtol=1e-4)


def test_aligned_merge_of_permuted_copies_is_the_original_expert():
    experts, stats = random_layer(seed=9)
    g = torch.Generator().manual_seed(3)
    perms = [torch.randperm(24, generator=g) for _ in range(8)]
    copies = Experts(torch.stack([experts.gate[0][p] for p in perms]), torch.stack([experts.up[0][p] for p in perms]),
                     torch.stack([experts.down[0][:, p] for p in perms]))
    stats = sample_stats(copies, stats.tokens, stats.router_logits)
    plain = reduce_layer(make_method("average"), copies, stats, 2, seed=0)
    aligned = reduce_layer(make_method("average", align_neurons=True), copies, stats, 2, seed=0)
    for r in (plain, aligned):
        assert len(r.experts) == 2
    out = lambda r: expert_forward(stats.tokens, r.experts.gate[0], r.experts.up[0], r.experts.down[0])  # noqa: E731
    original = stats.expert_outputs([0])[0]
    torch.testing.assert_close(out(aligned), original, atol=1e-4, rtol=1e-4)
    assert (out(plain) - original).norm() > 0.5 * original.norm()


def test_whitened_low_rank_is_exact_at_full_rank_and_beats_plain_svd_on_its_inputs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 24, generator=g, dtype=torch.float64)
    x = torch.randn(200, 24, generator=g, dtype=torch.float64) * torch.linspace(0.05, 3, 24, dtype=torch.float64)
    full, err = whitened_low_rank(w, x, 16)
    assert err < 1e-6
    low, err = whitened_low_rank(w, x, 4)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    plain = (U[:, :4] * S[:4]) @ Vh[:4]
    assert torch.linalg.matrix_rank(low) == 4
    assert torch.linalg.norm((w - low) @ x.T) < torch.linalg.norm((w - plain) @ x.T)
    assert err == pytest.approx((torch.linalg.norm((w - low) @ x.T) / torch.linalg.norm(w @ x.T)).item())


def test_submoe_dagger_reports_its_intra_expert_error():
    experts, stats = random_layer(seed=10, t=200)
    r = reduce_layer(make_method("submoe", intra_rank_ratio=0.5), experts, stats, 3, seed=0)
    for j, c in enumerate(r.merges):
        assert c.intra_rank["gate"] == 8 and 0 < c.intra_error["gate"] < 1
        assert torch.linalg.matrix_rank(r.experts.gate[j]) == 8  # float32 tolerance: it is stored in float32
    assert "factors" in make_method("submoe", intra_rank_ratio=0.5).settings()["note"]
    with pytest.raises(MethodError, match="--intra-rank-ratio must be in"):
        make_method("submoe", intra_rank_ratio=1.0)


def test_adaptive_submoe_groups_adjacent_layers_jointly():
    a, b = random_layer(seed=11), random_layer(seed=12)
    method = make_method("submoe", adaptive=True)
    assert method.joint_layers == 2
    ra, rb = reduce_layers(method, [a, b], [3, 3], seed=0)
    assert ra.clusters == rb.clusters and len(ra.experts) == len(rb.experts) == 3
    with pytest.raises(MethodError, match="adjacent layers jointly.*must be equal"):
        reduce_layers(method, [a, b], [3, 4], seed=0)


def test_random_merge_is_seeded_and_balanced():
    experts, stats = random_layer()
    a = reduce_layer(make_method("random"), experts, stats, 3, seed=0)
    assert a.expert_map == reduce_layer(make_method("random"), experts, stats, 3, seed=0).expert_map
    assert a.expert_map != reduce_layer(make_method("random"), experts, stats, 3, seed=1).expert_map
    assert sorted(len(c) for c in a.clusters) == [2, 3, 3]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_expert_never_routed_and_clusters_of_one(method):
    """Frequency 0 for two experts (never in any top-k), and a budget leaving singleton clusters."""
    experts, stats = random_layer(seed=13, t=128)
    logits = stats.router_logits.clone()
    logits[:, [2, 6]] = -1e4
    stats = sample_stats(experts, stats.tokens, logits)
    assert stats.frequency[2] == 0 and stats.frequency[6] == 0 and stats.saliency[2] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        r = reduce_layer(make_method(method), experts, stats, 7, seed=0)
    assert len(r.experts) == 7 and sorted(set(r.expert_map) - {None}) == list(range(7))
    assert all(torch.isfinite(m).all() for m in r.experts.matrices().values())
    if method in ("freq-prune", "reap"):  # the one expert dropped is one never routed, and its logit leaves the top-k
        dropped = set(range(8)) - {c.kept for c in r.merges}
        assert len(dropped) == 1 and dropped < {2, 6} and r.expert_map.index(None) in dropped


@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_finite_weights_or_calibration_are_refused_with_a_clear_message(method):
    experts, stats = random_layer(seed=14)
    bad = Experts(experts.gate, experts.up.clone(), experts.down)
    bad.up[3, 0, 0] = float("nan")
    with pytest.raises(MethodError, match="W_up of the source experts has NaN or inf"):
        reduce_layer(make_method(method), bad, stats, 4, seed=0)
    stats.router_logits[5, 1] = float("inf")
    with pytest.raises(MethodError, match="router_logits of the calibration statistics has NaN or inf"):
        reduce_layer(make_method(method), experts, stats, 4, seed=0)


@pytest.mark.parametrize("method", ["freq-prune", "reap"])
def test_pruning_drops_router_experts_or_substitutes_them_when_asked(method):
    """As published, a pruned expert's logit leaves the top-k: the served output is the kept experts'
    under a softmax over the kept logits only (what an N'-row router computes). With
    substitute_pruned, every router expert is served by a kept one instead."""
    experts, stats = random_layer(seed=15, t=300)
    dropped = reduce_layer(make_method(method), experts, stats, 4, seed=0)
    kept = [c.kept for c in dropped.merges]
    assert sorted(i for i, e in enumerate(dropped.expert_map) if e is None) == sorted(set(range(8)) - set(kept))
    assert [dropped.expert_map[k] for k in kept] == list(range(4))
    # the dropped map's served output, token by token, is the N'-row router's over the kept experts
    probs = torch.softmax(stats.router_logits[:, kept].double(), -1)
    w, j = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    e = dropped.experts
    by_rows = torch.stack([sum(w[t, s] * expert_forward(stats.tokens[t:t + 1], e.gate[j[t, s]], e.up[j[t, s]],
                                                         e.down[j[t, s]])[0].double() for s in range(2))
                           for t in range(len(stats.tokens))])
    source = torch.einsum("tn,ntd->td", stats.gate_weights().double(), stats.expert_outputs(range(8)).double())
    err = ((by_rows - source).norm() / source.norm()).item()
    from offline.methods.output_error import output_error
    assert output_error(stats, dropped) == pytest.approx(err, rel=1e-4)
    substituted = reduce_layer(make_method(method, substitute_pruned=True), experts, stats, 4, seed=0)
    assert None not in substituted.expert_map and sorted(c.kept for c in substituted.merges) == sorted(kept)
    assert make_method(method).drops_experts and not make_method(method, substitute_pruned=True).drops_experts


def test_duplicate_slot_rate_counts_slots_reaching_a_merged_expert_twice():
    """The share of served top-k slots whose merged expert another slot of the token already
    reaches: 0 for an identity map, (k-1)/k when everything merges into one, and a brute-force
    count for a real grouping (dropped experts never chosen, as served)."""
    from types import SimpleNamespace

    from offline.methods.output_error import duplicate_slot_rate
    _, stats = random_layer(router_gain=3.0)
    def result(expert_map):
        return SimpleNamespace(expert_map=expert_map, dropped=[i for i, e in enumerate(expert_map) if e is None])
    assert duplicate_slot_rate(stats, result(list(range(8)))) == 0.0
    assert duplicate_slot_rate(stats, result([0] * 8)) == pytest.approx(1 / 2)
    expert_map = [0, 0, 1, 1, None, 2, 2, 3]
    _, ids = stats.routing(stats.router_logits.masked_fill(torch.tensor([e is None for e in expert_map]), -torch.inf))
    assert 4 not in ids.flatten().tolist()
    brute = sum(len(row) - len({expert_map[i] for i in row}) for row in ids.tolist())
    assert brute > 0
    assert duplicate_slot_rate(stats, result(expert_map)) == pytest.approx(brute / ids.numel())


@pytest.mark.parametrize("method", ["average", "m-smoe"])
def test_a_layer_result_holds_each_merged_expert_once(method):
    """Each Merge's expert is a view of the layer's written experts, not its own float32 working copy
    (128 such copies are 22.5 GB at DeepSeek-V3's shape)."""
    experts, stats = random_layer()
    r = reduce_layer(make_method(method), Experts(*(m.bfloat16() for m in experts.matrices().values())), stats, 3, 0)
    for j, m in enumerate(r.merges):
        for which in ("gate", "up", "down"):
            mine, written = getattr(m.expert, which), getattr(r.experts, which)
            assert mine.dtype == torch.bfloat16 and mine.data_ptr() == written[j].data_ptr()


def test_refinement_recovers_a_perturbed_layer_and_never_returns_a_worse_one():
    """Refining perturbed copies of the source experts (identity map) brings the layer's output back
    towards the source's on held-out tokens; steps so large that every one hurts are all discarded
    (only the closing W_D sweep may change the layer); an exact layer comes back unchanged."""
    from offline.methods.refine import Refinement, refine
    from offline.moe_math import Experts
    experts, stats = random_layer(seed=3, n=4, h=16, i=24, t=2000, router_gain=4.0)
    g = torch.Generator().manual_seed(0)
    noisy = Experts(*(m + 0.3 * torch.randn(m.shape, generator=g) for m in (experts.gate, experts.up, experts.down)))
    weights = stats.gate_weights()
    out, info = refine(noisy, weights, stats, Refinement(steps=300, lr=0.01, batch=512))
    assert info["held_out_error_after"] < 0.5 * info["held_out_error_before"]
    assert not info["kept_merge"] and out.gate.dtype == noisy.gate.dtype
    _, info = refine(noisy, weights, stats, Refinement(steps=10, lr=0.01, batch=512))  # fewer than check_every
    assert info["held_out_error_after"] < info["held_out_error_before"]
    wild, info = refine(noisy, weights, stats, Refinement(steps=50, lr=100.0, batch=512))
    assert min(info["held_out_errors"]) > info["held_out_error_before"]  # every step hurt ...
    assert torch.equal(wild.gate, noisy.gate) and torch.equal(wild.up, noisy.up)  # ... and none was kept
    assert info["down_sweep_kept"] and info["held_out_error_after"] < info["held_out_error_before"]
    same, info = refine(experts, weights, stats, Refinement(steps=50, lr=100.0, batch=512))
    # an exact layer stays exact: no step kept; the closing sweep, whose gain would be rounding noise
    # (kept on some CPUs' kernels, not on others), may only move the down projections by as much. Where
    # the kernels compute the layer and its reference alike, the error is exactly 0 and so is the gradient:
    # the steps then leave it at 0, which is why "no step improved it" is >=, not >.
    assert min(info["held_out_errors"]) >= info["held_out_error_before"] and info["held_out_error_after"] < 1e-6
    assert torch.equal(same.gate, experts.gate) and torch.equal(same.up, experts.up)
    torch.testing.assert_close(same.down, experts.down, atol=1e-5, rtol=1e-5)


def test_down_sweep_fits_each_down_projection_to_what_the_others_leave():
    """With W_G, W_U exact and every W_D perturbed, one Gauss-Seidel sweep of least squares takes the
    layer's output error down more than tenfold (measured 0.54 -> 0.04); it never raises the error on
    the tokens it fits."""
    from offline.methods.output_error import relative_error
    from offline.methods.refine import down_sweep
    experts, stats = random_layer(seed=5, n=4, h=16, i=24, t=2000, router_gain=4.0)
    g = torch.Generator().manual_seed(1)
    noisy = Experts(experts.gate, experts.up, experts.down + 0.5 * torch.randn(experts.down.shape, generator=g))
    weights, fit = stats.gate_weights(), torch.arange(2000) % 5 != 0
    error = lambda e: relative_error(stats.tokens, weights, e, stats.moe_output).item()  # noqa: E731
    swept = down_sweep(noisy, stats.tokens, weights, stats.moe_output, fit)
    assert error(swept) < 0.1 * error(noisy)
    assert torch.equal(swept.gate, noisy.gate) and torch.equal(swept.up, noisy.up)
    other = Experts(*(m + 0.3 * torch.randn(m.shape, generator=g) for m in experts.matrices().values()))
    fit_error = lambda e: relative_error(stats.tokens[fit], weights[fit], e, stats.moe_output[fit]).item()  # noqa: E731
    assert fit_error(down_sweep(other, stats.tokens, weights, stats.moe_output, fit)) < fit_error(other)


def test_refinement_in_chunks_keeps_the_others_fixed_and_still_improves_the_layer():
    """A memory budget of one merged expert refines them one at a time (each against what the others
    leave, written back in place): the layer still improves on held-out tokens, in the input's dtype."""
    from offline.methods.refine import Refinement, expert_chunks, refine
    experts, stats = random_layer(seed=3, n=4, h=16, i=24, t=2000, router_gain=4.0)
    g = torch.Generator().manual_seed(0)
    noisy = Experts(*(m + 0.3 * torch.randn(m.shape, generator=g) for m in experts.matrices().values()))
    one = 4 * 3 * 16 * 24  # one expert's float32 bytes
    assert expert_chunks(noisy, one) == [[0], [1], [2], [3]] and expert_chunks(noisy, 3 * one) == [[0, 1, 2], [3]]
    merged = noisy.to(torch.bfloat16)
    out, info = refine(merged, stats.gate_weights(), stats, Refinement(steps=100, lr=0.01, batch=512, chunk_bytes=one))
    assert info["chunks"] == 4 and len(info["held_out_errors"]) == 4 and out.gate.dtype == torch.bfloat16
    assert out.gate.data_ptr() == merged.gate.data_ptr()  # written back in place: the layer is never held twice
    assert info["held_out_error_after"] < 0.7 * info["held_out_error_before"]


def _authors_merge(experts, group, saliency, tokens, pca_dim=64):
    """SamsungSAILMontreal/ream ream/merger.py::Merger._merge ('logits+weights'), transcribed: PCA of the
    layer's unit-normalised neuron rows, Hungarian on activation + weight distances, saliency-weighted sum."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    def normalize_rows(x):
        return x / (torch.linalg.norm(x, dim=-1, keepdim=True) + 1e-8)

    weights = torch.stack([torch.cat([experts.gate[e], experts.up[e], experts.down[e].T], 1) for e in range(len(experts))])
    x = normalize_rows(weights).flatten(0, 1)
    x = x - x.mean(dim=-2, keepdim=True)
    torch.manual_seed(0)
    _, s, v = torch.pca_lowrank(x, q=pca_dim)
    feats = normalize_rows((x @ (v[:, :pca_dim] * s[:pca_dim])).reshape(len(experts), -1, pca_dim))
    act = torch.stack([(torch.nn.functional.silu(tokens @ experts.gate[e].T) * (tokens @ experts.up[e].T)).T
                       for e in range(len(experts))])  # [E, I, T]
    w = saliency[group].numpy() / saliency[group].numpy().sum()
    merged = [m[group[0]].float() * w[0] for m in (experts.gate, experts.up, experts.down)]
    for j, idx in enumerate(group[1:]):
        cost = torch.cdist(normalize_rows(act[group[0]]), normalize_rows(act[idx])).numpy()
        cost = cost + torch.cdist(feats[group[0]], feats[idx]).numpy()
        _, perm = linear_sum_assignment(cost)
        perm = torch.from_numpy(np.asarray(perm))
        for k, m in enumerate((experts.gate[idx][perm], experts.up[idx][perm], experts.down[idx][:, perm])):
            merged[k] = merged[k] + float(w[j + 1]) * m.float()
    return merged


def test_ream_merge_is_the_authors_merge():
    """Our REAM merge of one group equals the authors' `_merge` on the same tokens and saliency."""
    from offline.methods.ream import ream_merge, ream_saliency, weight_pca
    experts, stats = random_layer(seed=31, n=8, h=32, i=40, t=300)
    group = [int(i) for i in torch.argsort(stats.saliency, descending=True)[:4]]  # centroid first
    ours = ream_merge(experts, sorted(group), group[0], ream_saliency(stats), stats.tokens, weight_pca(experts))
    theirs = _authors_merge(experts, group, ream_saliency(stats), stats.tokens)
    for a, b in zip(ours.expert.matrices().values(), theirs):
        torch.testing.assert_close(a[0], b, atol=1e-5, rtol=1e-5)
