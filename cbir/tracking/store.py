"""Where MLflow runs are stored: checked before any work, created without races.

`tracking.uri` comes from the command line, else `$MLFLOW_TRACKING_URI`, else a SQLite file in
`tracking.dir` (`$CBIR_MLRUNS_DIR`, or `mlruns` in the directory cbir is launched from); a relative
SQLite path is made absolute at start and printed. What must not happen twice at once against one
store (creating the SQLite schema, the experiment, a sweep's parent run, a job's run) happens under
one file lock: beside the SQLite file, or in the shared cache folder for a server or database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from filelock import FileLock

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
DATABASE_SCHEMES = ("mysql", "mariadb", "postgresql", "postgres", "mssql")
# the pip package that provides a missing database driver module
DRIVER_PACKAGES = {
    "MySQLdb": "mysqlclient",
    "pymysql": "pymysql",
    "psycopg": "psycopg[binary]",
    "psycopg2": "psycopg2-binary",
    "pyodbc": "pyodbc",
}


class TrackingUnavailable(RuntimeError):
    """The tracking server stopped answering, or the SQLite store stayed locked, while a job ran."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a SQLite URI (absolute, against the current directory), else None."""
    if not uri.startswith(SQLITE):
        return None
    path = Path(uri[len(SQLITE) :].split("?", 1)[0])
    return path if path.is_absolute() else Path.cwd() / path


def resolve_uri(uri: str) -> str:
    """A relative SQLite URI made absolute; any other URI unchanged."""
    path = sqlite_path(uri)
    if path is None:
        return uri
    query = uri.split("?", 1)[1] if "?" in uri else None
    return SQLITE + str(path) + (f"?{query}" if query else "")


def artifact_root(uri: str, configured: str | None = None) -> str | None:
    """Where the artifacts of a SQLite store go: `tracking.artifact_root` when set, else
    `artifacts/` beside the database file, whichever setting named it (tracking.dir, tracking.uri,
    $MLFLOW_TRACKING_URI). None for a server or database, which keeps its own."""
    if configured:
        return str(Path(configured).absolute())
    path = sqlite_path(uri)
    return None if path is None else str(path.parent / "artifacts")


def shown(uri: str) -> str:
    """The URI as it may appear in a message: without a password."""
    parsed = urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@", 1)
    return uri


# ------------------------------------------------------------------------------ checks
def check_uri(uri: str, artifact_root: str | None = None) -> None:
    """Raise ConfigError (one line, with the fix) when a store cannot work; cheap, before any work."""
    scheme = urlparse(uri).scheme.lower()
    if uri.startswith(SQLITE):
        _check_sqlite(uri, artifact_root)
    elif scheme in ("http", "https"):
        _check_server(uri)
    elif scheme.split("+")[0] in DATABASE_SCHEMES:
        _check_driver(uri)
    elif scheme == "file" or (scheme == "" and not uri.startswith("databricks")):
        raise _error(
            uri,
            "a plain folder store, which MLflow 3 no longer writes to; use a SQLite file, "
            "e.g. tracking.uri=sqlite:///mlruns/mlflow.db, or an MLflow server",
        )


def _error(uri: str, problem: str):
    from cbir.common.errors import ConfigError

    return ConfigError(f"tracking.uri={shown(uri)}: {problem}")


def _check_sqlite(uri: str, artifact_root: str | None) -> None:
    path = sqlite_path(uri)
    if path.is_dir():
        raise _error(uri, f"{path} is a folder; name the database file inside it, e.g. sqlite:///{path}/mlflow.db")
    folders = [("the database folder", path.parent)]
    if artifact_root:
        folders.append(("tracking.artifact_root", Path(artifact_root).absolute()))
    for what, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise _error(
                uri,
                f"cannot create {what} {folder} ({e.strerror}); choose a writable place "
                "(tracking.dir=... or $CBIR_MLRUNS_DIR)",
            ) from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise _error(
                uri, f"{what} {folder} is not writable; choose a writable place (tracking.dir=... or $CBIR_MLRUNS_DIR)"
            )
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise _error(uri, f"{path} is not writable by this user")
        with path.open("rb") as f:
            header = f.read(16)
        if header and header != b"SQLite format 3\x00":
            raise _error(uri, f"{path} is not a SQLite database; name a new or existing MLflow database file")
        if header and not _can_write(path):
            raise _error(
                uri,
                f"{path} {LOCKED}, and it is still held after {LOCK_WAIT_SECONDS} s; close it (or let it "
                "finish) and run the same command again, or use another store (tracking.dir=...)",
            )


