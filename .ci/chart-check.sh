#!/usr/bin/env bash
# Offline checks of the Helm chart in helm/crisp-bridge: lint with Helm's engine
# (PyPI helm-python-sdk, no helm binary), values schema, renders, strict
# Kubernetes schema validation and behaviour assertions. See .ci/chart_check.py.
#
# Usage (from anywhere; idempotent, never reads stdin):
#   bash .ci/chart-check.sh
# Environment:
#   CHART_VENV                virtualenv to create/reuse (default /tmp/crisp-bridge-chart-venv)
#   CHART_CHECK_KUBE_VERSION  Kubernetes version to validate against (default 1.33.0)
#   PYTHON                    interpreter for the venv (default python3; needs >= 3.11 for tomllib)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${CHART_VENV:-/tmp/crisp-bridge-chart-venv}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'; then
    echo "chart-check: $python is older than 3.11 (tomllib needed)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
"$venv/bin/python" -m pip install --quiet \
    helm-python-sdk kubernetes-validate jsonschema pyyaml </dev/null

# chart_check.py makes a throwaway certificate for the rendered [amqp.tls] config.
if ! command -v openssl >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq openssl
fi

cd "$repo_root"
exec "$venv/bin/python" .ci/chart_check.py </dev/null
