"""Load benchmarks of the pubsub API: python -m bench (see bench/README.md)."""
