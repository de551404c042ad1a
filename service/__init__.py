"""The gRPC inference service and the model repository it reads."""
