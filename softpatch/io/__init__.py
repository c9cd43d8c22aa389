"""Input and output: images, folders and datasets, safe zip extraction, limits, path containment, file formats, CSV, demo data, heatmaps."""
