"""``--host unix:/path``: a server on a unix socket only its user may connect to, and clients of ``unix:`` targets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat

import pytest
import torch

from gradserve.client import AsyncGradientClient, GradientClient
from gradserve.server import ServerConfig, create_server, registry
from gradserve.server._cli import main


def test_unix_socket_target_gives_the_right_gradient_and_the_socket_is_private(tmp_path, capsys) -> None:
    path = tmp_path / "run" / "gradserve.sock"  # "run" does not exist yet: made with mode 0700
    running = create_server(ServerConfig(host=f"unix:{path}", device="cpu", max_workers=2), registry)
    try:
        assert running.address == f"unix:{path}"
        assert stat.S_ISSOCK(path.stat().st_mode)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        x = torch.tensor([1.5, -2.0], requires_grad=True)
        with GradientClient(f"unix:{path}", timeout=30, connections=2) as client:
            result = client.forward_backward("cube_plus_square", x, torch.tensor(3.0, requires_grad=True))
            y = client.function("square")(x)
            y.sum().backward()
        torch.testing.assert_close(result.grads[0], 3 * x.detach() ** 2)
        torch.testing.assert_close(result.grads[1], torch.tensor(12.0))  # 2y, summed over the 2 broadcast elements
        torch.testing.assert_close(x.grad, 2 * x.detach())

        async def call_async() -> torch.Tensor:
            async with AsyncGradientClient(f"unix://{path}", timeout=30) as client:
                return (await client.forward_backward("square", x)).grads[0]

        torch.testing.assert_close(asyncio.run(call_async()), 2 * x.detach())
        assert main(["health", "--target", f"unix:{path}", "--timeout-s", "10"]) == 0
        assert "SERVING" in capsys.readouterr().out
        with pytest.raises(ValueError, match="already listening"):
            create_server(ServerConfig(host=f"unix:{path}", device="cpu"), registry)
        assert path.exists()  # the refused server left the live one's socket alone
    finally:
        running.stop(0)
    assert not path.exists()


def test_a_stale_socket_file_is_replaced(tmp_path) -> None:
    path = tmp_path / "g.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening: what a killed server leaves
        dead.bind(str(path))
    running = create_server(ServerConfig(host=f"unix:{path}", device="cpu", max_workers=2), registry)
    try:
        with GradientClient(f"unix:{path}", timeout=30) as client:
            assert client.forward("square", torch.tensor(3.0)).item() == 9.0
    finally:
        running.stop(0)
    assert not path.exists()


def test_unix_host_needs_a_path() -> None:
    with pytest.raises(ValueError, match="expected unix:/path/to/socket"):
        ServerConfig(host="unix:")
    assert os.fspath(ServerConfig(host="unix:///run/g.sock").unix_socket) == "/run/g.sock"


def test_tls_and_tokens_over_a_unix_socket(tmp_path) -> None:
    import trustme

    from gradserve.client import UnauthenticatedError

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")  # the authority gRPC gives a unix: target
    cert.private_key_pem.write_to_path(tmp_path / "server.key")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "server.pem")
    path = tmp_path / "g.sock"
    config = ServerConfig(
        host=f"unix:{path}",
        device="cpu",
        max_workers=2,
        tls_cert_file=str(tmp_path / "server.pem"),
        tls_key_file=str(tmp_path / "server.key"),
        auth_tokens="t1",
    )
    running = create_server(config, registry)
    try:
        x = torch.tensor([2.0], requires_grad=True)
        with GradientClient(f"unix:{path}", timeout=30, root_certificates=ca.cert_pem.bytes(), token="t1") as client:
            torch.testing.assert_close(client.forward_backward("square", x).grads[0], torch.tensor([4.0]))
        with GradientClient(f"unix:{path}", timeout=30, root_certificates=ca.cert_pem.bytes()) as client:
            with pytest.raises(UnauthenticatedError):
                client.forward("square", x)
    finally:
        running.stop(0)


def test_a_path_too_long_for_a_unix_socket_is_refused_with_its_limit(tmp_path) -> None:
    path = tmp_path / ("a" * 120)
    with pytest.raises(ValueError, match=r"unix socket paths hold at most 107 bytes"):
        ServerConfig(host=f"unix:{path}")


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_a_path_that_is_not_a_socket_is_left_alone_and_named(tmp_path, kind: str) -> None:
    path, data = tmp_path / "g.sock", tmp_path / "data.txt"
    data.write_text("precious")
    if kind == "file":
        path.write_text("precious")
    else:
        path.symlink_to(data)
    with pytest.raises(ValueError, match="exists and is not a socket"):
        create_server(ServerConfig(host=f"unix:{path}", device="cpu"), registry)
    assert path.read_text() == "precious" and data.read_text() == "precious"
    assert path.is_symlink() == (kind == "symlink")
