"""Evaluation: metrics, the noisy benchmark, thresholds from good images, duplicates and leakage."""
