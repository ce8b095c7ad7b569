"""Benchmarks: without a GPU, Triton would only run in its interpreter, which is never timed."""
