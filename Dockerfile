# binance-pm-exporter container image.
#
#   ./scripts/image     # docker build -t binance-pm-exporter:0.1.0 . (pyproject.toml's version)
#   docker run --read-only --tmpfs /tmp -p 9745:9745 -e BINANCE_API_KEY -e BINANCE_API_SECRET \
#     -v "$PWD/config.yaml:/etc/binance-pm-exporter/config.yaml:ro" binance-pm-exporter:0.1.0
#
# Runs as UID/GID 10001 and writes nothing outside /tmp and the volume
# /var/lib/binance-pm-exporter (--storage.path: the last snapshot, kept across restarts),
# so a read-only root filesystem works. The HEALTHCHECK asks plain http://127.0.0.1:9745/healthz: with
# --web.config.file (TLS or basic auth) or another listen address, override it
# (docker run --health-cmd ...) or disable it (--no-healthcheck).
#
# Both stages use the same base, pinned by tag and by digest (the multi-platform
# index of python:3.11.14-slim-bookworm); bump both FROM lines and the labels together.

# --- builder: a virtualenv with the exporter and its dependencies ----------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# pip byte-compiles the installed modules here, so the read-only runtime never needs to.
RUN python -m venv "$VIRTUAL_ENV" \
    && "$VIRTUAL_ENV/bin/pip" install --no-cache-dir .

# --- runtime: the base image plus the virtualenv, nothing else --------------------------------
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d
LABEL org.opencontainers.image.title="binance-pm-exporter" \
      org.opencontainers.image.description="Prometheus exporter for Binance Portfolio Margin accounts" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.14-slim-bookworm" \
      org.opencontainers.image.base.digest="sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d"
RUN groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin exporter \
    && install -d -m 0700 -o 10001 -g 10001 /var/lib/binance-pm-exporter
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TMPDIR=/tmp
USER 10001:10001
VOLUME ["/var/lib/binance-pm-exporter"]
EXPOSE 9745
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9745/healthz', timeout=3)"]
ENTRYPOINT ["binance-pm-exporter"]
CMD ["--config.file=/etc/binance-pm-exporter/config.yaml", "--storage.path=/var/lib/binance-pm-exporter"]
