"""PaDiM itself: configuration, backbones, features, Gaussian statistics, maps, calibration, the estimator."""
