"""Logging of the service: one configuration for the parent process and every uvicorn worker, with the API key
kept out of every line.

``logging_config(level)`` is handed to uvicorn (``log_config``), which applies it in each worker process too, so
the service's own INFO lines (``serving artifact ...``) appear whatever ``--workers`` is. The redaction filter
sits on the handlers, not on loggers: a logger's filter does not see records propagated from its children
(``service.runtime`` and the like), a handler's sees every record it writes.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable

SERVICE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
MIN_SECRET_LENGTH = 8  # the settings refuse shorter API keys, so a short common word is never blanked out


class RedactSecrets(logging.Filter):
    """Replaces every configured secret (the API key: a client may send it as an id, in a URL or, at trace level,
    in a logged header) and the value of any key/token/secret/password query parameter with ``***``, in the
    message, its arguments one by one (uvicorn's access formatter unpacks exactly five), the formatted traceback
    and the stack. Also escapes CR/LF in access-log arguments, so a decoded path cannot forge log lines. Never
    raises: a failing filter would make ``logging`` print the raw record to stderr."""

    SENSITIVE_QUERY = re.compile(r"((?:api[_-]?key|key|token|secret|password)=)[^&\s\"']*", re.IGNORECASE)
    _traceback_formatter = logging.Formatter()

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= MIN_SECRET_LENGTH:
            self.secrets.add(secret)

    def redact(self, text: str) -> str:
        text = self.SENSITIVE_QUERY.sub(r"\1***", text)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text

    def _argument(self, value: object, escape_lines: bool) -> object:
        if isinstance(value, bool | int | float) or value is None:
            return value  # formatted with %d/%f: must stay a number
        text = value if isinstance(value, str) else str(value)
        redacted = self.redact(text)
        if escape_lines:
            redacted = redacted.replace("\r", "\\r").replace("\n", "\\n")
        return value if redacted == text else redacted

    def filter(self, record: logging.LogRecord) -> bool:
        # Installed on the service's loggers and on the handlers: a record passing both is redacted once.
        if getattr(record, "_redacted", False):
            return True
        record._redacted = True
        try:
            escape = record.name == "uvicorn.access"
            if isinstance(record.msg, str):
                record.msg = self.redact(record.msg)
            elif record.msg is not None:
                record.msg = self.redact(str(record.msg))
            if isinstance(record.args, tuple):
                record.args = tuple(self._argument(a, escape) for a in record.args)
            elif isinstance(record.args, dict):
                record.args = {k: self._argument(v, escape) for k, v in record.args.items()}
            if record.exc_info and not record.exc_text:
                record.exc_text = self._traceback_formatter.formatException(record.exc_info)
            if record.exc_text:
                record.exc_text = self.redact(record.exc_text)
            if record.stack_info:
                record.stack_info = self.redact(record.stack_info)
        except Exception:  # pragma: no cover - a filter must not break logging
            record.msg, record.args = "(log record withheld: redaction failed)", ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


class CurrentStreamHandler(logging.StreamHandler):
    """A StreamHandler writing to whatever ``sys.stdout`` / ``sys.stderr`` is when a record is emitted, not what
    it was when logging was configured (a handler holding a replaced stream, a closed one under pytest's
    capture for instance, fails on every record)."""

    def __init__(self, stream_name: str = "stderr") -> None:
        if stream_name not in ("stdout", "stderr"):
            raise ValueError(f"stream_name must be stdout or stderr, got {stream_name!r}")
        self.stream_name = stream_name
        super().__init__()

    @property
    def stream(self):  # type: ignore[override]
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value) -> None:
        pass  # always the current one


REDACT = RedactSecrets()


def redaction_filter() -> RedactSecrets:
    """The process-wide filter, knowing the key of ``MMF_API_KEY`` (``logging.config`` factory: each worker
    builds its handlers from the configuration, before the app reads its settings)."""
    REDACT.add(os.environ.get("MMF_API_KEY"))
    return REDACT


def logging_config(level: str = "info") -> dict:
    """uvicorn's own configuration (its formatters, access lines on stdout), plus the service's loggers and the
    root logger on stderr, every handler redacting."""
    numeric = logging.getLevelName(level.upper())
    root_level = numeric if isinstance(numeric, int) and numeric < logging.INFO else logging.INFO
    # faiss-cpu's loader reports at INFO every per-CPU module it does not ship before it loads its build with
    # run-time SIMD dispatch: error-looking lines on every start, kept for debug logging.
    loader_level = root_level if root_level < logging.INFO else logging.WARNING
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"redact": {"()": "service.logs.redaction_filter"}},
        "formatters": {
            "default": {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"},
            "access": {
                "()": "uvicorn.logging.AccessFormatter",
                "fmt": '%(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s',
            },
            "service": {"format": SERVICE_FORMAT},
        },
        "handlers": {
            name: {
                "formatter": name,
                "class": "service.logs.CurrentStreamHandler",
                "stream_name": stream,
                "filters": ["redact"],
            }
            for name, stream in (("default", "stderr"), ("access", "stdout"), ("service", "stderr"))
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.error": {"level": "INFO"},
            "uvicorn.access": {"handlers": ["access"], "level": "INFO", "propagate": False},
            "faiss.loader": {"level": loader_level},
        },
        "root": {"handlers": ["service"], "level": root_level},
    }


def configure_logging(level: str = "info") -> None:
    import logging.config

    logging.config.dictConfig(logging_config(level))
