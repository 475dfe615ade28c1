"""What a finished analysis can be turned into without re-running the model: QuPath GeoJSON, heatmaps at any
pyramid level, and the region-of-interest filter that decides which patches an analysis reads."""
