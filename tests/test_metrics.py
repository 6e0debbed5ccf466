"""Tests of hmdm_jax.metrics: matched accuracy, NLL bounds, FID, feature networks, figures, baselines."""
from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from scipy.special import logsumexp

from hmdm_jax import matching as acc
from hmdm_jax.metrics import baselines, fid, figures, inception, nll
from hmdm_jax.metrics import digit_classifier as dc

# ----------------------------------------------------------------------------------------------
# accuracy


def test_hungarian_recovers_inverse_permutation():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, size=500)
    perm = np.array([3, 0, 4, 1, 2])  # class c is called state perm[c]
    pred = perm[true]
    accuracy, mapping = acc.matched_accuracy(true, pred)
    assert accuracy == 1.0
    np.testing.assert_array_equal(mapping, np.argsort(perm))  # mapping[perm[c]] = c
    assert acc.matched_accuracy(true, rng.integers(0, 5, size=500))[0] < 0.4  # chance ≈ 0.2 + matching gain


def test_more_states_than_classes_and_unused_state():
    # class 0 split over states 0 (30) and 3 (10); class 1 -> state 1 (20, 5 of them -> state 0);
    # class 2 -> state 2 (25); state 4 is never used.
    true = np.array([0] * 40 + [1] * 25 + [2] * 25)
    pred = np.array([0] * 30 + [3] * 10 + [1] * 20 + [0] * 5 + [2] * 25)
    mapping = acc.best_matching(true, pred, num_classes=3, num_states=5)
    np.testing.assert_array_equal(mapping, [0, 1, 2, -1, -1])
    accuracy, _ = acc.matched_accuracy(true, pred, num_classes=3, num_states=5)
    assert accuracy == pytest.approx((30 + 20 + 25) / 90)
    conf = acc.confusion_matrix(true, pred, num_classes=3, num_states=5)
    np.testing.assert_array_equal(conf, [[30, 0, 0, 10, 0], [5, 20, 0, 0, 0], [0, 0, 25, 0, 0]])


def test_fewer_states_than_classes():
    true = np.array([0] * 10 + [1] * 10 + [2] * 4)
    pred = np.array([1] * 10 + [0] * 10 + [0] * 4)  # classes 1 and 2 merged into state 0
    accuracy, mapping = acc.matched_accuracy(true, pred)
    np.testing.assert_array_equal(mapping, [1, 0])
    assert accuracy == pytest.approx(20 / 24)


def test_minus_one_entries_are_ignored():
    true = np.array([0, 0, 1, 1, -1, -1, 2])
    pred = np.array([1, 1, 0, 0, 2, -1, -1])  # the -1 pairs would be errors if scored
    accuracy, mapping = acc.matched_accuracy(true, pred, num_classes=3, num_states=3)
    assert accuracy == 1.0
    np.testing.assert_array_equal(mapping[:2], [1, 0])
    assert acc.clustering_scores(true, pred) == {"ari": 1.0, "nmi": 1.0}
    np.testing.assert_allclose(acc.class_usage(pred, 3), [0.4, 0.4, 0.2])
    assert math.isnan(acc.accuracy_with_mapping([-1, 0], [1, -1], mapping))


def test_matching_learned_on_train_is_reused_on_new_data():
    rng = np.random.default_rng(1)
    perm = np.array([2, 0, 1])
    train_true = rng.integers(0, 3, 300)
    mapping = acc.best_matching(train_true, perm[train_true])
    test_true = rng.integers(0, 3, 200)
    noisy = np.where(rng.random(200) < 0.1, rng.integers(0, 3, 200), test_true)
    expected = np.mean(noisy == test_true)
    assert acc.accuracy_with_mapping(test_true, perm[noisy], mapping) == pytest.approx(expected)
    # a model whose states swapped names after training: re-matching on test hides it, the saved matching does not
    swapped = np.array([0, 2, 1])[perm[test_true]]
    assert acc.matched_accuracy(test_true, swapped)[0] == 1.0
    assert acc.accuracy_with_mapping(test_true, swapped, mapping) == pytest.approx(np.mean(test_true == 1))


