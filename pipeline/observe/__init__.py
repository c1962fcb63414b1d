"""Observability: metrics, stage reports and summaries, memory accounting, alignment angles, progress, plots and TensorBoard."""
