# The one SensorFleet image: operator, simulators, collectors and the forecast job
# (`sensorfleet operator | simulate | collect | forecast`). Non-root, read-only-rootfs friendly.
#   make image            # docker build -t sensorfleet:0.1.0 .
#   make kind-load        # kind load docker-image sensorfleet:0.1.0 --name sensorfleet
# BASE_IMAGE: any Debian-like image with Python >= 3.11 and its venv module. The public slim image
# by default; `make images` builds this same file with podman from a debootstrap-made Debian
# (which has `python3`, not `python`) for the dev cluster, which has no registry.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
# The dependencies first, from pyproject.toml alone: a layer that a code edit does not invalidate.
RUN python3 -m venv /opt/sensorfleet \
 && /opt/sensorfleet/bin/pip install --upgrade pip wheel \
 && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/sensorfleet/bin/pip install -r /tmp/requirements.txt
COPY src ./src
COPY operator ./operator
COPY simulators ./simulators
COPY collectors ./collectors
COPY forecasting ./forecasting
# src/sensorfleet/{operator,simulators,...} are symlinks to the top-level folders: build a wheel
# that contains their files, then install it into the virtualenv (its dependencies are there).
RUN /opt/sensorfleet/bin/pip wheel --no-deps -w /wheels . \
 && /opt/sensorfleet/bin/pip install --no-deps /wheels/*.whl \
 && /opt/sensorfleet/bin/pip check

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="sensorfleet" \
      org.opencontainers.image.description="Simulate, collect and forecast industrial IoT sensor fleets (MQTT, CoAP, OPC UA)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 sensorfleet \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/sensorfleet --create-home sensorfleet
COPY --from=build /opt/sensorfleet /opt/sensorfleet
ENV PATH=/opt/sensorfleet/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/home/sensorfleet
USER 10001:10001
WORKDIR /home/sensorfleet
EXPOSE 8080 9100
ENTRYPOINT []
CMD ["sensorfleet", "--help"]