def test_clustering_scores_permutation_and_independence():
    rng = np.random.default_rng(2)
    true = rng.integers(0, 4, 400)
    scores = acc.clustering_scores(true, np.array([3, 1, 0, 2])[true])
    assert scores["ari"] == pytest.approx(1.0) and scores["nmi"] == pytest.approx(1.0)
    rand = acc.clustering_scores(true, rng.integers(0, 4, 400))
    assert abs(rand["ari"]) < 0.05 and rand["nmi"] < 0.05


def test_masked_label_accuracy_scores_only_hidden_labels():
    true = np.array([[0, 1, 1, 2], [2, 2, 0, -1]])
    pred = np.array([[0, 0, 1, 2], [1, 2, 0, 0]])
    observed = np.array([[True, True, False, False], [True, False, False, False]])
    # hidden & labelled: (0,2) 1/1 ok, (0,3) 2/2 ok, (1,1) 2/2 ok, (1,2) 0/0 ok  -> identity: 4/4
    assert acc.masked_label_accuracy(true, pred, observed) == 1.0
    # with a state→class mapping that swaps 0 and 2
    assert acc.masked_label_accuracy(true, pred, observed, np.array([2, 1, 0])) == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="observed_mask"):
        acc.masked_label_accuracy(true, pred, observed[:, :3])


