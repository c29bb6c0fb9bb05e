"""``make compose-test``: build the images and run the integration suite through compose.

Runs on a Debian 12 machine as root with ``podman runc debootstrap docker-compose netavark
aardvark-dns catatonit`` installed (``.ci/run`` installs them). No registry is needed:

1. a base image (``debootstrap --variant=minbase bookworm`` from the mirror apt uses, a
   venv in /opt/venv, ``podman import``) and a wheelhouse (``pip download`` with
   constraints.txt), both cached under ``GRADSERVE_COMPOSE_CACHE`` (default
   ``~/.cache/gradserve-compose``) and rebuilt only when missing or when their inputs change;
2. the Dockerfile's ``runtime`` and ``test`` stages, built by Podman on that base
   (``BASE_IMAGE``), pip installing from the wheelhouse mounted into the build (``WHEELHOUSE``);
3. ``docker-compose -f docker-compose.cpu.yml --profile test up --exit-code-from tests``
   through ``podman system service`` (docker-compose talks to it as to Docker); Podman runs
   healthchecks from systemd timers, absent here, so this script runs them
   (``podman healthcheck run``) for compose's ``condition: service_healthy``;
4. three server replicas and the whole suite again on ``dns:///server:50051``, which
   checks from each replica's metrics that all three served calls, and a forward and its
   backward on different replicas;
5. ``docker-compose stop`` with a long call in flight: health NOT_SERVING, the call
   completes, the replica exits 0;
6. ``kill -9`` of a replica's server process: the restart policy brings it back, and the
   backward of a forward made there recomputes and gives the right gradient;
7. everything torn down, on failure too: containers, networks, the Podman service.

Podman's settings are deploy/podman/containers.conf (``CONTAINERS_CONF``); its storage,
run state and network definitions live in the cache folder, so nothing under /etc or
/var/lib/containers changes. One run at a time per cache folder (a lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from gradserve.client import GradientClient

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("GRADSERVE_COMPOSE_CACHE") or Path.home() / ".cache" / "gradserve-compose")
CONTAINERS_CONF = ROOT / "deploy" / "podman" / "containers.conf"
COMPOSE_FILE = ROOT / "docker-compose.cpu.yml"
REPLICAS_FILE = ROOT / "tests" / "integration" / "compose.replicas.yml"
PROJECT = "gradserveci"
BASE_IMAGE = "localhost/gradserve-base:bookworm"
IMAGE, TEST_IMAGE = "localhost/gradserve:ci", "localhost/gradserve:ci-test"
SUITE = "bookworm"
REPLICAS = 3
SERVICE = "gradserve.v1.GradientService"
# What the base image holds: bumping this (or changing the list) rebuilds it.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {message}", flush=True)


def step(title: str) -> None:
    print(flush=True)
    log(f"=== {title}")


class Failed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)
    log(f"ok: {message}")


# -- podman ---------------------------------------------------------------------------


RUN_DIR = CACHE / "run"
SOCKET = RUN_DIR / "podman.sock"
PODMAN = [
    "podman",
    "--root", str(CACHE / "storage"),
    "--runroot", str(RUN_DIR / "storage"),
    "--tmpdir", str(RUN_DIR / "libpod"),
    "--network-config-dir", str(RUN_DIR / "networks"),
]  # fmt: skip
ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("GRADSERVE_", "COMPOSE_", "DOCKER_"))},
    "CONTAINERS_CONF": str(CONTAINERS_CONF),
    "DOCKER_HOST": f"unix://{SOCKET}",
    "COMPOSE_PROJECT_NAME": PROJECT,
    "GRADSERVE_CPU_IMAGE": IMAGE,
    "GRADSERVE_CPU_TEST_IMAGE": TEST_IMAGE,
    # Empty: any free loopback port for each replica (Podman takes no host port ranges),
    # so a run never collides with a server already on 50051.
    "GRADSERVE_HOST_GRPC_PORT": "",
    "GRADSERVE_HOST_METRICS_PORT": "",
}


def run(args: Sequence[str], *, timeout: float = 600, check_rc: bool = True) -> str:
    """Run a command, return its stdout; raise Failed (with its output) when it fails."""
    result = subprocess.run(args, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check_rc and result.returncode != 0:
        raise Failed(f"{' '.join(args[:6])} ... exited {result.returncode}:\n{result.stdout}{result.stderr}")
    return result.stdout


def stream(args: Sequence[str], *, prefix: str, timeout: float) -> int:
    """Run a command, printing its output as it comes; returns the exit status."""
    proc = subprocess.Popen(args, env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"{prefix} {line.rstrip()}", flush=True)
        return proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def podman(*args: str, timeout: float = 600, check_rc: bool = True) -> str:
    return run([*PODMAN, *args], timeout=timeout, check_rc=check_rc)


def compose(*args: str, replicas_file: bool = False) -> list[str]:
    files = ["-f", str(COMPOSE_FILE)] + (["-f", str(REPLICAS_FILE)] if replicas_file else [])
    return ["docker-compose", *files, "--profile", "test", *args]


# -- 1. base image and wheelhouse -------------------------------------------------------


def debian_mirror() -> str:
    """The Debian mirror apt uses (deb822 .sources or sources.list), else deb.debian.org."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))]
    for path in sources:
        text = path.read_text() if path.is_file() else ""
        for uri in re.findall(r"^URIs:\s*(\S+)", text, re.M) + re.findall(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    return "http://deb.debian.org/debian"


def base_image() -> None:
    recipe = hashlib.sha256(repr((SUITE, BASE_PACKAGES, BASE_PATH)).encode()).hexdigest()[:12]
    labels = podman("image", "inspect", "--format", "{{json .Labels}}", BASE_IMAGE, check_rc=False).strip()
    if ((json.loads(labels) or {}) if labels else {}).get("gradserve.base-recipe") == recipe:
        log(f"base image {BASE_IMAGE}: cached (recipe {recipe})")
        return
    mirror = debian_mirror()
    log(f"base image {BASE_IMAGE}: debootstrap --variant=minbase {SUITE} from {mirror} ...")
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rootfs-", dir=CACHE) as rootfs:
        run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, rootfs, mirror],
            timeout=1200,
        )
        # Debian's Python is externally managed (PEP 668): pip installs into a venv, which
        # is first on PATH, so `python` and `pip` are the venv's.
        run(["chroot", rootfs, "/usr/bin/python3", "-m", "venv", "/opt/venv"])
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in Path(rootfs, junk).glob("*"):
                if path.is_file():
                    path.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        changes = [
            "--change",
            f"ENV PATH={BASE_PATH}",
            "--change",
            'CMD ["python"]',
            "--change",
            f"LABEL gradserve.base-recipe={recipe}",
        ]
        subprocess.run([*PODMAN, "import", *changes, "-", BASE_IMAGE], env=ENV, stdin=tar.stdout, check=True, capture_output=True)
        if tar.wait() != 0:
            raise Failed("tar of the debootstrap root failed")
    log(f"base image built in {time.monotonic() - start:.0f} s")


