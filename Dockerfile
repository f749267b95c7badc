# syntax=docker/dockerfile:1
# The router image. Build: `docker build -t tenant-router .`; run: `docker compose up`.
# The same image runs the demo backends (`python -m router.demo_backend ...`).

# --- builder: wheels for the project and its dependencies, installed into /opt/venv ---
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
RUN python -m venv /opt/venv
# Dependencies change less often than the code: copy only what the build needs.
COPY pyproject.toml README* ./
COPY router/ router/
RUN /opt/venv/bin/pip wheel --wheel-dir /wheels . \
 && /opt/venv/bin/pip install --no-index --find-links /wheels router \
 && rm -rf /wheels

# --- final: the venv and the config, run as an unprivileged user ---
FROM python:3.11-slim
RUN groupadd --system --gid 10001 router \
 && useradd --system --uid 10001 --gid router --home-dir /app --no-create-home \
      --shell /usr/sbin/nologin router
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /app
# /app is the router user's (a relative SQLite ledger path lands here); the config
# stays root-owned and read-only to the process. Compose mounts ./config over it.
RUN chown router:router /app
COPY config/ /app/config/
USER router
# Proxy (server.listen) and admin (server.admin_listen) ports of config/router.yaml.
EXPOSE 8080 8081
# slim has no curl: ask /readyz with the standard library (503 raises, so exits 1).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:8081/readyz', timeout=2)"]
# SIGTERM starts the graceful drain (readyz 503 for drain_delay, then finish in-flight).
STOPSIGNAL SIGTERM
ENTRYPOINT ["router"]
# The demo config. On ECS, config/ecs/task-definition.json overrides the command with the
# production config the same COPY brings in: serve --config /app/config/ecs/router.yaml.
CMD ["serve", "--config", "/app/config/router.yaml"]