def test_accuracy_input_validation():
    with pytest.raises(ValueError, match="same shape"):
        acc.matched_accuracy([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no entry in a mapping"):
        acc.accuracy_with_mapping([0, 1], [0, 5], np.array([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        acc.best_matching([0, 3], [0, 1], num_classes=2)


# ----------------------------------------------------------------------------------------------
# NLL


def test_mixture_nll_matches_brute_force_and_hand_computation():
    rng = np.random.default_rng(3)
    num_dims = 784
    elbo = -1e5 + 40.0 * rng.standard_normal((6, 4))  # diffusion-sized ELBOs in nats
    log_pi = np.log(rng.dirichlet(np.ones(4)))
    got = np.asarray(nll.mixture_nll_bits_per_dim(log_pi, elbo, num_dims))
    ref = -logsumexp(log_pi[None] + elbo, axis=1) / (num_dims * np.log(2))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # K = 1: the bound is −ELBO / (D ln 2)
    got1 = np.asarray(nll.mixture_nll_bits_per_dim(np.zeros(1), elbo[:, :1], num_dims))
    np.testing.assert_allclose(got1, -elbo[:, 0] / (num_dims * np.log(2)), rtol=1e-6)
    # hand: π = (1/4, 3/4), ELBO = (log 0.2, log 0.6) in a 1-D space -> −log2(0.05 + 0.45) = 1 bit
    hand = nll.mixture_nll_bits_per_dim(np.log([0.25, 0.75]), np.log([[0.2, 0.6]]), 1)
    np.testing.assert_allclose(np.asarray(hand), [1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="log_pi"):
        nll.mixture_nll_bits_per_dim(np.zeros(3), elbo, num_dims)


def _brute_force_hmm_log_marginal(log_pi, log_A, log_b):
    n, k = log_b.shape
    terms = []
    for path in itertools.product(range(k), repeat=n):
        lp = log_pi[path[0]] + log_b[0, path[0]]
        for i in range(1, n):
            lp += log_A[path[i - 1], path[i]] + log_b[i, path[i]]
        terms.append(lp)
    return logsumexp(terms)


def test_hmdm_nll_matches_path_enumeration():
    rng = np.random.default_rng(4)
    k, n, num_dims = 3, 4, 784
    log_pi = np.log(rng.dirichlet(np.ones(k)))
    log_A = np.log(rng.dirichlet(np.ones(k), size=k))
    elbo = -1e5 + 30.0 * rng.standard_normal((3, n, k))
    lengths = np.array([4, 2, 1])
    mask = np.arange(n)[None] < lengths[:, None]
    got = np.asarray(nll.hmdm_nll_bits_per_dim(log_pi, log_A, elbo, mask, num_dims))
    ref = np.array([
        -_brute_force_hmm_log_marginal(log_pi, log_A, elbo[i, :lengths[i]]) / (lengths[i] * num_dims * np.log(2))
        for i in range(3)
    ])
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    # total nats / (total frames · D ln 2)
    total = nll.dataset_bits_per_dim(got, lengths)
    np.testing.assert_allclose(float(total), np.sum(ref * lengths) / lengths.sum(), rtol=1e-6)


def test_hmdm_nll_with_iid_transitions_equals_mixture_nll():
    # A[i, :] = π for all i makes frames independent mixtures: the two bounds must agree
    rng = np.random.default_rng(5)
    k, n, num_dims = 4, 5, 64
    pi = rng.dirichlet(np.ones(k))
    elbo = -3e3 + 10.0 * rng.standard_normal((2, n, k))
    hmdm = nll.hmdm_nll_bits_per_dim(np.log(pi), np.log(np.tile(pi, (k, 1))), elbo, None, num_dims)
    per_frame = nll.mixture_nll_bits_per_dim(np.log(pi), elbo.reshape(-1, k), num_dims).reshape(2, n)
    np.testing.assert_allclose(np.asarray(hmdm), np.asarray(per_frame).mean(axis=1), rtol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        nll.hmdm_nll_bits_per_dim(np.log(pi), np.log(np.tile(pi, (k, 1))), elbo, np.ones((2, n - 1), bool), 64)


# ----------------------------------------------------------------------------------------------
# FID


def _random_spd(rng, f, rank=None):
    m = rng.standard_normal((f, rank or f))
    return m @ m.T / f + (0 if rank else 0.1 * np.eye(f))


def _scipy_fid(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(covmean)))


def test_frechet_distance_matches_scipy_sqrtm_reference():
    rng = np.random.default_rng(6)
    for f in (2, 8, 64):
        mu1, mu2 = rng.standard_normal(f), rng.standard_normal(f)
        s1, s2 = _random_spd(rng, f), _random_spd(rng, f)
        ref = _scipy_fid(mu1, s1, mu2, s2)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-7, abs=1e-9)
        assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ref, rel=1e-7, abs=1e-9)


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(7)
    s = _random_spd(rng, 32)
    mu = rng.standard_normal(32)
    assert abs(fid.frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.standard_normal(16), rng.standard_normal(16)
    closed = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert fid.frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(closed, rel=1e-10)
    # rank-deficient diagonal: tr((S1 S2)^½) = √(a·b) on the shared support
    got = fid.frechet_distance(np.zeros(2), np.diag([2.0, 0.0]), np.zeros(2), np.diag([8.0, 3.0]))
    assert got == pytest.approx(2 + 8 + 3 - 2 * 4.0, rel=1e-12)


def test_frechet_distance_rank_deficient_covariances_are_finite():
    rng = np.random.default_rng(8)
    f = 40
    s1, s2 = _random_spd(rng, f, rank=5), _random_spd(rng, f, rank=7)  # e.g. N < F features
    d = fid.frechet_distance(np.zeros(f), s1, np.zeros(f), s2)
    assert np.isfinite(d) and d > 0
    # agrees with the eps-offset scipy reference used by pytorch-fid for singular products
    eps = 1e-6 * np.eye(f)
    assert d == pytest.approx(_scipy_fid(np.zeros(f), s1 + eps, np.zeros(f), s2 + eps), rel=1e-3)
    with pytest.raises(ValueError, match="symmetric"):
        fid.frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), np.zeros(2), np.eye(2))


def test_fid_from_features_mean_shift_and_statistics():
    rng = np.random.default_rng(9)
    feats = rng.standard_normal((500, 6))
    shift = rng.standard_normal(6)
    assert fid.fid_from_features(feats, feats + shift) == pytest.approx(np.sum(shift ** 2), rel=1e-9)
    mu, sigma = fid.feature_statistics(feats)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False))
    np.testing.assert_allclose(mu, feats.mean(0))
    with pytest.raises(ValueError, match="at least 2"):
        fid.feature_statistics(feats[:1])


def test_extract_features_batches_and_fid_record():
    rng = np.random.default_rng(10)
    images = rng.uniform(-1, 1, (23, 4, 4, 1)).astype(np.float32)
    calls = []

    def extractor(x):
        calls.append(x.shape[0])
        return x.reshape(x.shape[0], -1)[:, :5] * 2

    got = fid.extract_features(extractor, images, batch_size=10)
    np.testing.assert_allclose(got, images.reshape(23, -1)[:, :5] * 2)
    assert calls == [10, 10, 10]  # fixed batch size: the last batch is padded, then trimmed
    rec = fid.fid_record(12.5, num_samples=10000, sampler="ddim", steps=50, ema=True, feature_net="digit-cnn-128")
    assert rec == {"fid": 12.5, "num_samples": 10000, "sampler": "ddim", "steps": 50, "ema": True,
                   "feature_net": "digit-cnn-128"}
    with pytest.raises(ValueError):
        fid.fid_record(1.0, num_samples=1, sampler="ddpm", steps=10, ema=False, feature_net="x")


def test_digit_classifier_on_sklearn_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 2 - 1).astype(np.float32)[..., None]  # [1797, 8, 8, 1]
    labels = digits.target
    perm = np.random.default_rng(0).permutation(len(labels))
    train, test = perm[:1400], perm[1400:]
    trained = dc.train_digit_classifier(jax.random.PRNGKey(0), images[train], labels[train], 10, steps=150,
                                        batch_size=64, learning_rate=3e-3, test_images=images[test],
                                        test_labels=labels[test])
    assert trained.test_accuracy >= 0.9
    assert trained.apply_fn(trained.params, images[:3]).shape == (3, 10)
    feats = dc.classifier_features(trained.params, images[:7])
    assert feats.shape == (7, dc.FEATURE_DIM)
    extractor = dc.classifier_feature_extractor(trained.params)
    f_train = fid.extract_features(extractor, images[train[:300]])
    f_test = fid.extract_features(extractor, images[test[:300]])
    noise = fid.extract_features(extractor, np.random.default_rng(1).uniform(-1, 1, (300, 8, 8, 1)))
    # same distribution scores far closer than uniform noise
    assert fid.fid_from_features(f_train, f_test) < 0.2 * fid.fid_from_features(f_train, noise)


