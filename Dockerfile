# smartmac-bridge: SMART MAIC meters to MQTT. See README.md, "Docker".
# The Python the tests run on here (3.11); any 3.11+ works.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Only what the package needs: a change to the tests or docs does not rebuild this layer.
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install . \
    && rm -rf /app/bridge /app/build \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin bridge

# Never root: the bridge needs no privileges (it only opens outgoing connections, and the
# simulator listens on an unprivileged port).
USER 10001:10001

# The status page, /api, /metrics and the health probes, when http.port is set to it (README
# "Status page, HTTP API and metrics"). Inside a container the server must listen on all
# addresses (http.host: 0.0.0.0) to be reached through a published port, which the config
# allows only with http.password or http.read_only.
EXPOSE 8099

# Configuration: a mounted YAML file named by SMARTMAC_CONFIG (docker-compose.yml mounts
# ./config.yaml at /config/config.yaml), and/or SMARTMAC_* variables, which win over it.
ENTRYPOINT ["smartmac-bridge"]
CMD ["run"]
