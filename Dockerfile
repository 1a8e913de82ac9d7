# postload's image: what a Docker or Kubernetes work pool runs flows in (prefect.docker.yaml builds
# and pushes it, tagged with the commit; CI does so on every push to main), and the Fivetran
# webhook receiver (the default command):
#
#   docker build -t postload .
#   docker run -p 8787:8787 -e PREFECT_API_URL=… -v postload-state:/opt/postload/.postload postload
#
# `make image` builds it with podman and smoke-tests it inside (tests/system/image_smoke.sh).
# The lock includes the `snowflake` extra, so dbt Core runs on DuckDB and on Snowflake.
#
# Credentials are never baked in: flows read them from Prefect blocks at run time, the receiver
# its webhook secret from the environment or a Secret block, Prefect its API key from the
# environment the worker or `docker run` passes.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DO_NOT_TRACK=1 \
    POSTLOAD_PROJECT_DIR=/opt/postload

RUN useradd --create-home --uid 10001 --user-group postload

WORKDIR /opt/postload

# Dependencies first, from the committed lock, so a code change does not reinstall them.
# The same uv as the Makefile, so the image resolves the lock the way `make setup` does.
COPY requirements.lock ./
RUN pip install --no-cache-dir uv==0.13.9 \
 && uv pip install --system --no-cache -r requirements.lock

COPY pyproject.toml README.md postload.yaml prefect.yaml ./
COPY postload ./postload
COPY flows ./flows
COPY blocks ./blocks
COPY dbt_project ./dbt_project
# The code stays root-owned; flow runs and the receiver write only local state (.postload) and
# dbt's target/ and logs/.
RUN uv pip install --system --no-cache --no-deps . \
 && rm -rf build ./*.egg-info \
 && mkdir -p .postload dbt_project/target dbt_project/logs \
 && chown -R postload:postload .postload dbt_project

USER postload

# postload receiver (POSTLOAD_RECEIVER_PORT's default). Work pools replace the command with
# Prefect's flow-run command, so the same image serves both.
EXPOSE 8787
CMD ["postload", "receiver", "--host", "0.0.0.0"]
