"""Shared memory regions clients register (system and CUDA), named by requests instead of
carrying tensor bytes."""
