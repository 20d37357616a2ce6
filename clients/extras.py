"""Which extra brings which optional part of quota-ledger, and one clear line when it is missing.

One distribution, several extras (issue 17; why: docs/decisions.md). ``pip install
quota-ledger`` is the client alone: the typed clients, the spool, the coalescer and
``ledgerctl``'s verbs. A command that needs more says which extra to install, in one line,
instead of a traceback:

    quota-ledger: `quota-ledger serve` needs the server extra (numpy is not installed):
    pip install 'quota-ledger[server]'
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable

# top-level module -> the extra that installs it (pyproject.toml [project.optional-dependencies])
EXTRA_FOR_MODULE = {
    "grpc_reflection": "server",
    "prometheus_client": "server",
    "msgpack": "server",
    "numpy": "server",
    "psycopg": "postgres",
    "psycopg_pool": "postgres",
    "starlette": "console",
    "uvicorn": "console",
    "jinja2": "console",
    "pygal": "console",
    "hdrh": "loadgen",
    "matplotlib": "plot",
}
EXIT_MISSING_EXTRA = 2


def install_hint(extra: str) -> str:
    return f"pip install 'quota-ledger[{extra}]'"


def missing_extra_line(prog: str, exc: ModuleNotFoundError) -> str | None:
    """The one line for a module that an extra would have installed, or None when the missing
    module is not an extra's (a real defect, which should keep its traceback)."""
    module = (exc.name or "").split(".")[0]
    extra = EXTRA_FOR_MODULE.get(module)
    if extra is None:
        return None
    command = " ".join([prog, *[a for a in sys.argv[1:2] if not a.startswith("-")]])
    return (f"{prog}: `{command}` needs the {extra} extra ({module} is not installed): "
            f"{install_hint(extra)}")


def require(extra: str, *modules: str) -> str | None:
    """None when every module is importable, else the install hint for ``extra``."""
    if all(importlib.util.find_spec(m) is not None for m in modules):
        return None
    return install_hint(extra)


def run_guarded(prog: str, load: Callable[[], Callable[..., object]]) -> None:
    """Import a command line (``load``) and run it; a module that an extra installs, missing
    at import or at run time, ends the process with one line naming the extra."""
    try:
        main = load()
        main(prog_name=prog)
    except ModuleNotFoundError as exc:
        line = missing_extra_line(prog, exc)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(EXIT_MISSING_EXTRA)
