"""Persistence: checkpoints, their writer thread, and a finished run loaded back."""
