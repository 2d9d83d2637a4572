# Shared helpers for the project's scripts. Source it; do not run it.

# apt-get install the named packages that are not installed yet.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "==> apt-get install ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

need_rust() {
  if ! command -v cargo >/dev/null; then
    [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
  fi
  command -v cargo >/dev/null || {
    echo "Rust is needed: install it with rustup (https://rustup.rs), then run this again." >&2
    exit 1
  }
  apt_install curl pkg-config
}

# Go builds the test cluster (e2e/cluster). Machines of this kind ship it in /usr/local/go,
# which a non-interactive shell may not have on PATH.
need_go() {
  if ! command -v go >/dev/null; then
    for d in /usr/local/go/bin "$HOME/go/bin" "$HOME/sdk/go/bin"; do
      [ -x "$d/go" ] && export PATH="$d:$PATH" && break
    done
  fi
  command -v go >/dev/null || {
    echo "Go >= 1.25 is needed to build the test cluster (e2e/cluster): install it from https://go.dev/dl" >&2
    exit 1
  }
}
