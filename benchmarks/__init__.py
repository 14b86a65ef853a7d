"""Benchmarks: throughput, kernels, data loading, time to accuracy (run as scripts or ``python -m``)."""