def _test_stage_pins() -> list[str]:
    """The ``name==version`` tools the Dockerfile's test stage installs."""
    text = (ROOT / "Dockerfile").read_text()
    test_stage = text[text.index("AS test") :]
    return re.findall(r'"([A-Za-z0-9_.-]+==[A-Za-z0-9_.+-]+)"', test_stage)


def _build_requires() -> list[str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]


def wheelhouse() -> Path:
    extra = [*_build_requires(), *_test_stage_pins()]
    inputs = b"".join((ROOT / name).read_bytes() for name in ("constraints.txt", "pyproject.toml")) + repr(extra).encode()
    key = hashlib.sha256(inputs).hexdigest()[:16]
    path = CACHE / "wheelhouse"
    stamp = path / ".inputs"
    if stamp.is_file() and stamp.read_text() == key:
        log(f"wheelhouse {path}: cached ({len(list(path.glob('*.whl')))} wheels)")
        return path
    log(f"wheelhouse {path}: pip download -c constraints.txt . {' '.join(extra)} ...")
    start = time.monotonic()
    fresh = CACHE / "wheelhouse.new"
    shutil.rmtree(fresh, ignore_errors=True)
    run([sys.executable, "-m", "pip", "download", "-q", "-d", str(fresh), "-c", "constraints.txt", ".", *extra], timeout=1800)
    for own in fresh.glob("gradserve-*"):  # the image builds its own wheel from the source
        own.unlink()
    (fresh / ".inputs").write_text(key)
    shutil.rmtree(path, ignore_errors=True)
    fresh.rename(path)
    size_mb = sum(p.stat().st_size for p in path.glob("*")) / 1e6
    log(f"wheelhouse ready in {time.monotonic() - start:.0f} s: {len(list(path.glob('*.whl')))} wheels, {size_mb:.0f} MB")
    return path


