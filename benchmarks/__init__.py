"""Benchmarks of wheelcas against uv and pip on the R40 reference workload (`make bench`)."""
