"""The network guard of the test suite (tests/netguard/sitecustomize.py, tests/conftest.py):
no connection and no name lookup may leave the machine, in this process or in one the tests
start, and a test that tries fails even where the code under test catches the error."""
import os
import socket

import pytest

import netguard
from helpers import run_script

PUBLIC = ('192.0.2.1', 80)  # TEST-NET-1: documentation-only, never routed


def test_a_public_address_or_name_is_refused_here_and_logged(tmp_path, monkeypatch):
  log = tmp_path / 'log'
  monkeypatch.setenv(netguard.LOG, str(log))  # this test's attempts go to its own file
  with pytest.raises(netguard.NetworkBlocked, match='192.0.2.1:80'):
    socket.create_connection(PUBLIC, timeout=1)
  with pytest.raises(netguard.NetworkBlocked, match='www.cs.toronto.edu'):
    socket.getaddrinfo('www.cs.toronto.edu', 443)
  with socket.socket(socket.AF_INET6) as s, pytest.raises(netguard.NetworkBlocked):
    s.connect(('2001:db8::1', 80, 0, 0))
  assert log.read_text().count('\n') == 3


@pytest.mark.slow
def test_a_started_python_is_guarded_too(tmp_path, monkeypatch):
  log = tmp_path / 'log'
  monkeypatch.setenv(netguard.LOG, str(log))
  code = f'import socket; socket.create_connection({PUBLIC!r}, timeout=1)'
  out = run_script('-c', [code])
  assert out.returncode == 1 and 'NetworkBlocked' in out.stderr, out.stderr[-2000:]
  assert '192.0.2.1:80' in log.read_text()


def test_loopback_passes(silent_server):
  port = int(silent_server.split(':')[-1].split('/')[0])
  for host in ('127.0.0.1', 'localhost'):
    socket.create_connection((host, port), timeout=5).close()
  assert netguard.is_local('::1') and netguard.is_local(socket.gethostname())
  assert not netguard.is_local('example.com') and not netguard.is_local('10.0.0.1')


@pytest.mark.slow
def test_a_test_that_swallows_the_refusal_still_fails():
  out = run_script('-m', ['pytest', '-q', '-p', 'no:cacheprovider',
                          os.path.join('tests', 'netguard', 'attempt.py')])
  assert out.returncode == 1, out.stdout[-2000:]
  assert 'the test tried to reach the network' in out.stdout and '192.0.2.1:80' in out.stdout