LOCKED = "is locked by another process (a write transaction kept open, e.g. by a sqlite3 shell or a database browser)"
LOCK_WAIT_SECONDS = 10  # MLflow's own writes hold the lock for milliseconds


def _can_write(path: Path) -> bool:
    """Whether a write transaction can start on the SQLite file within LOCK_WAIT_SECONDS."""
    import sqlite3

    connection = sqlite3.connect(path, timeout=LOCK_WAIT_SECONDS, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            return False
        raise _error(f"{SQLITE}{path}", f"{path} cannot be opened as a SQLite database ({e})") from None
    finally:
        connection.close()


def _check_server(uri: str) -> None:
    """A server that does not answer fails now, not after an hour of extraction (MLflow's own
    client would retry for minutes)."""
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).close()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _error(
            uri,
            f"MLflow server not reachable ({reason}); start it, fix the URI, "
            "or leave tracking.uri unset for the local SQLite store",
        ) from None


def _check_driver(uri: str) -> None:
    from sqlalchemy.engine import make_url

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as e:
        package = DRIVER_PACKAGES.get((e.name or "").split(".")[0], e.name)
        raise _error(
            uri,
            f"the database driver is not installed (no module {e.name!r}); "
            f"pip install {package}, or use an MLflow server (http://host:5000)",
        ) from None
    except Exception as e:  # a malformed URI or an unknown dialect
        raise _error(uri, f"not a usable database URI ({type(e).__name__}: {e})") from None


# ------------------------------------------------------------------------------ lock, experiment
_locks: dict[str, FileLock] = {}


def store_lock(uri: str, lock_dir: str | os.PathLike | None = None) -> FileLock:
    """One lock per store (re-entrant within a process). SQLite: `<db>.lock` beside the file;
    otherwise in `lock_dir` (the shared cache folder, so jobs on other nodes see it too)."""
    path = sqlite_path(uri)
    if path is not None:
        lock_file = path.with_name(path.name + ".lock")
    else:
        folder = Path(lock_dir) / "locks" if lock_dir else Path(tempfile.gettempdir())
        lock_file = folder / f"cbir-tracking-{hashlib.sha256(uri.encode()).hexdigest()[:12]}.lock"
    key = str(lock_file.absolute())
    if key not in _locks:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        _locks[key] = FileLock(key)
    return _locks[key]


def experiment_id(client, name: str, artifact_root: str | None, uri: str) -> str:
    """The experiment's id, created if absent. Call under store_lock: the first call on a new
    SQLite file also creates its schema, which parallel processes must not do at once."""
    existing = client.get_experiment_by_name(name)
    if existing is not None:
        if existing.lifecycle_stage == "deleted":
            from cbir.common.errors import ConfigError

            raise ConfigError(
                f"tracking.experiment={name}: deleted in MLflow; restore it "
                f"(mlflow experiments restore --experiment-id {existing.experiment_id}) or choose another name"
            )
        wanted = Path(artifact_root).resolve().as_uri() if artifact_root and uri.startswith(SQLITE) else None
        if wanted and existing.artifact_location != wanted:
            log.info(
                "experiment %s keeps its artifacts in %s (set when it was created)", name, existing.artifact_location
            )
        return existing.experiment_id
    location = None
    if artifact_root and uri.startswith(SQLITE):
        location = Path(artifact_root).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)
