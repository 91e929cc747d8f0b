"""Reporting: the Table-1 benchmark, figures and plain-text tables."""
