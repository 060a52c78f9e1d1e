# drived container image: the daemon on local disk (or, with DRIVED_STORAGE /
# AWS_ENDPOINT_URL, in front of an S3-compatible store), as a non-root user.
#
#   docker build -t drived .
#   docker run -p 50051:50051 -v drive-data:/data drived
#   docker run drived --help            # arguments go to drived
#
# BASE_IMAGE must provide python3 (>= 3.10) with the venv module; builder and
# runtime use the same base, so the venv's interpreter path is valid in both.
ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- builder: a venv holding drived, its dependencies and dumb-init --------
FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/venv
# dumb-init (a prebuilt static binary in its PyPI wheel) is PID 1: it forwards
# SIGTERM to drived, which then drains, and reaps zombies. From PyPI rather
# than apt so the image needs no Debian mirror and works on any python base.
RUN /opt/venv/bin/pip install dumb-init==1.2.5.post1
# Dependencies first, in a layer of their own, so a source change does not
# download them again: the client's and the daemon extra's (read with tomllib:
# skipped on Python 3.10, where the `pip install '/src[daemon]'` below installs them anyway).
COPY pyproject.toml /src/
RUN /opt/venv/bin/python -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["daemon"]))' >/tmp/deps.txt \
 || : >/tmp/deps.txt; \
    if [ -s /tmp/deps.txt ]; then /opt/venv/bin/pip install -r /tmp/deps.txt; fi
COPY README.md /src/
COPY drived /src/drived
COPY drive_client /src/drive_client
RUN /opt/venv/bin/pip install '/src[daemon]' \
 && /opt/venv/bin/pip uninstall --yes pip setuptools \
 && /opt/venv/bin/drived --help >/dev/null

# --- runtime: the venv and nothing else ------------------------------------
FROM ${BASE_IMAGE}
RUN groupadd --system --gid 10001 drived \
 && useradd --system --uid 10001 --gid drived --home-dir /data --no-create-home --shell /usr/sbin/nologin drived \
 && mkdir /data && chown drived:drived /data
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    DRIVED_LISTEN=0.0.0.0:50051 \
    DRIVED_DATA_DIR=/data
# By number: Kubernetes' runAsNonRoot (deploy/k8s) can check only a numeric user.
USER 10001:10001
WORKDIR /data
VOLUME /data
EXPOSE 50051
# `drived health` asks the gRPC health service at DRIVED_LISTEN (0.0.0.0 is
# dialled as 127.0.0.1) and exits 0 only on SERVING. With TLS (DRIVED_TLS_CERT,
# DRIVED_TLS_KEY) it needs the CA in DRIVE_TLS_CA, and with mutual TLS a client
# certificate in DRIVE_TLS_CERT and DRIVE_TLS_KEY (README, Container).
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["drived", "health", "--timeout", "3"]
# SIGTERM: dumb-init passes it on; drived stops taking calls, lets in-flight
# transfers finish within --grace-period (30 s), then exits 0. Give `docker
# stop` / compose a longer timeout than the grace period (e.g. --time 40).
STOPSIGNAL SIGTERM
ENTRYPOINT ["dumb-init", "--", "drived"]
