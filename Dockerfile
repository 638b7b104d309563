# syntax=docker/dockerfile:1
# pymmproxy container image: Debian's python3 + a venv in /opt/pymmproxy.
#
#   docker build -t pymmproxy .                      (anywhere with Docker/BuildKit)
#   .ci/build-image                                  (here: buildah, no daemon; see that script)
#
# Running it: the proxy binds with IP_TRANSPARENT and installs rules in the *host* network
# namespace, so it needs `--network host` and CAP_NET_ADMIN (+ CAP_NET_RAW, and
# CAP_NET_BIND_SERVICE for listen ports < 1024).  The default user `pymmproxy` has no
# capabilities of its own (Docker does not raise ambient capabilities for a non-root user),
# so run the daemon as `--user root --cap-drop ALL --cap-add NET_ADMIN --cap-add NET_RAW
# --cap-add NET_BIND_SERVICE`, with the config mounted at /etc/pymmproxy.
#
# Stages: `builder` has the compilers (python-iptables ships only an sdist with a small C
# extension); the final stage copies just the finished venv, so it carries no toolchain.
# Tests are not baked in: .ci/build-image runs the unit tests in a throw-away container made
# from this image, so the image stays lean.

ARG BASE=debian:bookworm-slim

# ---------------------------------------------------------------------------- builder ---
FROM ${BASE} AS builder

# Optional build-time network plumbing, passed in by the build script from the host's own
# configuration (nothing host-specific is written here):
#   HOST_CA         path of a CA bundle bind-mounted into the build (never over the image's
#                   own /etc/ssl/certs/ca-certificates.crt)
#   PIP_INDEX_URL / PIP_EXTRA_INDEX_URL   the host's package index, if it is not the default
ARG HOST_CA=
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=120

RUN set -eu; \
    apt_ca=""; [ -z "$HOST_CA" ] || apt_ca="-o Acquire::https::CAInfo=$HOST_CA"; \
    apt-get $apt_ca update; \
    apt-get $apt_ca install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev; \
    rm -rf /var/lib/apt/lists/*

# Dependencies first, in their own layer: editing the source does not re-download them.
COPY pyproject.toml /src/pyproject.toml
RUN set -eu; \
    [ -z "$HOST_CA" ] || export PIP_CERT="$HOST_CA"; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    python3 -m venv /opt/pymmproxy; \
    python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb")); \
print("\n".join(p["project"]["dependencies"] + p["build-system"]["requires"]))' \
        > /tmp/requirements.txt; \
    /opt/pymmproxy/bin/pip install -r /tmp/requirements.txt

COPY README.md /src/README.md
COPY pymmproxy /src/pymmproxy
RUN set -eu; \
    /opt/pymmproxy/bin/pip install --no-deps --no-build-isolation /src; \
    /opt/pymmproxy/bin/pip uninstall -y setuptools wheel

# ---------------------------------------------------------------------------- runtime ---
FROM ${BASE}

ARG HOST_CA=
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="pymmproxy" \
      org.opencontainers.image.description="PROXY-protocol transparent proxy (go-mmproxy drop-in)" \
      org.opencontainers.image.licenses="MIT"

# python3: the interpreter the venv points at.  iptables: the libxtables/libip*tc libraries
# and xtables match modules that python-iptables loads for `pymmproxy pathway ...` on a
# legacy-iptables host.  libnftables1: the nft backend (Debian 12's default iptables is the
# nft variant, so that is what the backend detection picks; iptables only recommends it).
RUN set -eu; \
    apt_ca=""; [ -z "$HOST_CA" ] || apt_ca="-o Acquire::https::CAInfo=$HOST_CA"; \
    apt-get $apt_ca update; \
    apt-get $apt_ca install -y --no-install-recommends python3 iptables libnftables1; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

RUN set -eu; \
    groupadd --system pymmproxy; \
    useradd --system --gid pymmproxy --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin pymmproxy; \
    install -d -m 0755 -o root -g root /etc/pymmproxy; \
    install -d -m 0755 -o pymmproxy -g pymmproxy /run/pymmproxy

COPY --from=builder /opt/pymmproxy /opt/pymmproxy

ENV PATH=/opt/pymmproxy/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYMMPROXY_CONFIG_DIR=/etc/pymmproxy \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

VOLUME ["/etc/pymmproxy"]
USER pymmproxy
WORKDIR /
ENTRYPOINT ["pymmproxy"]
CMD ["--help"]