# -- 2. the project's images ----------------------------------------------------------------


def build_images(wheels: Path) -> dict[str, float]:
    args = [
        "build", "--format", "docker",  # docker format: OCI images drop HEALTHCHECK
        "--volume", f"{wheels}:/wheelhouse:ro",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        "--build-arg", "WHEELHOUSE=/wheelhouse",
    ]  # fmt: skip
    seconds = {}
    for target, tag in (("runtime", IMAGE), ("test", TEST_IMAGE)):
        start = time.monotonic()
        log(f"podman build --target {target} -t {tag} (BASE_IMAGE={BASE_IMAGE}, WHEELHOUSE=/wheelhouse)")
        rc = stream([*PODMAN, *args, "--target", target, "--tag", tag, str(ROOT)], prefix=f"  build {target} |", timeout=1800)
        if rc != 0:
            raise Failed(f"podman build --target {target} exited {rc}")
        seconds[target] = time.monotonic() - start
        log(f"built {tag} in {seconds[target]:.0f} s")
    podman("image", "prune", "--force")  # the previous build's untagged images
    return seconds


def image_size_mb(tag: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).strip()) / 1e6


# -- the podman service and healthchecks ---------------------------------------------------


@contextlib.contextmanager
def podman_service() -> Iterator[None]:
    SOCKET.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [*PODMAN, "system", "service", "--time=0", f"unix://{SOCKET}"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=open(RUN_DIR / "service.log", "w"),  # noqa: SIM115
        start_new_session=True,
    )
    log(f"podman system service started (pid {proc.pid}), DOCKER_HOST=unix://{SOCKET}")
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(SOCKET))
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise Failed(f"podman system service did not start: {(RUN_DIR / 'service.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log(f"podman system service stopped (exit {proc.returncode})")


class HealthChecks(threading.Thread):
    """Runs the containers' healthchecks, as Podman's systemd timers would.

    Containers not yet healthy are checked every second; healthy ones every 10 s (the
    compose file's interval). Records when each container first turned healthy after
    its start.
    """

    def __init__(self) -> None:
        super().__init__(daemon=True, name="healthchecks")
        self.stopping = threading.Event()
        self.last_check: dict[str, float] = {}
        self.healthy_after_s: dict[str, float] = {}  # "name@start" -> seconds from start to healthy

    def containers(self) -> list[dict[str, Any]]:
        out = run([*PODMAN, "ps", "--filter", f"label=com.docker.compose.project={PROJECT}", "--format", "json"], check_rc=False)
        return json.loads(out or "[]")

    def run(self) -> None:
        while not self.stopping.wait(1.0):
            try:
                self.tick()
            except Exception as exc:  # noqa: BLE001  (a container that went away mid-check)
                log(f"healthcheck poller: {type(exc).__name__}: {exc}")

    def tick(self) -> None:
        now = time.monotonic()
        for c in self.containers():
            status = c.get("Status", "")
            if "(" not in status:  # no healthcheck (the tests service)
                continue
            cid, name = c["Id"], c["Names"][0]
            healthy = "(healthy)" in status
            if healthy and now - self.last_check.get(cid, 0) < 10:
                continue
            self.last_check[cid] = now
            rc = subprocess.run([*PODMAN, "healthcheck", "run", cid], env=ENV, capture_output=True, timeout=30).returncode
            key = f"{name}@{c.get('StartedAt')}"
            if rc == 0 and key not in self.healthy_after_s:
                self.healthy_after_s[key] = time.time() - float(c.get("StartedAt") or time.time())
                log(f"{name} healthy, {self.healthy_after_s[key]:.1f} s after it started")

    def wait_healthy(self, names: Sequence[str], timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            states = {n: state(n) for n in names}
            if all(s == "healthy" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise Failed(f"not healthy after {timeout_s:.0f} s: {states}")
            time.sleep(0.5)


def state(name: str) -> str:
    out = podman("inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", name, check_rc=False).split()
    return out[-1] if out and out[0] == "running" else (out[0] if out else "missing")


def servers() -> list[str]:
    """The server replicas' container names, in index order."""
    out = podman(
        "ps",
        "-a",
        "--filter",
        f"label=com.docker.compose.project={PROJECT}",
        "--filter",
        "label=com.docker.compose.service=server",
        "--format",
        "{{.Names}}",
    )
    return sorted(out.split(), key=lambda n: int(n.rsplit("_", 1)[-1]))


def published(name: str, port: int) -> str:
    out = podman("port", name, f"{port}/tcp").strip().splitlines()
    if not out:
        raise Failed(f"{name}: port {port} is not published")
    return out[0].replace("0.0.0.0", "127.0.0.1")


def metrics(name: str) -> dict[str, float]:
    """``{sample name{labels}: value}`` from a replica's /metrics, through its published port."""
    text = urllib.request.urlopen(f"http://{published(name, 9464)}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f"{k}={v}" for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.split("{")[0] == name and all(w in k for w in want))


def health(address: str) -> str:
    """grpc.health.v1 of the gradserve service at a published address: SERVING, NOT_SERVING or the error code.

    From the host, because Podman refuses ``exec`` into a container that is stopping.
    """
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# -- 5. and 6. ------------------------------------------------------------------------------


def container_logs(name: str) -> str:
    result = subprocess.run([*PODMAN, "logs", name], env=ENV, capture_output=True, text=True, timeout=60)
    return result.stdout + result.stderr


def drain() -> None:
    (first, *_rest) = servers()
    x = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    seconds = 8.0
    address = published(first, 50051)
    with GradientClient(address, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        log(f"long call: slow_square(x, {seconds}) on {first} (published {address})")
        call = pool.submit(client.forward_backward, "slow_square", x, seconds)
        deadline = time.monotonic() + 20
        while total(metrics(first), "gradserve_calls_in_flight") < 1:
            check(time.monotonic() < deadline and not call.done(), f"the long call is in flight on {first}")
            time.sleep(0.2)
        log(f"{first}: gradserve_calls_in_flight = 1; docker-compose stop -t 40 server")
        stopping = pool.submit(run, compose("stop", "-t", "40", "server", replicas_file=True), timeout=120)
        events, seen = [], ""
        while not call.done():
            now = health(address)
            if now != seen:
                events.append(now)
                log(f"{first} health: {now}")
                seen = now
            time.sleep(0.2)
        result = call.result()
        log(f"{first} health while draining: {' -> '.join(events)}")
        check("NOT_SERVING" in events, f"{first} reported NOT_SERVING while the call was in flight")
        torch.testing.assert_close(result.outputs, x.detach() ** 2)
        torch.testing.assert_close(result.grads[0], 2 * x.detach())
        log(f"ok: the in-flight call completed during the drain, right values and gradient {result.grads[0].tolist()}")
        stopping.result()
    lines = [line for line in container_logs(first).splitlines() if "received SIGTERM" in line or line.endswith("stopped")]
    for line in lines[-2:]:
        log(f"{first} log: {line}")
    check(any("received SIGTERM" in line for line in lines), f"{first} logged the SIGTERM and drained")
    code = podman("inspect", "--format", "{{.State.ExitCode}}", first).strip()
    check(code == "0", f"{first} exited {code} after draining")


def kill_and_recompute(checks: HealthChecks) -> None:
    names = servers()
    victim = names[1]
    target = published(victim, 50051)
    recorder = Recorder()
    raw = grpc.insecure_channel(target)
    channel = grpc.intercept_channel(raw, recorder)
    try:
        with GradientClient(target, timeout=30, channel=channel) as client:
            remote = client.function("cube_plus_square")
            x = torch.tensor([2.0, -1.0], dtype=torch.float64, requires_grad=True)
            y = torch.tensor([3.0, 0.5], dtype=torch.float64, requires_grad=True)
            out = remote(x, y)
            handles = total(metrics(victim), "gradserve_handles")
            check(handles >= 1, f"forward on {victim} kept its graph there (gradserve_handles = {handles:.0f})")
            restarts = podman("inspect", "--format", "{{.RestartCount}}", victim).strip()
            pid = podman("top", victim, "hpid,args").splitlines()
            (server_pid,) = [line.split()[0] for line in pid[1:] if "gradserve serve" in line and "podman-init" not in line]
            log(f"kill -9 {server_pid} ({victim}'s gradserve serve process; restart count {restarts})")
            os.kill(int(server_pid), signal.SIGKILL)
            deadline = time.monotonic() + 60
            while podman("inspect", "--format", "{{.RestartCount}}", victim).strip() == restarts:
                if time.monotonic() > deadline:
                    raise Failed(f"{victim} was not restarted within 60 s")
                time.sleep(0.2)
            count = podman("inspect", "--format", "{{.RestartCount}}", victim).strip()
            log(f"{victim} restarted by its restart policy (restart count {count})")
            checks.wait_healthy([victim])
            grpc.channel_ready_future(raw).result(timeout=60)
            w = torch.tensor([1.0, 10.0], dtype=torch.float64)
            (out * w).sum().backward()
        torch.testing.assert_close(x.grad, 3 * x.detach() ** 2 * w)
        torch.testing.assert_close(y.grad, 2 * y.detach() * w)
    finally:
        raw.close()
    backwards = [(graph, code.name) for method, graph, code in recorder.calls if method == "Backward"]
    log(f"backward calls: {backwards}")
    grads = f"{x.grad.tolist()}, {y.grad.tolist()}"
    check(
        backwards == [("handle", "NOT_FOUND"), ("recompute", "OK")],
        f"the restarted {victim} had lost the handle and the client recomputed: right gradient {grads}",
    )


class Recorder(grpc.UnaryUnaryClientInterceptor):
    """Records (method, which graph a Backward names, status code) of each unary call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, grpc.StatusCode]] = []

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        outcome = continuation(details, request)
        method = details.method.rsplit("/", 1)[-1]
        graph = request.WhichOneof("graph") if method == "Backward" else ""
        self.calls.append((method, graph or "", outcome.code()))
        return outcome


# -- the run --------------------------------------------------------------------------------


def image_checks(name: str) -> dict[str, str]:
    uid = podman("exec", name, "id", "-u").strip()
    check(uid == "10001", f"{name} runs as uid {uid}")
    read_only = podman("inspect", "--format", "{{.HostConfig.ReadonlyRootfs}}", name).strip()
    root_write = subprocess.run([*PODMAN, "exec", name, "touch", "/probe"], env=ENV, capture_output=True, text=True)
    tmp_write = subprocess.run([*PODMAN, "exec", name, "touch", "/tmp/probe"], env=ENV, capture_output=True, text=True)
    check(
        read_only == "true"
        and root_write.returncode != 0
        and "Read-only file system" in root_write.stderr
        and tmp_write.returncode == 0,
        f"{name} serves with a read-only root filesystem (writing / fails: {root_write.stderr.strip()}; /tmp is a tmpfs)",
    )
    return {"uid": uid, "read_only": "yes"}


def teardown() -> None:
    step("7. teardown")
    if SOCKET.exists():
        rc = stream(
            compose("down", "--volumes", "--remove-orphans", "-t", "10", replicas_file=True), prefix="  down |", timeout=300
        )
        log(f"docker-compose down exited {rc}")
    left = podman("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}", check_rc=False).split()
    if left:
        podman("rm", "--force", "--time", "5", *left, check_rc=False)
    for net in podman("network", "ls", "--format", "{{.Name}}", check_rc=False).split():
        if net.startswith(PROJECT):
            podman("network", "rm", "--force", net, check_rc=False)
    left = podman("ps", "-aq", check_rc=False).split()
    nets = [n for n in podman("network", "ls", "--format", "{{.Name}}", check_rc=False).split() if n != "podman"]
    log(f"left behind: {len(left)} containers, {len(nets)} networks")


def main() -> int:
    missing = [
        tool
        for tool in ("podman", "runc", "debootstrap", "docker-compose", "catatonit", "iptables")
        if shutil.which(tool) is None and not Path("/usr/libexec/podman", tool).exists()
    ]
    if missing:
        print(
            f"compose-test needs {', '.join(missing)}: apt-get install podman runc debootstrap docker-compose "
            "netavark aardvark-dns catatonit iptables (.ci/run does)",
            file=sys.stderr,
        )
        return 2
    if os.geteuid() != 0:
        print("compose-test runs Podman as root (debootstrap and rootful networks): run it as root", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout) unwinds like Ctrl-C, through the teardown. The Podman service
    # runs in a session of its own, so a terminal's Ctrl-C reaches only this script.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    lock = open(CACHE / "lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another compose-test holds {CACHE / 'lock'}: waiting")
        fcntl.flock(lock, fcntl.LOCK_EX)
    summary: dict[str, str] = {}
    checks = HealthChecks()
    status = 1
    try:
        step("1. base image and wheelhouse")
        base_image()
        wheels = wheelhouse()

        step("2. images (the Dockerfile's runtime and test stages)")
        built = build_images(wheels)
        summary["image build"] = f"runtime {built['runtime']:.0f} s, test {built['test']:.0f} s"
        summary["CPU image size"] = f"{image_size_mb(IMAGE):.0f} MB ({IMAGE}); test image {image_size_mb(TEST_IMAGE):.0f} MB"
        log(f"image sizes: {summary['CPU image size']}")

        with podman_service():
            try:
                teardown_left = podman("ps", "-aq", "--filter", f"label=com.docker.compose.project={PROJECT}").split()
                if teardown_left:  # a run killed before its teardown
                    podman("rm", "--force", *teardown_left)
                checks.start()

                step("3. docker-compose -f docker-compose.cpu.yml --profile test up --exit-code-from tests")
                start = time.monotonic()
                up = [
                    "docker-compose",
                    "-f",
                    str(COMPOSE_FILE),
                    "--profile",
                    "test",
                    "up",
                    "--no-build",
                    "--exit-code-from",
                    "tests",
                ]
                rc = stream(up, prefix="  up |", timeout=1800)
                check(rc == 0, f"the integration suite passed in the compose network ({time.monotonic() - start:.0f} s)")
                healthy = [v for k, v in checks.healthy_after_s.items() if "_server_" in k]
                summary["time to healthy"] = f"{healthy[0]:.1f} s (one replica, from container start)" if healthy else "?"

                step(f"4. {REPLICAS} replicas; the suite on dns:///server:50051 with round_robin")
                rc = stream(
                    compose("up", "-d", "--no-build", "--scale", f"server={REPLICAS}", "server", replicas_file=True),
                    prefix="  up |",
                    timeout=300,
                )
                check(rc == 0, f"{REPLICAS} server replicas started")
                names = servers()
                checks.wait_healthy(names)
                check(len(names) == REPLICAS, f"{len(names)} replicas healthy: {', '.join(names)}")
                times = [f"{k.split('@')[0]} {v:.1f} s" for k, v in checks.healthy_after_s.items() if "_server_" in k][-REPLICAS:]
                summary["time to healthy, 3 replicas at once"] = ", ".join(times)
                summary.update(image_checks(names[0]))
                before = {n: total(metrics(n), "gradserve_requests_total") for n in names}
                expect = f"GRADSERVE_EXPECT_REPLICAS={REPLICAS}"
                suite = compose("run", "--rm", "--no-deps", "-e", expect, "tests", replicas_file=True)
                rc = stream(suite, prefix="  tests |", timeout=1800)
                check(rc == 0, f"the integration suite passed against {REPLICAS} replicas behind dns:///server:50051")
                served = {n: total(metrics(n), "gradserve_requests_total") - before[n] for n in names}
                for n in names:
                    log(f"{n}: gradserve_requests_total +{served[n]:.0f} during the suite")
                check(all(v > 0 for v in served.values()), f"each of the {REPLICAS} replicas served calls (from its metrics)")

                step("5. docker-compose stop with a long call in flight")
                drain()

                step("6. kill -9 a replica's server process")
                rc = stream(
                    compose("up", "-d", "--no-build", "--scale", f"server={REPLICAS}", "server", replicas_file=True),
                    prefix="  up |",
                    timeout=300,
                )
                checks.wait_healthy(servers())
                kill_and_recompute(checks)
                status = 0
            finally:
                checks.stopping.set()
                checks.join(timeout=30)
                teardown()
    except Failed as exc:
        log(f"FAILED: {exc}")
    except Exception as exc:  # noqa: BLE001
        log(f"FAILED: {type(exc).__name__}: {exc}")
        import traceback

        traceback.print_exc()
    finally:
        print(flush=True)
        log("=== summary")
        for key, value in summary.items():
            log(f"{key}: {value}")
        log(f"compose-test {'passed' if status == 0 else 'FAILED'} in {time.monotonic() - T0:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
