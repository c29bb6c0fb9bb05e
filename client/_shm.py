"""The client's side of same-host shared memory (``GradientClient(target, shared_memory=True)``); no I/O of gRPC here.

States: ``"pending"`` until the first call's :class:`SharedMemory` probe (the
SharedMemoryProbe RPC) proves a shared host, /dev/shm and user; then
``"shared_memory"``, or ``"network"`` for good when the probe is refused (another host
or container, a server with ``--no-shared-memory`` or older than the RPC, another user).
A probe that fails for a transient reason (server not up yet) is tried again on the next
call; calls meanwhile use the network.

Who unlinks what: the client unlinks the segment of each request when the call ends,
however it ends (the server has normally unlinked it already, when it mapped it), and
each reply segment as soon as it has mapped it. A client killed mid-call leaves its
request segment only if the server had not mapped it yet; the server's periodic sweep
(or any gradserve process starting) removes it, its creator pid being dead.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
from typing import TYPE_CHECKING, Any

import grpc

from gradserve.v1 import codec, shm
from gradserve.v1 import gradserve_pb2 as pb

if TYPE_CHECKING:
    from ._core import Plan
    from ._errors import GradServeError

__all__ = ["DEFAULT_THRESHOLD_BYTES", "SharedMemory"]

log = logging.getLogger("gradserve.client")

DEFAULT_THRESHOLD_BYTES = 256 * 1024
"""Tensors of at least this many bytes travel through shared memory; smaller ones inline. A segment costs a fixed
few syscalls and mappings per call: measured here (benchmarks/shared_memory.py), shared memory lost below 128 KiB and
won from 256 KiB on."""

_FALL_BACK_REASONS = frozenset({"SHARED_MEMORY_UNAVAILABLE", "SHARED_MEMORY_DISABLED"})
_TRANSIENT = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})


class SharedMemory:
    """Whether and how one client uses shared memory.

    Parameters
    ----------
    threshold_bytes
        Tensors of at least this many bytes go through a segment, both ways.
    """

    def __init__(self, threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> None:
        if threshold_bytes < 1:
            raise ValueError(f"shared_memory_threshold_bytes must be at least 1, got {threshold_bytes}")
        self.threshold_bytes = threshold_bytes
        self.state = "pending"
        self._token = ""  # the server's session token (hex), read from its probe segment
        if not shm.available():
            self._use_network("this host has no writable /dev/shm")
        else:
            shm.sweep()  # what dead gradserve processes of this user left

    @property
    def active(self) -> bool:
        return self.state == "shared_memory"

    def _use_network(self, why: str) -> None:
        self.state = "network"
        log.debug("shared memory off, tensors travel over the network: %s", why)

    # -- probe ---------------------------------------------------------------------------

    def probe_request(self) -> tuple[pb.SharedMemoryProbeRequest, str, bytes] | None:
        """The probe's request, the segment it names (unlink it when the call ends) and the nonce in it."""
        nonce = secrets.token_bytes(32)
        try:
            name, _ = shm.create_segment([nonce])
        except OSError as exc:
            self._use_network(f"cannot create a segment: {exc}")
            return None
        return pb.SharedMemoryProbeRequest(name=name), name, nonce

    def probe_reply(self, response: pb.SharedMemoryProbeResponse, nonce: bytes) -> None:
        """Check both directions of the probe; the server's segment (our session token) is read and unlinked."""
        if response.nonce != shm.probe_digest(nonce):
            self._use_network("the server read another nonce: it does not share this host's /dev/shm")
            return
        try:
            token = shm.read_probe(response.segment.name)  # a file of our own user only
        except shm.SharedMemoryError as exc:
            self._use_network(f"cannot read the server's probe segment: {exc}")
            return
        self._token = token.hex()
        self.state = "shared_memory"
        log.debug("shared memory on: tensors of %d bytes or more travel through /dev/shm", self.threshold_bytes)

    def probe_failed(self, error: GradServeError) -> None:
        """A refused probe means the network for good; a transient failure, another probe next call."""
        if error.code in _TRANSIENT:
            log.debug("shared-memory probe failed (%s); trying again on the next call", error.code.name)
        else:
            self._use_network(f"the server refused the probe: {error.code.name} {error.message}")

    # -- calls ---------------------------------------------------------------------------

    def wants(self, groups: Any) -> bool:
        """Whether some tensor of ``groups`` is large enough for a segment (the plan is then built in streamed form).

        Also before the probe: a call's plan is built before its probe runs, and the
        streamed form is sent as it is when the probe fails."""
        return self.state != "network" and any(codec.nbytes(t) >= self.threshold_bytes for group in groups for t in group)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The keys that ask for replies through shared memory and carry the session token, while on."""
        return ((shm.REPLY_KEY, str(self.threshold_bytes)), (shm.TOKEN_KEY, self._token)) if self.active else ()

    def prepare(self, plan: Plan) -> Plan:
        """``plan`` with its large tensors in a new segment (keeping the network plan to fall back to)."""
        if not self.active:
            return plan
        if plan.payloads is None or not any(p.numel() >= self.threshold_bytes for p in plan.payloads):
            return dataclasses.replace(plan, shared_memory=True)
        request = type(plan.request)()
        request.CopyFrom(plan.request)
        try:
            segment = shm.place(request, plan.payloads, self.threshold_bytes)
        except OSError as exc:
            log.debug("cannot write a shared-memory segment (%s); this call uses the network", exc)
            return plan
        return dataclasses.replace(plan, request=request, payloads=None, shared_memory=True, segment=segment, network=plan)

    def fall_back(self, plan: Plan, error: GradServeError) -> Plan:
        """The same call over the network after a refusal that says nothing ran (reasons SHARED_MEMORY_DISABLED:
        the network from now on; SHARED_MEMORY_UNAVAILABLE: a segment not found or a token not known, so probe
        again before the next call). Re-raises ``error`` otherwise."""
        if not plan.shared_memory or error.reason not in _FALL_BACK_REASONS:
            raise error
        done(plan)
        if error.reason == "SHARED_MEMORY_DISABLED":
            self._use_network(f"the server refused shared memory: {error.message}")
        else:
            self.state = "pending"
            log.debug("shared memory refused (%s); this call goes over the network, the next one probes again", error.message)
        return plan.network or dataclasses.replace(plan, shared_memory=False)


def done(plan: Plan) -> None:
    """Unlink the segment a call created, once it ended (the server normally did already)."""
    if plan.segment is not None:
        shm.unlink(plan.segment)
