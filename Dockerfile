# postload: the image a Docker/Kubernetes work pool runs (flows, dbt project, CLI).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    POSTLOAD_PROJECT_DIR=/opt/postload

WORKDIR /opt/postload

# Dependencies first (from the lock), so code changes do not rebuild this layer.
COPY requirements.lock ./
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv pip install --system --no-cache -r requirements.lock

COPY pyproject.toml README.md postload.yaml prefect.yaml ./
COPY postload ./postload
COPY flows ./flows
COPY blocks ./blocks
COPY dbt_project ./dbt_project
RUN uv pip install --system --no-cache --no-deps . \
 && useradd --create-home --uid 10001 postload \
 && mkdir -p .postload dbt_project/target \
 && chown -R postload /opt/postload/.postload /opt/postload/dbt_project

# No secrets are baked in: credentials come from Prefect blocks at run time.
USER postload
CMD ["postload", "--help"]
