"""Open the MLflow UI over the local store of a study's output folder, on 127.0.0.1.

    python -m apollo_ray.ui                        # outputs/mlflow.db at http://127.0.0.1:5000
    python -m apollo_ray.ui --output-dir outputs --port 5001

Loopback only unless you pass `--host` (the UI has no authentication): on a remote machine
forward the port instead (`ssh -L 5000:127.0.0.1:5000 HOST`). Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import socket
import sys
from pathlib import Path

from apollo_ray.records.mlflow_server import DB_NAME, LocalServer

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apollo_ray.ui",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--output-dir", default="outputs", help="a study's output_dir (default: outputs)"
    )
    parser.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    parser.add_argument(
        "--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)"
    )
    args = parser.parse_args(argv)
    if not (Path(args.output_dir) / DB_NAME).exists():
        print(
            f"error: no MLflow store at {Path(args.output_dir) / DB_NAME}; run a study first "
            "(python -m apollo_ray.tune search_spaces/small.yaml)",
            file=sys.stderr,
        )
        return 2
    if not _free(args.host, args.port):
        print(
            f"error: --port {args.port}: {args.host}:{args.port} is in use (an MLflow UI already "
            "running? it shows the same store); choose another with --port",
            file=sys.stderr,
        )
        return 2
    server = LocalServer(args.output_dir, port=args.port, host=args.host)
    try:
        with server:
            print(f"MLflow UI: {server.uri}  (store {server.backend}; Ctrl-C stops it)")
            server.process.wait()
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _free(host: str, port: int) -> bool:
    """Whether a server could listen on `host:port` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


if __name__ == "__main__":
    sys.exit(main())
