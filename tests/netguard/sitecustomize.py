"""The tests' network guard: no connection and no name lookup may leave this machine.

Python imports `sitecustomize` at start-up from the first folder on its path that has one:
tests/conftest.py puts this folder first on PYTHONPATH, so every Python the tests start
(scripts, tools, pytest-xdist workers) loads it, and conftest.py loads it into the test
process itself. It wraps socket.socket.connect / connect_ex and socket.getaddrinfo: an
address or a name that is not loopback (127.0.0.0/8, ::1, 'localhost', this machine's own
host name) or a Unix socket is refused with NetworkBlocked, before anything is sent, and
the attempt is appended to the file named by $NETGUARD_LOG. The autouse fixture in
conftest.py points $NETGUARD_LOG at a file of its own for every test and fails the test
if anything was written there, so a test that tries to reach the network fails even where
the code under test catches the error (a download pre-check, say).
"""
import ipaddress
import os
import socket

LOG = 'NETGUARD_LOG'


class NetworkBlocked(ConnectionRefusedError):
  """A connection or lookup that would have left the machine."""


def is_local(host):
  """Whether `host` (a name, an address, bytes or None) stays on this machine."""
  if isinstance(host, bytes):
    host = host.decode(errors='replace')
  if host in (None, '', 'localhost', 'localhost.localdomain', 'ip6-localhost'):
    return True
  host = host.strip('[]').split('%')[0]
  if host in (socket.gethostname(), socket.gethostname().split('.')[0]):
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return host.endswith('.localhost')


def refuse(what):
  path = os.environ.get(LOG)
  if path:
    with open(path, 'a') as f:
      f.write(f'pid {os.getpid()}: {what}\n')
  raise NetworkBlocked(f'the tests\' network guard refused {what}')


def install():
  """Wraps the socket functions once (a second call changes nothing)."""
  if getattr(socket, 'netguard_installed', False):
    return
  connect, connect_ex, getaddrinfo = (socket.socket.connect, socket.socket.connect_ex,
                                      socket.getaddrinfo)

  def check(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not is_local(address[0]):
      refuse(f'a connection to {address[0]}:{address[1]}')

  def guarded_connect(self, address):
    check(self, address)
    return connect(self, address)

  def guarded_connect_ex(self, address):
    check(self, address)
    return connect_ex(self, address)

  def guarded_getaddrinfo(host, port=None, *args, **kwargs):
    if not is_local(host):
      refuse(f'a lookup of {host}:{port}')
    return getaddrinfo(host, port, *args, **kwargs)

  socket.socket.connect = guarded_connect
  socket.socket.connect_ex = guarded_connect_ex
  socket.getaddrinfo = guarded_getaddrinfo
  socket.netguard_installed = True


install()
