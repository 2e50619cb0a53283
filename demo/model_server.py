"""A tiny model server for tests and the demo (stdlib only; runs in the demo image).

Behaviour is driven by the request, so one image serves every test:
  GET  /health            200, unless unhealthy (MODEL_FAIL_HEALTH=1, /fail-health, or not yet
                          MODEL_READY_DELAY_S seconds after start)
  ANY  /echo              JSON: method, path, query, headers, body, replica
  GET  /env               the container's environment as JSON
  GET  /sleep?s=0.5       answers after sleeping
  GET  /stream?n=5&interval=0.1   SSE: n events, interval seconds apart
  POST /fail-health       health answers 503 from now on
  POST /crash?code=3      the process exits at once with that code
  GET  /status/{code}     answers with that status code
Env MODEL_CRASH_AFTER_S makes the process exit by itself after that many seconds.
"""

import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

STARTED = time.monotonic()
STATE = {"healthy": os.environ.get("MODEL_FAIL_HEALTH") != "1"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        sys.stdout.write(f"{self.address_string()} {fmt % args}\n")
        sys.stdout.flush()

    def _send(self, status, payload, ctype="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Model-Replica", os.environ.get("BERTH_REPLICA", ""))
        self.end_headers()
        self.wfile.write(body)

    def _body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _route(self):
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        body = self._body()
        if path == "/health":
            delay = float(os.environ.get("MODEL_READY_DELAY_S", "0"))
            ok = STATE["healthy"] and time.monotonic() - STARTED >= delay
            return self._send(200 if ok else 503, {"healthy": ok})
        if path == "/echo":
            return self._send(200, {
                "method": self.command, "path": path, "query": query,
                "headers": dict(self.headers), "body": body.decode("utf-8", "replace"),
                "replica": os.environ.get("BERTH_REPLICA")})
        if path == "/env":
            return self._send(200, dict(os.environ))
        if path == "/sleep":
            time.sleep(float(query.get("s", "1")))
            return self._send(200, {"slept": float(query.get("s", "1"))})
        if path == "/stream":
            return self._stream(int(query.get("n", "5")), float(query.get("interval", "0.1")))
        if path == "/fail-health":
            STATE["healthy"] = False
            return self._send(200, {"healthy": False})
        if path == "/crash":
            sys.stdout.write("crashing on request\n")
            sys.stdout.flush()
            os._exit(int(query.get("code", "3")))
        if path.startswith("/status/"):
            return self._send(int(path.rsplit("/", 1)[1]), {"status": path.rsplit("/", 1)[1]})
        return self._send(404, {"error": "no such path", "path": path})

    def _stream(self, count, interval):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(count):
            event = f"data: {json.dumps({'i': i, 't': time.time()})}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
            if i < count - 1:
                time.sleep(interval)
        self.wfile.write(b"0\r\n\r\n")

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _route


def main():
    crash_after = float(os.environ.get("MODEL_CRASH_AFTER_S", "0"))
    if crash_after > 0:
        threading.Timer(crash_after, lambda: os._exit(4)).start()
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    print(f"model server listening on {port} as {os.environ.get('BERTH_REPLICA')}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
