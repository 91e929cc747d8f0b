"""Inference: the early-exit cascade, the XLA FLOP cost of its segments, batch prediction."""
