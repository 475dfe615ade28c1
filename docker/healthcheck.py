"""Container health checks without curl in the image (Docker HEALTHCHECK, Kubernetes exec probes).

    mstar-healthcheck http URL      200 from URL within the timeout (gateway /healthz, Triton /v2/health/ready)
    mstar-healthcheck celery [NODE] the Celery worker NODE (default mstar@<hostname>) answers a ping through the
                                    broker of the MSTAR_* settings: a hung worker or a lost broker is unhealthy
Exit 0 = healthy, 1 = unhealthy (one line on stderr says why).
"""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.error
import urllib.request


def check_http(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return None if resp.status == 200 else f"{url} answered {resp.status}"
    except (urllib.error.URLError, OSError) as err:
        return f"{url}: {err}"


def check_celery(node: str, timeout: float) -> str | None:
    # The service's own Celery app: the broker transport options (key separator, priority steps) must match the
    # worker's, or the worker cannot route its reply to this client's reply queue.
    from service.config import Settings
    from service.jobs.celery_app import make_celery

    try:
        app = make_celery(Settings())
    except Exception as err:  # no MSTAR_BROKER_URL, invalid settings
        return str(err)
    app.conf.broker_connection_timeout = timeout
    app.conf.broker_connection_retry = False
    app.conf.broker_connection_max_retries = 0
    try:
        replies = app.control.ping(destination=[node], timeout=timeout)
    except Exception as err:  # broker unreachable: the worker cannot take jobs either
        return f"broker: {err}"
    finally:
        app.close()
    if not any(node in reply for reply in replies or []):
        return f"worker {node} did not answer a ping within {timeout:g} s"
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--timeout", type=float, default=4.0)
    sub = ap.add_subparsers(dest="kind", required=True)
    http = sub.add_parser("http")
    http.add_argument("url")
    cel = sub.add_parser("celery")
    cel.add_argument("node", nargs="?", default=None)
    args = ap.parse_args(argv)
    if args.kind == "http":
        problem = check_http(args.url, args.timeout)
    else:
        problem = check_celery(args.node or f"mstar@{socket.gethostname()}", args.timeout)
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
