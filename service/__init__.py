"""tokenwire server: an ONNX Runtime decode loop behind a grpc.aio streaming API."""

__version__ = "0.1.0"
