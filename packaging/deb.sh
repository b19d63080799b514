#!/usr/bin/env bash
# Builds the Debian package from the release binary, without building again:
# man pages and completions from the binary's own clap definitions, then
# `cargo deb --no-build` (metadata: [package.metadata.deb] in Cargo.toml).
# Prints the package's path on its last line.
#
#   cargo build --release --locked --features legacy-tls --bin xoauth2-proxy
#   bash packaging/deb.sh                      # -> target/debian/xoauth2-proxy_<version>-1_<arch>.deb
#
# Needs cargo-deb (cargo install cargo-deb --locked --no-default-features) and xz-utils.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${PACKAGING_BIN:-target/release/xoauth2-proxy}
[[ -x $BIN ]] || { echo "no release binary at $BIN: cargo build --release --locked --features legacy-tls --bin xoauth2-proxy" >&2; exit 1; }
# The package promises local_tls_profile: legacy (README "Legacy TLS").
[[ $("$BIN" --version) == *legacy-tls* ]] || {
  echo "$BIN was built without the legacy-tls feature: cargo build --release --locked --features legacy-tls --bin xoauth2-proxy" >&2
  exit 1
}
command -v cargo-deb >/dev/null || { echo "cargo-deb is missing: cargo install cargo-deb --locked --no-default-features" >&2; exit 1; }
# The paths Cargo.toml's assets list (not under target/release, which cargo-deb
# treats as build output and would not compress).
rm -rf target/packaging
"$BIN" generate man target/packaging/man
"$BIN" generate completions target/packaging/completions
cargo deb --no-build --locked --quiet --output target/debian/ | tail -n 1
