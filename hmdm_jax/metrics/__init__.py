"""Evaluation for hmdm_jax beyond label accuracy (``hmdm_jax.matching``): NLL in bits/dim, FID, figures and
classical baselines. Used by experiments; never imported by the core modules.

Submodules:
  nll               mixture / HMDM negative log-likelihood bounds in bits per dimension.
  fid               Fréchet distance, feature statistics, the FeatureExtractor interface, fid_record.
  digit_classifier  small CNN for the digits' "domain FID" (not comparable with Inception FID).
  inception         Flax FID-InceptionV3 (pytorch-fid weights loaded from a local file).
  figures           PNG figures (samples, reconstructions, transition matrices, confusion, curves).
  baselines         k-means, Gaussian mixture and Gaussian HMM baselines on PCA-reduced frames.
"""
from hmdm_jax.metrics.baselines import (gaussian_hmm_baseline, gmm_baseline, kmeans_baseline,
                                        matched_transition_matrix)
from hmdm_jax.metrics.digit_classifier import (TrainedClassifier, classifier_feature_extractor,
                                               classifier_features, classifier_logits, train_digit_classifier)
from hmdm_jax.metrics.fid import (FeatureExtractor, extract_features, feature_statistics, fid_from_features,
                                  fid_record, frechet_distance)
from hmdm_jax.metrics.figures import (plot_confusion, plot_reconstructions, plot_samples_per_class,
                                      plot_training_curves, plot_transition_matrices)
from hmdm_jax.metrics.inception import (FIDInceptionV3, inception_feature_extractor, inception_features,
                                        load_inception_variables)
from hmdm_jax.metrics.nll import dataset_bits_per_dim, hmdm_nll_bits_per_dim, mixture_nll_bits_per_dim

__all__ = [
    "gaussian_hmm_baseline", "gmm_baseline", "kmeans_baseline", "matched_transition_matrix",
    "TrainedClassifier", "classifier_feature_extractor", "classifier_features", "classifier_logits",
    "train_digit_classifier",
    "FeatureExtractor", "extract_features", "feature_statistics", "fid_from_features", "fid_record",
    "frechet_distance",
    "plot_confusion", "plot_reconstructions", "plot_samples_per_class", "plot_training_curves",
    "plot_transition_matrices",
    "FIDInceptionV3", "inception_feature_extractor", "inception_features", "load_inception_variables",
    "dataset_bits_per_dim", "hmdm_nll_bits_per_dim", "mixture_nll_bits_per_dim",
]
