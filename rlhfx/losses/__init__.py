"""Losses: pure functions of arrays that return (loss, metrics)."""
