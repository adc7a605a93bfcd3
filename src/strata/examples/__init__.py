"""Small, real models made in code, for the demo, the tests and the benchmarks (no hub downloads)."""
