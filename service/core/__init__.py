"""One core for every protocol: it admits calls, checks requests against the model that
runs them, batches and runs them, and records the outcome."""
