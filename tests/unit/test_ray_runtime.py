"""Joining a named Ray cluster: an address nothing answers at fails in seconds, with one clear line."""

import socket

import pytest

from raymoe.config import ConfigError
from raymoe.ray_runtime import RayUnreachableError, check_reachable, init_ray, ray_target


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_closed_port_fails_before_ray_init_naming_the_address(monkeypatch):
    # Prepare: an address nothing answers at; this process may hold another test's Ray, so
    # init_ray must see none, and ray.init (which would retry for minutes) must not be reached.
    import ray

    port = closed_port()
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    init_calls = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: init_calls.append((a, k)))
    # Execute
    with pytest.raises(RayUnreachableError) as info:
        init_ray()
    # Assert: a ConfigError (pipelines print it as one line, exit 2), raised before ray.init
    assert init_calls == []
    assert isinstance(info.value, ConfigError)
    assert str(info.value) == (
        f"RAY_ADDRESS='127.0.0.1:{port}': no Ray cluster answers there "
        "(connection refused); unset RAY_ADDRESS to start a local one"
    )


def test_a_listening_port_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
        check_reachable(f"ray://127.0.0.1:{port}")


@pytest.mark.parametrize(
    "address, target",
    [
        ("10.0.0.5:6379", ("10.0.0.5", 6379)),
        ("ray://head.svc:10001", ("head.svc", 10001)),
        ("[::1]:6379", ("::1", 6379)),
        ("local", None),
    ],
)
def test_the_target_is_the_gcs_or_the_client_port(address, target):
    assert ray_target(address) == target


@pytest.mark.parametrize(
    "address, match",
    [
        ("http://127.0.0.1:8265", "dashboard / job API address"),
        ("10.0.0.5", "expected host:port"),
        ("ray://head.svc", "expected host:port"),
    ],
)
def test_addresses_ray_init_cannot_join_are_config_errors(address, match):
    with pytest.raises(RayUnreachableError, match=match):
        check_reachable(address)


def test_auto_with_no_cluster_recorded_says_so(monkeypatch):
    import ray._private.services as services

    # No `ray start` recorded and no GCS process found (stand-in for Ray's lookup).
    def nothing(addr, temp_dir=None):
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", nothing)
    with pytest.raises(RayUnreachableError, match="RAY_ADDRESS='auto': no Ray cluster is recorded"):
        check_reachable("auto")


def test_auto_checks_the_address_ray_would_use(monkeypatch):
    import ray._private.services as services

    port = closed_port()
    monkeypatch.setattr(services, "canonicalize_bootstrap_address", lambda addr, temp_dir=None: f"127.0.0.1:{port}")
    with pytest.raises(RayUnreachableError, match=rf"'auto' \(127.0.0.1:{port}\): no Ray cluster answers there"):
        check_reachable("auto")
