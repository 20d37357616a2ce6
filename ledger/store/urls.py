"""What a ``--db`` value names: an SQLite path or a PostgreSQL URL (no database driver
imported here: the configuration checks it before anything connects)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

URL_SCHEMES = ("postgresql", "postgres")


def is_pg_url(value: str) -> bool:
    return value.split(":", 1)[0].lower() in URL_SCHEMES and "://" in value


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (logs, ``config show``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))
