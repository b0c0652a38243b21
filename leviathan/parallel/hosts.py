"""Reachability checks that turn a cluster typo into one clear line, not a hang."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from leviathan.errors import ConfigError

SSH_PORT = 22


def read_hostfile(path: Path) -> dict[str, int]:
    """`host slots=N` lines (DeepSpeed's format; `#` comments) -> {host: slots}."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"hostfile {path}: cannot read it ({err.strerror})") from None
    hosts: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, _, slots = line.partition(" ")
        slots = slots.strip()
        if not slots.startswith("slots=") or not slots[6:].isdigit() or int(slots[6:]) < 1:
            raise ConfigError(
                f"hostfile {path}:{number}: expected `HOST slots=N` with N >= 1, got {line!r}"
            )
        hosts[host] = int(slots[6:])
    if not hosts:
        raise ConfigError(f"hostfile {path}: names no hosts")
    return hosts


def check_hostfile(path: Path, timeout_s: float = 5.0) -> dict[str, int]:
    """Every host resolves and answers on the ssh port the launcher will use."""
    hosts = read_hostfile(path)
    for host in hosts:
        check_reachable(host, SSH_PORT, f"hostfile {path}: host {host!r}", timeout_s)
    return hosts


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """A Ray dashboard / job address (`http://HEAD:8265`) or GCS address (`HEAD:6379`)."""
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname or not parsed.port:
        raise ConfigError(f"Ray address {address!r}: expected http://HOST:PORT or HOST:PORT")
    check_reachable(parsed.hostname, parsed.port, f"Ray address {address!r}", timeout_s)


def check_reachable(host: str, port: int, what: str, timeout_s: float) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except socket.gaierror:
        raise ConfigError(f"{what}: the name does not resolve") from None
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else err.strerror or str(err)
        raise ConfigError(f"{what}: cannot connect to port {port} ({reason})") from None
