"""Evaluation harness: peers, probes, grid, results store and report."""
