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
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
    && pip install --no-cache-dir -c requirements/constraints.txt . \
    && useradd --create-home --uid 10001 pgml \
    && mkdir -p /data && chown pgml /data

USER pgml
# The embedded server (used only when PGML_PROXY_UPSTREAM is unset) keeps its data here.
ENV PGML_PROXY_UPSTREAM_EMBEDDED_DATA_DIR=/data/pgdata
VOLUME ["/data"]
EXPOSE 6432
ENTRYPOINT ["pgml-proxy"]
