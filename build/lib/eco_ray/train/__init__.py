"""Step A: train the parent with weighted stochastic depth (a Ray-free loop, run by Ray Train)."""
