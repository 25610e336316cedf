"""A socket guard for the offline tests: every connection attempt is recorded and refused."""

import socket


def refuse_network(monkeypatch) -> list:
    """Make socket connections fail for the rest of the test; returns the list the attempts are appended to."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts
