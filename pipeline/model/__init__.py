"""Network definition: networks as lazily built block specs, the built-in models, learning rules, local heads and losses, and what builds a stage's blocks."""
