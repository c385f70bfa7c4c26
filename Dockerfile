# pgml-proxy: the PostgresML pgml.* SQL API in front of any PostgreSQL.
# Same install as the Makefile: the project with pinned constraints (CPU torch).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PGML_PROXY_LISTEN=0.0.0.0:6432 \
    PGML_PROXY_SQL_DIR=/app/sql

WORKDIR /app
COPY pyproject.toml README.md config.toml ./
COPY requirements ./requirements
COPY proxy ./proxy
COPY engine ./engine
COPY sql ./sql

# CPU-only torch comes first from PyTorch's CPU index, so nothing pulls a CUDA build;
# everything else is pinned by the same constraints file the Makefile uses.
# The proxy runs as an unprivileged OS user (never root): it can read only what it serves. It owns /data:
# files pgml.load_dataset may read (/data/files), models found by name or path (/data/models), its Hugging
# Face cache, and the artifact signing key.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install --no-cache-dir -c requirements/constraints.txt . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin pgml \
    && mkdir -p /data/files /data/models /data/hf \
    && chown -R pgml:pgml /data && chmod -R 0750 /data

USER pgml
# The embedded server (used only when PGML_PROXY_UPSTREAM is unset) keeps its data here.
ENV PGML_PROXY_UPSTREAM_EMBEDDED_DATA_DIR=/data/pgdata \
    PGML_PROXY_ENGINE_DATA_DIRS=/data/files \
    PGML_PROXY_ENGINE_MODEL_DIRS=/data/models \
    PGML_PROXY_ENGINE_ARTIFACT_KEY_FILE=/data/artifact.key \
    HF_HOME=/data/hf
VOLUME ["/data"]
EXPOSE 6432
ENTRYPOINT ["pgml-proxy"]
