"""Metrics that are not a library call, plots and reports."""
