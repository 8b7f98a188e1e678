"""Inference and export: the predictor, the exporter and the standalone runtime (imports no rtrain)."""
