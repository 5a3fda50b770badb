"""Stand-in children for the supervisor's tests (real processes, run with the test's Python).

- ``serve PORT [FILE]``: HTTP on 127.0.0.1:PORT; /healthz is 200, or 503 while FILE does not exist.
- ``refuse CHECK``: what a process that refuses its configuration does: one line on stderr, status 2.
- ``crash FILE``: increments the counter in FILE and crashes with a message that differs every time.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path


def serve(port: int, gate: Path | None) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            healthy = gate is None or gate.exists()
            self.send_response(200 if healthy else 503)
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the http.server API
            pass

    HTTPServer(("127.0.0.1", port), Handler).serve_forever()


def main() -> None:
    command = sys.argv[1]
    if command == "serve":
        serve(int(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
    elif command == "refuse":
        sys.stderr.write("some log line\n")
        sys.stderr.write(
            f"comptoir auth: refusing to start: in production: {sys.argv[2]} HTTPS: a TLS-terminating proxy is "
            "declared (fix: set TLS_TERMINATING_PROXY=true)\n"
        )
        raise SystemExit(2)
    elif command == "crash":
        counter = Path(sys.argv[2])
        count = int(counter.read_text()) + 1 if counter.exists() else 1
        counter.write_text(str(count))
        sys.stderr.write(f"crash number {count}\n")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
