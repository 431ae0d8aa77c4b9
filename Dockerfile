FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip install --no-cache-dir . && useradd --system --uid 10001 bridge
USER bridge
# Config from a mounted file (SMARTMAC_CONFIG) and/or SMARTMAC_* environment variables.
ENV SMARTMAC_CONFIG=/config/config.yaml
ENTRYPOINT ["smartmac-bridge"]
CMD ["run"]
