"""Serving benchmarks: the load generator, the naive baselines on the same weights, and the roofline."""
