#!/usr/bin/env bash
# Builds packaging/container/Containerfile with buildah (chroot isolation, vfs
# storage: no daemon, no privileges beyond root in this sandbox) where no
# container registry is reachable, as on this project's CI machine:
#   - both base images (the Rust builder and distroless) are replaced by one
#     stand-in, Debian bookworm "minbase" made with debootstrap from the Debian
#     mirror (cached) and imported into a private buildah storage;
#   - the build stage takes the release binary already built (PREBUILT) instead
#     of compiling, since the stand-in has no Rust toolchain;
#   - the image is then inspected (user, volumes, health check, entry point) and
#     its binary run inside it (`check` on the image's own config).
# So this proves the Containerfile's stages, layout, ownership and metadata; it
# does not prove the real bases (rust:*-slim-bookworm, distroless/cc-debian12).
#
#   bash packaging/container/build.sh target/release/xoauth2-proxy
#
# The last line printed is the outcome. Exit 0 when the image was built and
# checked, or when this machine cannot build at all (the line says why);
# exit 1 when the Containerfile itself fails.
set -euo pipefail
cd "$(dirname "$0")/../.."

BIN=${1:?usage: build.sh RELEASE_BINARY}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/xoauth2-proxy-ci
BASE_TAR=$CACHE/bookworm-minbase.tar
WORK=$(mktemp -d -t xoauth2-proxy-container.XXXXXX)
STORE=(--root "$WORK/storage" --runroot "$WORK/runroot" --storage-driver vfs)
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
trap 'buildah "${STORE[@]}" rm --all >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT

say() { printf '[container] %s\n' "$*" >&2; }
cannot() { echo "NOT BUILT on this machine: $*"; exit 0; }
fail() { echo "FAILED: $*"; exit 1; }

if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing buildah and debootstrap"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      buildah debootstrap >/dev/null; } || cannot "apt-get could not install buildah and debootstrap"
fi

if [[ ! -s $BASE_TAR ]]; then
  say "making the stand-in base: debootstrap --variant=minbase bookworm ($MIRROR)"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 5 "$WORK/debootstrap.log" >&2; cannot "debootstrap failed (see above)"; }
  # No apt lists or caches in the image.
  rm -rf "$WORK/rootfs"/var/cache/apt/archives/*.deb "$WORK/rootfs"/var/lib/apt/lists/*
  tar -C "$WORK/rootfs" -cf "$BASE_TAR.tmp" . && mv "$BASE_TAR.tmp" "$BASE_TAR"
  rm -rf "$WORK/rootfs"
fi

say "importing the stand-in base into a private vfs storage"
base=$(buildah "${STORE[@]}" from scratch 2>"$WORK/err") || cannot "buildah from scratch: $(cat "$WORK/err")"
buildah "${STORE[@]}" add "$base" "$BASE_TAR" / >/dev/null 2>"$WORK/err" || cannot "buildah add: $(cat "$WORK/err")"
buildah "${STORE[@]}" commit --quiet "$base" localhost/bookworm-minbase >/dev/null 2>"$WORK/err" \
  || cannot "buildah commit: $(cat "$WORK/err")"

# The build context: what the build stage reads when PREBUILT is set.
mkdir -p "$WORK/context/packaging/debian" "$WORK/context/prebuilt"
cp packaging/debian/config.yaml "$WORK/context/packaging/debian/"
cp "$BIN" "$WORK/context/prebuilt/xoauth2-proxy"
say "buildah bud (isolation chroot, docker format for HEALTHCHECK)"
started=$SECONDS
if ! buildah "${STORE[@]}" bud --isolation chroot --format docker --quiet \
  --build-arg BUILDER=localhost/bookworm-minbase --build-arg RUNTIME=localhost/bookworm-minbase \
  --build-arg PREBUILT=prebuilt/xoauth2-proxy \
  -f "$PWD/packaging/container/Containerfile" -t localhost/xoauth2-proxy:ci "$WORK/context" >"$WORK/bud.log" 2>&1; then
  tail -n 20 "$WORK/bud.log" >&2
  fail "buildah bud failed on the Containerfile (log above)"
fi
took=$((SECONDS - started))

inspect() { buildah "${STORE[@]}" inspect --type image --format "$1" localhost/xoauth2-proxy:ci; }
user=$(inspect '{{.Docker.Config.User}}')
volumes=$(inspect '{{range $k, $v := .Docker.Config.Volumes}}{{$k}} {{end}}')
health=$(inspect '{{.Docker.Config.Healthcheck.Test}}')
entry=$(inspect '{{.Docker.Config.Entrypoint}} {{.Docker.Config.Cmd}}')
[[ $user == 65532:65532 ]] || fail "image user is '$user'"
[[ $volumes == *"/etc/xoauth2-proxy"* && $volumes == *"/var/lib/xoauth2-proxy"* ]] || fail "volumes: $volumes"
[[ $health == *"probe http://127.0.0.1:9464/healthz"* ]] || fail "health check: $health"
say "user $user; volumes $volumes; health check $health; entry point $entry"

ctr=$(buildah "${STORE[@]}" from localhost/xoauth2-proxy:ci)
checked=$(buildah "${STORE[@]}" run --isolation chroot --user 65532:65532 "$ctr" -- \
  /usr/bin/xoauth2-proxy check -c /etc/xoauth2-proxy/config.yaml 2>&1) \
  || fail "the image's binary rejects the image's config: $checked"
say "inside the image, as 65532: ${checked%%$'\n'*}"
mnt_owner=$(buildah "${STORE[@]}" run --isolation chroot "$ctr" -- stat -c '%u:%g %a' /var/lib/xoauth2-proxy)
[[ $mnt_owner == "65532:65532 700" ]] || fail "/var/lib/xoauth2-proxy in the image is $mnt_owner"
size=$(buildah "${STORE[@]}" images --format '{{.Size}}' localhost/xoauth2-proxy:ci | head -n 1)
echo "built with buildah $(buildah --version | awk '{print $3}') (chroot, vfs) in ${took}s on a debootstrap bookworm minbase standing in for both bases: ${size}, runs as 65532, config and token store volumes, HEALTHCHECK probe /healthz; real bases untested (no registry reachable)"