# ----------------------------------------------------------------------------------------------
# Inception


def test_inception_architecture_shapes_without_compute():
    shapes = inception.inception_variable_shapes()
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))
    assert num_params == 21_785_568  # torchvision InceptionV3 (27,161,264) minus fc and AuxLogits
    for image_shape in ((2, 32, 32, 3), (2, 28, 28, 1)):
        out = jax.eval_shape(lambda v, x: inception.FIDInceptionV3().apply(v, x), shapes,
                             jax.ShapeDtypeStruct(image_shape, jnp.float32))
        assert out.shape == (2, inception.INCEPTION_FEATURE_DIM)


def test_inception_resize_matches_pytorch_bilinear():
    def torch_weights(n_in, n_out):  # PyTorch's bilinear, align_corners=False
        w = np.zeros((n_out, n_in))
        for o in range(n_out):
            src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            w[o, i0] += 1 - (src - i0)
            w[o, i1] += src - i0
        return w

    x = np.random.default_rng(11).uniform(-1, 1, (2, 5, 7, 1)).astype(np.float32)
    got = np.asarray(inception.resize_to_inception_input(x, 13))
    ref = np.einsum("oh,bhwc,pw->bopc", torch_weights(5, 13), x, torch_weights(7, 13))
    assert got.shape == (2, 13, 13, 3)
    np.testing.assert_allclose(got, np.repeat(ref, 3, -1), atol=2e-6)


