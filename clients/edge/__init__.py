"""The SSE edge: turns tokenwire gRPC streams into Server-Sent Events for browsers and
OpenAI-compatible clients. A gRPC client like any other; it never imports the service."""

# Installed as tokenwire.edge (see clients/pyproject.toml). Imported by its folder name (from the
# repository root, say, where Python puts the working directory on sys.path), each module
# would load a second time beside the installed one, so that name is refused.
if __name__ != "tokenwire.edge":
    raise ImportError(f"import tokenwire.edge, not {__name__}")
