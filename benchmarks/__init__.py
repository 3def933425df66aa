"""Benchmarks: one script per question (gemm, accuracy, e2e), a shared harness, peers in the same run."""
