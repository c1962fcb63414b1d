"""Transports: how a stage hands detached activations and labels to the next one."""
