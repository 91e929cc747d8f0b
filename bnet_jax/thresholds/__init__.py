"""Thresholds: screening exit-threshold vectors (grids, figures, rules) and choosing them
for a trained workdir from its cached exits."""
