# Sourced by scripts/up and scripts/test: make ./.venv (once) and install the project
# into it, with the extras in $EXTRAS ("" or "[test]"). Works where pip refuses the
# system interpreter (PEP 668) and where Debian or Ubuntu leave out ensurepip.

set -eu
cd "$(dirname "$0")/.."
VENV=.venv

python=""
for candidate in python3 python3.14 python3.13 python3.12 python3.11 python; do
    if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "error: streamsched needs Python 3.11 or newer as python3 (e.g. apt-get install python3)" >&2
    exit 1
fi

if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    echo "creating $VENV" >&2
    rm -rf "$VENV"
    if ! "$python" -m venv "$VENV" >/dev/null 2>&1; then
        # No ensurepip (Debian's python3-venv is not installed): a venv without pip, then
        # pip into it from the system's pip (22.3 or newer) if there is one, else from
        # PyPI's wheel, checked against the sha256 PyPI gives for it.
        rm -rf "$VENV"
        "$python" -m venv --without-pip "$VENV"
        if ! "$python" -m pip --python "$VENV/bin/python" install --quiet pip 2>/dev/null; then
            "$VENV/bin/python" - <<'PY' || { echo "error: could not get pip from PyPI (see above); install python3-venv or python3-pip and run this again" >&2; exit 1; }
import hashlib, json, os, shutil, sys, tempfile, urllib.parse, urllib.request
index = "https://pypi.org/pypi/pip/json"
try:
    release = json.load(urllib.request.urlopen(index, timeout=60))
    wheel = next(f for f in release["urls"] if f["filename"].endswith(".whl"))
    path = os.path.join(tempfile.mkdtemp(), wheel["filename"])
    with urllib.request.urlopen(urllib.parse.urljoin(index, wheel["url"]), timeout=60) as source, open(path, "wb") as target:
        shutil.copyfileobj(source, target)
except OSError as exc:  # no network, a proxy, a stalled download
    sys.exit(f"error: could not download pip from PyPI: {exc}")
with open(path, "rb") as file:
    if hashlib.sha256(file.read()).hexdigest() != wheel["digests"]["sha256"]:
        sys.exit(f"error: {wheel['filename']} does not match its sha256 on PyPI")
sys.path.insert(0, path)  # a pip wheel runs from the zip file: it installs itself
from pip._internal.cli.main import main
sys.exit(main(["install", "--quiet", path]))
PY
        fi
    fi
fi

# Install again only when the project's requirements changed since the last install.
stamp="$VENV/.installed${EXTRAS:-}"
wanted="$(cat pyproject.toml)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
    echo "installing streamsched${EXTRAS:-} into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet -e ".${EXTRAS:-}"
    printf '%s' "$wanted" >"$stamp"
fi
