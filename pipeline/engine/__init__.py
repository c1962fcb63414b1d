"""The stage engine: each stage's schedule as data, the roles that take it, remote gradients, and the stage's loop."""
