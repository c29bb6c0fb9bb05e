# gradserve server image. Three stages:
#   build    builds the gradserve wheel and lists its dependencies
#   runtime  the server (default target): torch, the pinned dependencies, the wheel
#   test     runtime plus pytest and tests/ (docker compose's `tests` service)
#
# GPU (default base: an official CUDA-enabled PyTorch runtime image):
#   docker build -t gradserve:cuda .
# CPU (slim Python base, PyTorch's CPU wheel):
#   docker build -t gradserve:cpu \
#     --build-arg BASE_IMAGE=python:3.11-slim \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Offline, from a wheelhouse (`pip download -d WHEELHOUSE -c constraints.txt .` plus the
# build and test tools; what `make compose-test` does with Podman, which can bind-mount
# a folder into the build): pip installs with --no-index --find-links WHEELHOUSE.
#   podman build -t gradserve:cpu -v "$PWD/wheelhouse:/wheelhouse:ro" \
#     --build-arg BASE_IMAGE=localhost/gradserve-base:bookworm --build-arg WHEELHOUSE=/wheelhouse .
#
# Layers are ordered so that a change to the code rebuilds only the last layer of the
# runtime stage: torch and the dependencies stay cached.

ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS build
# A folder of wheels mounted into the build: pip uses it instead of an index.
ARG WHEELHOUSE=""
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY protos/ protos/
COPY client/ client/
COPY server/ server/
# The wheel is pure Python. requirements.txt is read from its metadata and so changes
# only when pyproject.toml's dependencies do; constraints.txt pins them (all but torch,
# which is the base image's or the CPU wheel's).
RUN if [ -n "${WHEELHOUSE}" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="${WHEELHOUSE}"; fi \
 && python -m pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && python -c "import email, glob, zipfile; w = zipfile.ZipFile(glob.glob('/wheels/gradserve-*.whl')[0]); meta = next(n for n in w.namelist() if n.endswith('.dist-info/METADATA')); reqs = email.message_from_bytes(w.read(meta)).get_all('Requires-Dist') or []; print(*[r for r in reqs if 'extra ==' not in r], sep=chr(10))" > /wheels/requirements.txt \
 && grep -v -i '^torch[=<> ]' constraints.txt > /wheels/constraints.txt

# ---------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ARG BASE_IMAGE
# Set for a base without torch (the CPU variant); empty keeps the base image's torch.
ARG TORCH_INDEX_URL=""
ARG TORCH_REQUIREMENT="torch>=2.3"
# Set to a folder of wheels mounted into the build (podman build -v): torch, when the base
# has none, and the dependencies come from there, with no index.
ARG WHEELHOUSE=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# 1. torch: only the build arguments invalidate this layer. (DL3013: the version is the
#    TORCH_REQUIREMENT build argument.)
# hadolint ignore=DL3013
RUN if [ -n "${WHEELHOUSE}" ]; then \
      python -m pip install --no-cache-dir --no-index --find-links "${WHEELHOUSE}" "${TORCH_REQUIREMENT}"; \
    elif [ -n "${TORCH_INDEX_URL}" ]; then \
      python -m pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "${TORCH_REQUIREMENT}"; \
    fi \
 && if ! python -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"; then \
      echo "no usable torch in ${BASE_IMAGE}: pass --build-arg TORCH_INDEX_URL=... or WHEELHOUSE=..." >&2; exit 1; \
    fi

# 2. gradserve's dependencies (grpcio, protobuf, ...), pinned; cached until they change.
COPY --from=build /wheels/requirements.txt /wheels/constraints.txt /tmp/gradserve-deps/
RUN if [ -n "${WHEELHOUSE}" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="${WHEELHOUSE}"; fi \
 && python -m pip install --no-cache-dir -r /tmp/gradserve-deps/requirements.txt -c /tmp/gradserve-deps/constraints.txt \
 && rm -rf /tmp/gradserve-deps

# 3. An unprivileged user, and /functions for user modules (mounted, on PYTHONPATH).
RUN useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin gradserve \
 && mkdir -p /functions
ENV PYTHONPATH=/functions

# 4. gradserve itself: the only layer a code change rebuilds.
COPY --from=build /wheels/ /tmp/gradserve-wheel/
RUN python -m pip install --no-cache-dir --no-deps /tmp/gradserve-wheel/gradserve-*.whl \
 && rm -rf /tmp/gradserve-wheel

USER 10001:10001
WORKDIR /home/gradserve
# gRPC, and Prometheus metrics when GRADSERVE_METRICS_PORT=9464 is set.
EXPOSE 50051 9464
# SIGTERM: health turns NOT_SERVING, in-flight calls get --grace-period-s to finish.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
  CMD ["sh", "-c", "exec gradserve health --target 127.0.0.1:${GRADSERVE_PORT:-50051} --service gradserve.v1.GradientService --timeout-s 5"]
CMD ["gradserve", "serve", "--host", "0.0.0.0"]

# ---------------------------------------------------------------------------------------
FROM runtime AS test
ARG WHEELHOUSE=""
USER 0
RUN if [ -n "${WHEELHOUSE}" ]; then export PIP_NO_INDEX=1 PIP_FIND_LINKS="${WHEELHOUSE}"; fi \
 && python -m pip install --no-cache-dir "pytest==9.2.0" "pytest-timeout==2.4.0" "trustme==1.2.1"
WORKDIR /app
COPY pyproject.toml ./
COPY functions/ functions/
COPY tests/ tests/
USER 10001:10001
# GRADSERVE_TARGET=HOST:PORT runs the suite against that server; unset, it starts its own.
CMD ["python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/integration"]
