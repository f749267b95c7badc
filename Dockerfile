# syntax=docker/dockerfile:1
# The router image. Build: `docker build -t tenant-router .`; run: `docker compose up`.
# The same image runs the demo backends (`python -m router.demo_backend ...`).

# --- builder: wheels for the project and its dependencies, installed into /opt/venv ---
FROM python:3.11-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler: mypyc compiles the hot path (setup.py). Only this stage has it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README* ./
COPY router/ router/
# 1. A build venv that the image does not keep: the dependencies and the build tools (the
#    `build` extra; a pure-Python router comes along, unused). mypyc type-checks the hot
#    path against the dependencies' own types, as `make typecheck` does.
# 2. The router's wheel, its hot path compiled by mypyc (setup.py), without build isolation
#    so that it sees them.
# 3. That wheel and its dependencies into /opt/venv, the venv the image keeps; it must say
#    "compiled with mypyc" (router.service.native exits 0), or the build fails.
RUN python -m venv /opt/build \
 && ROUTER_COMPILE=0 /opt/build/bin/pip install ".[build]" \
 && ROUTER_COMPILE=1 /opt/build/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/venv \
 && /opt/venv/bin/pip install /wheels/router-*.whl \
 && (cd / && /opt/venv/bin/python -m router.service.native) \
 && rm -rf /wheels /opt/build

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
