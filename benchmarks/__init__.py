"""attnkit benchmark harness: ``python benchmarks/run.py --help``; method in docs/benchmarks.md."""
