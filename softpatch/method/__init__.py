"""The SoftPatch method: patch features, noise discriminators, denoising, coreset, memory bank, search, maps, the estimator."""
