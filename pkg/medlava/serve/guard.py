"""What waitress lacks against a client that holds connections without finishing its requests (slowloris): a
deadline for each request's headers, and a cap on one client's connections. waitress closes a connection only
after --timeout seconds without a byte, and stops accepting at 100 open connections, so 100 sockets that send
half a header (a byte now and then) would keep the page down for everyone.

A connection over the cap closes that client's oldest connection that is not sending or awaiting an answer
(half-sent headers, or idle between requests) rather than being refused: behind `ssh -L`, and on this machine,
every client has the same address, so refusing would lock the person out along with the attacker."""

from __future__ import annotations

import time
from typing import Any

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer

HEADER_TIMEOUT_S = 10.0
"""Default seconds from a request's first byte to its last header line: a browser sends them in one packet."""
CONNECTIONS_PER_CLIENT = 16
"""Default open connections per client address: a browser opens at most 6 to one host."""


class _TimedParser(HTTPRequestParser):
    def __init__(self, adj: Any):
        super().__init__(adj)
        self.started = time.monotonic()  # the parser is made when a request's first byte arrives


class GuardedChannel(HTTPChannel):
    parser_class = _TimedParser
    header_timeout = HEADER_TIMEOUT_S
    per_client = CONNECTIONS_PER_CLIENT

    def __init__(self, server: BaseWSGIServer, sock: Any, addr: Any, adj: Any, map: dict | None = None):
        super().__init__(server, sock, addr, adj, map)
        mine = [
            c
            for c in list(server.active_channels.values())
            if c is not self and c.addr[0] == addr[0] and not c.will_close
        ]  # will_close: closed at the next pass
        if len(mine) >= self.per_client:
            spare = [c for c in mine if c.spare()]
            victim = min(spare, key=lambda c: c.creation_time) if spare else self
            victim.will_close = True  # the event loop closes it at its next pass
            self.logger.warning(
                "client %s holds %d connections (--max-client-connections): closing %s",
                addr[0],
                len(mine),
                "its oldest spare one" if spare else "the new one",
            )

    def spare(self) -> bool:
        """Neither answering a request nor receiving one whose headers are complete."""
        return not self.requests and (self.request is None or not self.request.headers_finished)

    def readable(self) -> bool:
        # Called by the event loop at every pass (at least once a second), so the deadline is checked here.
        request = self.request
        if (
            request is not None
            and not request.headers_finished
            and time.monotonic() - request.started > self.header_timeout
        ):
            self.logger.warning(
                "closing a connection from %s: no complete headers after %g s (--header-timeout)",
                self.addr[0],
                self.header_timeout,
            )
            self.will_close = True  # writable() now says so, and the loop closes the socket
        return super().readable()


def guard(server: Any, header_timeout: float = HEADER_TIMEOUT_S, per_client: int = CONNECTIONS_PER_CLIENT) -> None:
    """Make every listening socket of a waitress `server` (one, or a MultiSocketServer's) use GuardedChannel."""
    channel = type("Channel", (GuardedChannel,), {"header_timeout": header_timeout, "per_client": per_client})
    listeners = (
        [server]
        if isinstance(server, BaseWSGIServer)
        else [s for s in server.map.values() if isinstance(s, BaseWSGIServer)]
    )
    for listener in listeners:
        listener.channel_class = channel
