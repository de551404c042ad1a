"""The process: flags and settings, wiring, workers, signals, the ready line, shutdown."""
