"""Structured JSON logs: one object per line with time, level, logger, message and request id."""

from __future__ import annotations

import json
import logging
import sys
import traceback

from core.settings import Settings


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "tenant_id"):
            if (value := getattr(record, key, None)) is not None:
                entry[key] = str(value)
        if record.exc_info:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    """JSON logs to stderr (plain text in development, where people read them)."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.env == "production":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
