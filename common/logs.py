"""Log lines of every tokenwire process: JSON (or console) structlog records, request ids from
contextvars, and the standard library's records (uvicorn's, asyncio's, gRPC's) in the same shape.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog


def configure_logging(fmt: str = "json", stream: TextIO | None = None) -> None:
    """JSON lines on stdout by default; `console` for humans. Request ids come from contextvars."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream is None and sys.stdout.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    _route_standard_logging(renderer, stream or sys.stdout)


def _route_standard_logging(renderer: Any, stream: TextIO) -> None:
    """Warnings of libraries that log through the standard library (uvicorn's about malformed
    HTTP requests, asyncio's, gRPC's) as lines of the same shape, not plain text among JSON."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,  # a record's traceback, as text
                renderer,
            ],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
