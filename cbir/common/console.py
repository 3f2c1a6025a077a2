"""A quiet console: third-party adverts, deprecations and migration chatter filtered, warnings
that matter kept; and rich tables copied into the job's log file."""

from __future__ import annotations

import io
import logging
import sys
import warnings

# (module of the logger, text in the message) of log lines that tell the user nothing about their run
DROPPED_LOG_LINES = (
    ("lightning.pytorch.utilities.rank_zero", "litlogger"),  # "Tip: ... try installing litlogger"
    ("lightning.fabric.utilities.rank_zero", "litlogger"),
)
# schema creation/migration; MLflow's database layer also logs a traceback for each database error it
# then raises (a locked SQLite file: on every retry), which cbir reports in one line
QUIET_LOGGERS = {
    "mlflow.store.db.utils": logging.CRITICAL,
    "alembic.runtime.migration": logging.WARNING,
    "alembic": logging.WARNING,
}
DROPPED_WARNINGS = (
    r".*isinstance\(treespec, LeafSpec\).*is deprecated",  # Lightning on recent torch
    r"The specified dataset source can be interpreted in multiple ways",  # MLflow, for every local dataset
)


class _DropContaining(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


class _OncePerProcess(logging.Filter):
    """Lightning's device lines ("GPU available: False, used: False") once, not once per job."""

    TEXTS = ("GPU available:", "TPU available:", "HPU available:")

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if not message.startswith(self.TEXTS):
            return True
        first = message not in self.seen
        self.seen.add(message)
        return first


DEVICE_LINES = _OncePerProcess()


def quiet() -> None:
    """Idempotent; call again after importing Lightning (it adds its own console handler then)."""
    for name, text in DROPPED_LOG_LINES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropContaining) and f.text == text for f in logger.filters):
            logger.addFilter(_DropContaining(text))
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        if DEVICE_LINES not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(DEVICE_LINES)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for pattern in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # Lightning prints through its own stderr handler and, via the root logger, again through
    # Hydra's: keep Hydra's (it also writes run.log)
    if "lightning" in sys.modules and logging.getLogger().handlers:
        lightning = logging.getLogger("lightning")
        for handler in list(lightning.handlers):
            if type(handler) is logging.StreamHandler:
                lightning.removeHandler(handler)


def to_log_files(renderable, width: int = 120) -> None:
    """Write a rich renderable (plain text) into the file handlers of the root logger, i.e. the
    job's run.log, without printing it to the console again."""
    from rich.console import Console

    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(renderable)
    record = logging.LogRecord("cbir", logging.INFO, __file__, 0, "\n" + buffer.getvalue().rstrip(), None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
