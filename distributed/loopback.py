"""A local Ray instance that listens on loopback only, with a private auth token.

Ray binds its servers (GCS, raylet, core workers, dashboard agent, metrics export,
runtime-env agent) to all interfaces, or to the machine's routable address, unless
its node IP is a loopback address. Passing ``_node_ip_address="127.0.0.1"`` is not
enough: Ray replaces a loopback node IP by the routable one whenever its
``ENABLE_RAY_CLUSTER`` constant is on, which it reads from
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when ``ray`` is first imported (on by
default on Linux). :func:`confine_to_loopback` sets both, whenever ``ray`` was
imported. :func:`private_auth_token` creates Ray's token file (``~/.ray/auth_token``)
readable by its owner only before Ray would create it world-readable, and narrows an
existing one.

One listener stays on all interfaces during training, outside Ray: PyTorch's
rendezvous store (``TCPStore``), which Ray Train's process-group set-up starts on
rank 0 and which PyTorch binds to ``::`` whatever host it is given.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

LOOPBACK = "127.0.0.1"
_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def confine_to_loopback() -> None:
    """Make the next local ``ray.init(_node_ip_address="127.0.0.1")`` keep that address
    (call it before starting Ray; joining an existing cluster is not affected)."""
    os.environ[_CLUSTER_ENV] = "0"
    import ray._private.ray_constants as constants  # no public option: the constant itself

    constants.ENABLE_RAY_CLUSTER = False  # read at import: ray may have been imported already


def private_auth_token() -> Path | None:
    """Ray's default token file, created (or narrowed) to mode 0600 in a 0700 folder;
    None when the token comes from ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` (the
    user's to protect) or token authentication is off."""
    import secrets

    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what Ray itself would generate: 256 random bits
    return path


def node_ip() -> str | None:
    """The node IP of this process's running local Ray node (None if none)."""
    import ray._private.worker  # no public API says which address the node took

    node = getattr(ray._private.worker, "_global_node", None)
    return getattr(node, "node_ip_address", None)


__all__ = ["LOOPBACK", "confine_to_loopback", "node_ip", "private_auth_token"]
