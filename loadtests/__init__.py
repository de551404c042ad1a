"""Locust load tests and the benchmark (`python -m loadtests.bench`)."""
