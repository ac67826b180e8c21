"""The SSE edge: turns tokenwire gRPC streams into Server-Sent Events for browsers and
OpenAI-compatible clients. A gRPC client like any other; it never imports the service."""
