"""Container health probe: exit 0 when the local UniCoRn service answers 200, else 1.

Used by the Dockerfile's HEALTHCHECK and docker-compose.yml (the slim runtime image has no
curl). Standard library only, so it runs on any Python.

    python healthcheck.py            # GET http://127.0.0.1:$UNICORN_PORT/healthz
    python healthcheck.py /readyz    # another path
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_SECONDS = 2.0


def probe(path: str = "/healthz", port: str | None = None) -> int:
    """GET ``path`` on loopback; 0 for HTTP 200, 1 for anything else (printed to stderr)."""
    port = port or os.environ.get("UNICORN_PORT", "8000")
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
            if response.status == 200:
                return 0
            print(f"unhealthy: GET {url} -> {response.status}", file=sys.stderr)
    except (OSError, urllib.error.URLError) as exc:  # HTTPError is a URLError
        print(f"unhealthy: GET {url} -> {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(probe(sys.argv[1] if len(sys.argv) > 1 else "/healthz"))
