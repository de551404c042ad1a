"""Protocol definitions and their generated Python stubs (`python -m protos.generate`)."""
