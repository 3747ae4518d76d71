# syntax=docker/dockerfile:1
# Build: the locked runtime dependencies into a virtualenv. Run: slim image, non-root user, source on
# PYTHONPATH (alembic/ is found next to models/, so the project runs from its source tree, not site-packages).
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# Exactly what requirements/runtime.txt pins, hashes checked and nothing else (--no-deps): the
# dependencies of pyproject.toml without its extras, so no pgserver and no test or lint tools.
# ./dev lock regenerates the lock.
COPY requirements/runtime.txt /tmp/runtime.txt
RUN pip install --require-hashes --no-deps -r /tmp/runtime.txt
# The one C extension (atrium/observability/_pools.c: gives Python's empty memory pools back after
# load), compiled here where a compiler may be installed, copied into the source tree below.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
COPY setup.py /tmp/ext/setup.py
COPY atrium/observability/_pools.c /tmp/ext/atrium/observability/_pools.c
RUN cd /tmp/ext && python setup.py --quiet build_ext --inplace && ls atrium/observability/_pools.*.so

FROM python:3.11-slim AS runtime
ENV PATH=/opt/venv/bin:$PATH PYTHONPATH=/app PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    ATRIUM_ENV=production ATRIUM_DATA_DIR=/tmp/atrium
# A numeric user, so that Kubernetes' runAsNonRoot can verify it (deploy/kubernetes).
RUN groupadd --system --gid 10001 atrium \
    && useradd --system --uid 10001 --gid atrium --home-dir /app --shell /usr/sbin/nologin atrium
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=root:root atrium ./atrium
COPY --from=build /tmp/ext/atrium/observability/_pools.*.so ./atrium/observability/
COPY --chown=root:root auth ./auth
COPY --chown=root:root core ./core
COPY --chown=root:root models ./models
COPY --chown=root:root partners ./partners
COPY --chown=root:root planner ./planner
COPY --chown=root:root records ./records
COPY --chown=root:root resolvers ./resolvers
COPY --chown=root:root schema ./schema
COPY --chown=root:root subscriptions ./subscriptions
COPY --chown=root:root alembic ./alembic
COPY --chown=root:root alembic.ini schema.graphql ./
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/healthz').status != 200)"
# DATABASE_URL (migrations), ATRIUM_APP_DATABASE_URL (the atrium_app role), REDIS_URL and
# ATRIUM_JWT_SECRET or ATRIUM_JWKS_URL come from the environment. Run `python -m atrium migrate` as a job.
CMD ["python", "-m", "uvicorn", "--factory", "atrium.asgi:create_from_env", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers", "--no-access-log", "--http", "atrium.http.deadline:HttpProtocol"]
