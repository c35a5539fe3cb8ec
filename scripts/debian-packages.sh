# Debian package lists shared by scripts/start and scripts/test (sourced, not run).
# Runtime: bookworm's python3-* libraries, the floor the Debian package depends on.
RUNTIME_PACKAGES="python3 python3-gevent python3-h2 python3-wsproto python3-cryptography python3-dnslib python3-prometheus-client"
# Tests: the clients and tools the suite drives the appliance with, the same libraries for the
# second run on /usr/bin/python3, and python3-venv for the run on the newest PyPI releases.
# The Debian package (`make deb`, packaging/debian) and tests/packaging, which builds, lints,
# installs, runs and purges it: debhelper with pybuild, lintian, systemd-analyze, logrotate.
PACKAGING_PACKAGES="make dpkg-dev debhelper dh-python python3-setuptools lintian systemd logrotate adduser"
TEST_PACKAGES="$RUNTIME_PACKAGES $PACKAGING_PACKAGES python3-venv python3-pip python3-pytest python3-hypothesis python3-httpx python3-websockets python3-python-socks python3-socks python3-async-timeout python3-hypercorn curl ca-certificates nodejs chromium libnss3-tools iptables iproute2 openssl dnsutils"

# apt_install PKG...: install the packages that are missing (apt-get update only when needed).
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
