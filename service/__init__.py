"""tokenwire server: an ONNX Runtime decode loop behind a grpc.aio streaming API."""

# Installed as tokenwire.server (see pyproject.toml). Imported by its folder name (from the
# repository root, say, where Python puts the working directory on sys.path), each module
# would load a second time beside the installed one, so that name is refused.
if __name__ != "tokenwire.server":
    raise ImportError(f"import tokenwire.server, not {__name__}")

__version__ = "0.1.0"
