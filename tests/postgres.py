"""A throwaway PostgreSQL server for the tests, started from the binaries of Debian's `postgresql` package.

PostgreSQL refuses to run as root (and CI runs as root): the server then runs as the unprivileged
`postgres` system user the package creates (or `nobody`), in a folder of its own under /tmp, on a
free TCP port of 127.0.0.1 with trust authentication, and is stopped and removed afterwards.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path


def server_binaries() -> Path | None:
    """The folder holding initdb and pg_ctl: the newest /usr/lib/postgresql/*/bin, else the PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(Path(path).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb and shutil.which("pg_ctl") else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _as_user(user: str | None) -> list[str]:
    """The prefix that runs a command as `user` (nothing when this process is not root)."""
    if user is None:
        return []
    return ["runuser", "-u", user, "--"] if shutil.which("runuser") else ["su", user, "-s", "/bin/sh", "-c"]


def _server_user() -> str | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("no unprivileged user (postgres or nobody) to run the PostgreSQL server as")


@contextlib.contextmanager
def postgres_server(binaries: Path) -> Iterator[str]:
    """A running server with an empty database `heretic`; yields its URL."""
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="heretic-pg-"))
    os.chmod(root, 0o755)
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    data, port, prefix = root / "data", free_port(), _as_user(user)

    def run(*command: str) -> None:
        result = subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120, cwd=root)
        if result.returncode != 0:
            log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
            raise RuntimeError(f"{command[0]} failed: {result.stdout}{result.stderr}{log}")

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-A", "trust", "-U", "heretic", "-E", "UTF8", "--no-sync")
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        run(str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start")
        try:
            run(str(binaries / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "heretic", "heretic")
            yield f"postgresql://heretic@127.0.0.1:{port}/heretic"
        finally:
            subprocess.run(
                [*prefix, str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
                cwd=root,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)
