# The algorithm image: `python process.py` reads /input and writes /output (Grand Challenge's contract).
#
# Build it with ./build.sh [cpu|gpu], which first downloads the wheels into build/wheels/algorithm-<flavour>/
# (with the requirements it installs, as requirements.txt and no-deps.txt): the build itself is hermetic,
# `pip install --no-index` from that folder, and needs no network. The cpu flavour's requirements.txt is the
# hash-pinned lock requirements/lock/algorithm-cpu.txt: pip installs it with --require-hashes. Works with the classic builder and BuildKit.
#
#   BASE_IMAGE  a Debian bookworm image with Python 3.11: python:3.11-slim-bookworm (default), or the
#               debootstrap image of `./build.sh --local-base` (trunkseg-base:bookworm, /usr/bin/python3)
#   FLAVOUR     cpu: ONNX Runtime only, no torch; gpu: torch with CUDA (+ TensorRT)
#   MODEL_PACKAGE  the model package folder (in the build context) baked in as the bundled model
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS builder
ARG FLAVOUR=cpu
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_ROOT_USER_ACTION=ignore

# One layer of this throw-away stage: the wheels never reach the final image.
COPY build/wheels/algorithm-${FLAVOUR}/ /wheels/
RUN set -eu; \
    python3 -m venv /opt/venv; \
    hashes=; if grep -q -- '--hash=sha256:' /wheels/requirements.txt; then hashes=--require-hashes; fi; \
    /opt/venv/bin/pip install --quiet --no-index --find-links /wheels $hashes -r /wheels/requirements.txt; \
    if [ -s /wheels/no-deps.txt ]; then \
        /opt/venv/bin/pip install --quiet --no-index --find-links /wheels --no-deps -r /wheels/no-deps.txt; \
    fi; \
    if [ "$FLAVOUR" = cpu ]; then /opt/venv/bin/pip uninstall --quiet --yes setuptools; fi; \
    /opt/venv/bin/pip uninstall --quiet --yes pip; \
    site=$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); \
    find "$site" -depth -type d -name tests \( -path '*/numpy/*' -o -path '*/scipy/*' \) -exec rm -rf {} +; \
    rm -rf /opt/venv/include /opt/venv/share

COPY process.py /opt/app/
COPY common/*.py common/*.json /opt/app/common/
COPY model/*.py /opt/app/model/
COPY model/runtimes/*.py /opt/app/model/runtimes/
COPY preprocess/*.py /opt/app/preprocess/
COPY postprocess/*.py /opt/app/postprocess/
ARG MODEL_PACKAGE=model/packages/demo-phantom
COPY ${MODEL_PACKAGE}/ /opt/app/model/packages/demo-phantom/
# The CPU flavour has no torch: drop the modules that import it (runtime.py imports them only for torch;
# model/runtimes/gpu.py stays: it tells the CPU image that there is no GPU runtime without importing torch).
# Then check at build time that the bundled package loads (checksums) and its runtime opens it.
COPY docker/check_image.py /tmp/
RUN set -eu; \
    if [ "$FLAVOUR" = cpu ]; then rm -f /opt/app/model/network.py /opt/app/model/export.py /opt/app/model/export_fp16.py \
        /opt/app/model/segment_torch.py /opt/app/model/runtimes/cuda.py /opt/app/model/runtimes/tensorrt.py /opt/app/model/build_engine.py; fi; \
    cd /opt/app; \
    /opt/venv/bin/python /tmp/check_image.py algorithm --flavour "$FLAVOUR"; \
    /opt/venv/bin/python -m compileall -q /opt/app; \
    chmod -R u=rwX,go=rX /opt/app /opt/venv


FROM ${BASE_IMAGE}
ARG FLAVOUR=cpu
# Grand Challenge runs the image's own non-root USER. /opt/ml/model is its model mount: a model
# package there (model.json beside the weights) replaces the bundled one.
RUN set -eu; \
    groupadd --gid 1001 user; \
    useradd --uid 1001 --gid user --no-log-init --create-home --home-dir /home/user user; \
    mkdir -p /input /output /opt/ml/model; \
    chown user:user /output

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/app /opt/app

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /opt/app
USER user
ENTRYPOINT ["/opt/venv/bin/python", "/opt/app/process.py"]
# Last, so that a new version (git describe) changes only this metadata layer.
ARG VERSION=dev
LABEL org.opencontainers.image.title="trunkseg-algorithm" \
      org.opencontainers.image.description="Segments 22 trunk muscles in CT (2D U-Net); Grand Challenge algorithm container" \
      org.opencontainers.image.version="${VERSION}" \
      trunkseg.flavour="${FLAVOUR}"
