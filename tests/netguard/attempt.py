"""A test that swallows a refused connection, as a download pre-check would: the guard must
still fail it (run by tests/test_netguard.py, never collected on its own)."""
import socket


def test_swallows_a_connection_attempt():
  try:
    socket.create_connection(('192.0.2.1', 80), timeout=1).close()
  except OSError:
    pass