def _torch_name(path):
    """Flax variable path -> (pytorch-fid state-dict name, is_conv_kernel)."""
    collection, *modules, layer, leaf = path
    torch_leaf = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}[leaf]
    return ".".join(modules + [layer, torch_leaf]), leaf == "kernel"


def test_inception_pytorch_state_dict_conversion_covers_architecture():
    from flax import traverse_util

    expected = traverse_util.flatten_dict(inception.inception_variable_shapes())
    state_dict = {"fc.weight": np.zeros((1008, 2048), np.float32), "Conv2d_1a_3x3.bn.num_batches_tracked": 0}
    for path, s in expected.items():
        name, is_kernel = _torch_name(path)
        shape = (s.shape[3], s.shape[2], s.shape[0], s.shape[1]) if is_kernel else s.shape
        state_dict[name] = np.broadcast_to(np.float32(len(name)), shape)  # no memory: a view of one scalar
    converted = traverse_util.flatten_dict(inception.convert_pytorch_state_dict(state_dict))
    assert converted.keys() == expected.keys()
    assert all(converted[k].shape == expected[k].shape for k in expected)
    with pytest.raises(ValueError, match="unrecognised"):
        inception.convert_pytorch_state_dict({"Mixed_5b.branch1x1.foo.weight": np.zeros(3)})


def test_inception_weights_missing_file_and_key_mismatch(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        inception.load_inception_variables(tmp_path / "absent.npz")
    bad = tmp_path / "partial.npz"
    np.savez(bad, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32),
                     "Conv2d_1a_3x3.bn.weight": np.zeros(31, np.float32)})
    with pytest.raises(ValueError, match="missing.*wrong shape"):
        inception.load_inception_variables(bad)
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "w.h5").write_bytes(b"x")
        inception.load_inception_variables(tmp_path / "w.h5")


# ----------------------------------------------------------------------------------------------
# figures


def _is_png(path):
    with open(path, "rb") as fh:
        return fh.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("channels", [1, 3])
def test_figures_write_png(tmp_path, channels):
    rng = np.random.default_rng(12)
    imgs = rng.uniform(-1, 1, (3, 4, 8, 8, channels)).astype(np.float32)
    paths = [
        figures.plot_samples_per_class(imgs, tmp_path / f"samples{channels}.png"),
        figures.plot_reconstructions(imgs[0], {100: imgs[1], 10: imgs[2]}, tmp_path / f"rec{channels}.png"),
    ]
    a_true = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    paths.append(figures.plot_transition_matrices(a_true[[2, 0, 1]][:, [2, 0, 1]], a_true,
                                                  tmp_path / "sub" / "A.png", mapping=np.array([2, 0, 1])))
    paths.append(figures.plot_confusion(np.array([[5, 1], [0, 7], [2, 2]]), tmp_path / "conf.png"))
    records = [{"step": i, "loss": 1.0 / (i + 1), "acc": i / 10} for i in range(10)] + [{"step": 10, "fid": 3.0}]
    paths.append(figures.plot_training_curves(records, ["loss", "acc", "missing"], tmp_path / "curves.png",
                                              log_y=["loss"]))
    for p in paths:
        assert _is_png(p) and (tmp_path / p).stat().st_size > 1000
    np.testing.assert_allclose(figures.to_display(np.array([-1.0, 0.0, 1.0, 2.0])[None, None, :, None]).ravel(),
                               [0.0, 0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="rows summing to 1"):
        figures.plot_transition_matrices(np.log(a_true), None, tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------------
# baselines


def _clusters(rng, n, means, scale=0.3):
    labels = rng.integers(0, len(means), n)
    return means[labels] + scale * rng.standard_normal((n, means.shape[1])), labels


def test_kmeans_and_gmm_baselines_on_separated_clusters():
    rng = np.random.default_rng(13)
    means = 3.0 * rng.standard_normal((4, 16))
    x_train, y_train = _clusters(rng, 400, means)
    x_test, y_test = _clusters(rng, 200, means)
    frames_train, frames_test = x_train.reshape(-1, 4, 4, 1), x_test.reshape(-1, 4, 4, 1)
    for fn in (baselines.kmeans_baseline, baselines.gmm_baseline):
        res = fn(frames_train, y_train, frames_test, y_test, K=4, seed=0, pca_dim=8)
        assert res["accuracy"] >= 0.95 and res["accuracy_train_matching"] >= 0.95, res
        assert res["ari"] > 0.9 and res["nmi"] > 0.9
        assert len(res["class_usage"]) == 4 and sum(res["class_usage"]) == pytest.approx(1.0)
        assert res["wall_time_s"] > 0


def _sticky_sequences(rng, num_seq, n, a, means, scale):
    k = a.shape[0]
    states = np.zeros((num_seq, n), np.int64)
    for s in range(num_seq):
        states[s, 0] = rng.integers(k)
        for i in range(1, n):
            states[s, i] = rng.choice(k, p=a[states[s, i - 1]])
    frames = means[states] + scale * rng.standard_normal(states.shape + (means.shape[1],))
    return frames, states


def test_gaussian_hmm_baseline_recovers_sticky_transitions():
    rng = np.random.default_rng(14)
    a_true = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05], [0.05, 0.05, 0.9]])
    means = 2.0 * rng.standard_normal((3, 6))
    x_train, s_train = _sticky_sequences(rng, 40, 50, a_true, means, 0.5)
    x_test, s_test = _sticky_sequences(rng, 10, 50, a_true, means, 0.5)
    lengths = rng.integers(30, 51, 40)
    train_mask = np.arange(50)[None] < lengths[:, None]
    test_mask = np.ones((10, 50), bool)
    test_mask[0, 20:] = False
    test_labels = np.where(test_mask, s_test, -1)
    res = baselines.gaussian_hmm_baseline(x_train, train_mask, x_test, test_mask, test_labels, K=3, seed=0,
                                          train_labels=np.where(train_mask, s_train, -1), pca_dim=None,
                                          covariance_type="diag")
    assert res["accuracy"] >= 0.95 and res["accuracy_train_matching"] >= 0.95
    np.testing.assert_allclose(res["transmat_matched"], a_true, atol=0.05)
    np.testing.assert_allclose(np.sum(res["transmat"], axis=1), 1.0)


def test_gaussian_hmm_baseline_pseudocounts_fill_a_state_never_left():
    # Cluster 2 only ever appears as the last frame, so state 2 has no outgoing transitions: its row
    # of expected counts is (numerically) zero, the situation behind hmmlearn's "rows of transmat_
    # must sum to 1". With Dirichlet pseudo-counts the row is the prior's mean, uniform 1/K.
    rng = np.random.default_rng(15)
    means = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, 6.0]])
    num_seq, n = 6, 12
    states = np.repeat((np.arange(n)[None] >= n // 2).astype(np.int64), num_seq, 0)
    states[:, -1] = 2
    x = means[states] + 0.3 * rng.standard_normal((num_seq, n, 2))
    mask = np.ones((num_seq, n), bool)
    res = baselines.gaussian_hmm_baseline(x, mask, x, mask, states, K=3, seed=0, pca_dim=None,
                                          covariance_type="diag")
    assert res["accuracy"] == 1.0
    transmat = np.asarray(res["transmat_matched"])
    np.testing.assert_allclose(transmat.sum(axis=1), 1.0)
    np.testing.assert_allclose(transmat[2], [1 / 3] * 3, atol=1e-6)
    np.testing.assert_allclose(transmat[0, :2], [5 / 6, 1 / 6], atol=1e-3)  # 0→0 five times, 0→1 once
