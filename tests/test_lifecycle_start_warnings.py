"""Start-up warnings about settings the model overrides."""

from __future__ import annotations

import pytest

from tests.procs import ServerProcess


@pytest.mark.slow
def test_max_context_tokens_beyond_the_models_context_is_a_warning_naming_both() -> None:
    """`--max-context-tokens` above the model's context (512 for the bundled model) starts the
    server with the model's context, and says so in one warning naming both numbers."""
    server = ServerProcess("--metrics-port", "0", "--max-context-tokens", "100000")
    try:
        loaded = server.wait_for("model.loaded")
        server.wait_for("server.started")
    finally:
        server.close()
    warnings = [r for r in server.records if r["event"] == "model.max_context_tokens_capped"]
    assert loaded["request_tokens"] == loaded["context_length"] == 512
    assert [(w["level"], w["max_context_tokens"], w["context_length"]) for w in warnings] == [
        ("warning", 100000, 512)
    ]
