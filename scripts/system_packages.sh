# Sourced by build_cpp.sh and fuzz_cpp.sh (which define `log` and `die`).
# install_missing_packages PKG...: apt-installs the Debian packages not installed yet; root only,
# else it stops naming the command to run.
install_missing_packages() {
  local missing=() package
  for package in "$@"; do
    dpkg -s "$package" 2>/dev/null | grep -q '^Status: install ok installed' || missing+=("$package")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  [[ $(id -u) -eq 0 ]] || die "missing system packages: ${missing[*]} (run: sudo apt-get install -y ${missing[*]})"
  log "installing system packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update
  apt-get install -y --no-install-recommends "${missing[@]}"
}
