#!/usr/bin/env bash
# Local stand-ins for the base images docker-compose.yml and the Dockerfile use, for machines
# that reach no image registry (only Debian's mirror and npm). An image that already exists
# (pulled, or built by an earlier run) is left alone; missing ones are built from Debian packages:
#
#   node:20-slim   Debian 12 minbase (debootstrap) + this machine's own Node 20 binary and npm,
#                  with a `node` user (uid 1000), as in the official image
#   redis:7        Debian 12 + Debian's redis-server (7.0)
#   nginx:stable   Debian 12 + Debian's nginx-light (1.22: no `resolve` in upstreams, so
#                  deploy/nginx.compose.conf re-resolves through variables instead)
#
# Needs root, docker (a running daemon) and debootstrap. Env: DOCKER (docker CLI).
set -euo pipefail
DOCKER=${DOCKER:-docker}
BASE=jp-standin-debian:bookworm
log() { echo "[standin-images] $*" >&2; }
have() { "$DOCKER" image inspect "$1" >/dev/null 2>&1; }

missing=()
for image in node:20-slim redis:7 nginx:stable; do
  if ! have "$image"; then missing+=("$image")
  elif [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "jp.standin"}}' "$image" 2>/dev/null)" = 1 ]; then
    log "$image: using the local stand-in built earlier from Debian packages (not the registry's image)"
  fi
done
[ ${#missing[@]} -gt 0 ] || exit 0
log "no image registry needed: building local stand-ins for ${missing[*]} from Debian packages"
[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap)"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap is missing: apt-get install -y debootstrap"; exit 1; }

WORK=$(mktemp -d /var/tmp/jp-standin.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

if ! have "$BASE"; then
  MIRROR=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
  SECURITY=$(awk '/^URIs:/ && $2 ~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$SECURITY" ] || SECURITY=http://deb.debian.org/debian-security
  ROOT=$WORK/rootfs
  log "debootstrap --variant=minbase bookworm from $MIRROR"
  debootstrap --variant=minbase --include=ca-certificates bookworm "$ROOT" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
  rm -f "$ROOT/etc/apt/sources.list"
  printf 'Types: deb\nURIs: %s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: %s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$MIRROR" "$SECURITY" > "$ROOT/etc/apt/sources.list.d/debian.sources"
  # The same apt options and locally added CAs as this machine, so apt inside reaches the mirror.
  if grep -rqs 'Check-Valid-Until "false"' /etc/apt/apt.conf.d/; then
    printf 'Acquire::Check-Valid-Until "false";\nAcquire::Check-Date "false";\n' > "$ROOT/etc/apt/apt.conf.d/99host-mirror"
  fi
  if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    chroot "$ROOT" update-ca-certificates >/dev/null 2>&1
  fi
  chroot "$ROOT" apt-get clean
  rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/var/log/*.log "$ROOT"/tmp/*
  : > "$ROOT/etc/resolv.conf"; : > "$ROOT/etc/hostname"
  tar -C "$ROOT" --numeric-owner -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' -m 'debootstrap minbase bookworm (stand-in base)' - "$BASE" >/dev/null
  rm -rf "$ROOT"
fi

if ! have node:20-slim; then
  NODE_BIN=$(readlink -f "$(command -v node)")
  NPM_DIR=$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")
  case "$("$NODE_BIN" -v)" in v20.*) ;; *) log "this machine's node is $("$NODE_BIN" -v), not 20"; exit 1;; esac
  mkdir -p "$WORK/node"
  cp "$NODE_BIN" "$WORK/node/node"
  cp -a "$NPM_DIR" "$WORK/node/npm"
  log "node:20-slim from $BASE + this machine's node $("$NODE_BIN" -v)"
  "$DOCKER" build -q -t node:20-slim -f - "$WORK/node" >"$WORK/build.log" 2>&1 <<DOCKERFILE || { cat "$WORK/build.log" >&2; exit 1; }
FROM $BASE
LABEL jp.standin=1
COPY node /usr/local/bin/node
COPY npm /usr/local/lib/node_modules/npm
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \\
 && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx \\
 && groupadd --gid 1000 node && useradd --uid 1000 --gid node --shell /bin/bash --create-home node
ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt
CMD ["node"]
DOCKERFILE
fi

if ! have redis:7; then
  log "redis:7 from $BASE + Debian's redis-server"
  "$DOCKER" build -q -t redis:7 - >"$WORK/build.log" 2>&1 <<DOCKERFILE || { cat "$WORK/build.log" >&2; exit 1; }
FROM $BASE
LABEL jp.standin=1
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* && mkdir -p /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server", "--protected-mode", "no"]
DOCKERFILE
fi

if ! have nginx:stable; then
  log "nginx:stable from $BASE + Debian's nginx-light"
  "$DOCKER" build -q -t nginx:stable - >"$WORK/build.log" 2>&1 <<DOCKERFILE || { cat "$WORK/build.log" >&2; exit 1; }
FROM $BASE
LABEL jp.standin=1
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null \
 && rm -rf /var/lib/apt/lists/* && ln -sf /dev/stdout /var/log/nginx/access.log && ln -sf /dev/stderr /var/log/nginx/error.log
EXPOSE 80
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
DOCKERFILE
fi
log "ready: $(for i in "${missing[@]}"; do printf '%s ' "$i"; done)(local stand-ins)"
