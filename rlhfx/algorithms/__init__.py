"""Algorithms: one file per algorithm (state, init, step builder, train loop)."""
