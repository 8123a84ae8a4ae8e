"""Verification: sound bounds on a network's outputs over an input region, complete verification of
small ReLU networks, randomized smoothing, and certified training."""
