"""The gRPC transport: the only package in the service that imports grpc or the stubs."""
