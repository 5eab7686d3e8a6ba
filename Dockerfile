# container-exporter image.
#
#   docker build -t container-exporter .
#
# Build arguments:
#   BASE_IMAGE  an image with Python >= 3.11 and its venv module (default python:3.11-slim-bookworm);
#               the same image is used for both stages, so the virtualenv's interpreter matches.
#   WHEELS      "index" (default): install from the package index.
#               "local": install only from ./wheelhouse, for builds that cannot reach an index
#               from inside `docker build`. Make it on the host first:
#                   pip wheel --wheel-dir wheelhouse '.[all]'
#
# Run (the host's cgroups, Docker socket and kernel log, and its / at /rootfs, read-only):
#
#   docker run -d --name container-exporter \
#     --volume /sys/fs/cgroup:/sys/fs/cgroup:ro \
#     --volume /var/run/docker.sock:/var/run/docker.sock:ro \
#     --volume /:/rootfs:ro \
#     --volume /var/lib/container-exporter:/var/lib/container-exporter \
#     --device /dev/kmsg --cap-add SYSLOG \
#     --publish 8080:8080 \
#     container-exporter
#
# Seeing /rootfs/proc, the exporter reads the host's proc, sys and /etc through /rootfs.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG WHEELS=index
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/container-exporter \
 && if [ "$WHEELS" = local ]; then \
        /opt/container-exporter/bin/pip install --no-cache-dir --no-index --find-links wheelhouse 'container-exporter[all]'; \
    else \
        /opt/container-exporter/bin/pip install --no-cache-dir '.[all]'; \
    fi \
 && /opt/container-exporter/bin/pip uninstall --yes pip \
 && /opt/container-exporter/bin/container-exporter --version

FROM ${BASE_IMAGE}
COPY --from=build /opt/container-exporter /opt/container-exporter
ENV PATH=/opt/container-exporter/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4).status == 200 else 1)"]
ENTRYPOINT ["container-exporter"]
CMD ["run"]
