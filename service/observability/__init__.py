"""What the server tells about itself: metrics and their endpoint, GPU metrics, logs,
connection counts, and the probe port."""
