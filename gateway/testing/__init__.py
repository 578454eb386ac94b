"""Test peers for the gateway: what tests and benchmarks talk to instead of the real systems."""
