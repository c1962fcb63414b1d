"""Launchers: start the stage processes of a pipeline run (locally, or the helpers around torchrun)."""
