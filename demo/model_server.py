"""A tiny model server for tests and the demo (stdlib only; runs in the demo image).

Behaviour is driven by the request, so one image serves every test:
  GET  /health            200, unless unhealthy (MODEL_FAIL_HEALTH=1, /fail-health, or not yet
                          MODEL_READY_DELAY_S seconds after start)
  ANY  /echo              JSON: method, path, query, headers, body, replica (HEAD: no body)
  GET  /env               the container's environment as JSON
  GET  /sleep?s=0.5       answers after sleeping; stops early if the caller hangs up
                          (counted in /stats "abandoned"); reports calls active at its start
  GET  /stats             {"active", "max_active", "abandoned", "calls"}
  GET  /bytes?n=N         N bytes, streamed in 64 KiB chunks
  POST /upload            reads the body as it streams; {"size", "sha256"}
  POST /close-listener    stop accepting connections (the process stays up)
  GET  /stream?n=5&interval=0.1   SSE: n events, interval seconds apart
  POST /fail-health       health answers 503 from now on
  POST /crash?code=3      the process exits at once with that code
  GET  /status/{code}     answers with that status code
  POST /sleep?level=1     sleep mode, as vLLM's: model calls answer 503 until woken
  POST /wake_up           leaves sleep mode after WAKE_S seconds (default 0.5)
  GET  /is_sleeping       {"is_sleeping": bool}
Env MODEL_CRASH_AFTER_S makes the process exit by itself after that many seconds; LOAD_S (or
MODEL_READY_DELAY_S) is how long the model "loads" before /health passes.
"""

import hashlib
import json
import os
import select
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

STARTED = time.monotonic()
STATE = {"healthy": os.environ.get("MODEL_FAIL_HEALTH") != "1", "asleep": False}
LOAD_S = float(os.environ.get("LOAD_S") or os.environ.get("MODEL_READY_DELAY_S") or "0")
STATS = {"active": 0, "max_active": 0, "abandoned": 0, "calls": 0}
LOCK = threading.Lock()
SERVER = []


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes

    def log_message(self, fmt, *args):
        sys.stdout.write(f"{self.address_string()} {fmt % args}\n")
        sys.stdout.flush()

    def _send(self, status, payload, ctype="application/json"):
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        if status in (204, 304):  # no body, as HTTP says
            self.send_response(status)
            self.end_headers()
            return
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Model-Replica", os.environ.get("BERTH_REPLICA", ""))
        self.end_headers()
        if self.command != "HEAD":  # HEAD: the head GET would send, no body
            self.wfile.write(body)

    def _body(self):
        if self.path.startswith("/upload"):
            return b""  # read as a stream by the handler
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return b"".join(self._chunks())
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _chunks(self):
        while True:
            length = int(self.rfile.readline().strip() or b"0", 16)
            if length == 0:
                self.rfile.readline()
                return
            yield self.rfile.read(length)
            self.rfile.readline()

    def _caller_gone(self):
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable) and self.connection.recv(1, 2) == b""  # 2 = MSG_PEEK

    def _sleep(self, seconds):
        with LOCK:
            STATS["active"] += 1
            STATS["calls"] += 1
            active = STATS["active"]
            STATS["max_active"] = max(STATS["max_active"], active)
        try:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                if self._caller_gone():
                    with LOCK:
                        STATS["abandoned"] += 1
                    self.close_connection = True
                    return
                time.sleep(min(0.02, max(0, end - time.monotonic())))
        finally:
            with LOCK:
                STATS["active"] -= 1
        # Answered once it no longer counts as active: a caller that has the whole answer
        # may call again at once, and must not find this call still counted.
        return self._send(200, {"slept": seconds, "active": active})

    def _upload(self):
        digest, size = hashlib.sha256(), 0
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            for chunk in self._chunks():
                digest.update(chunk)
                size += len(chunk)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(65536, remaining))
                digest.update(chunk)
                size += len(chunk)
                remaining -= len(chunk)
        return self._send(200, {"size": size, "sha256": digest.hexdigest()})

    def _bytes(self, count):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(count))
        self.end_headers()
        block = b"x" * 65536
        while count > 0:
            self.wfile.write(block[:count])
            count -= min(count, len(block))

    def _openai(self, path, body):
        """Just enough of the OpenAI API to show routing, model names and usage."""
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self._send(400, {"error": {"message": "not JSON", "type": "invalid"}})
        if path == "/v1/embeddings":
            return self._send(200, {"object": "list", "model": req.get("model"), "data": [
                {"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}})
        time.sleep(min(float(req.get("sleep_s", 0)), 60))  # a slow model, for timeouts
        said = " ".join(str(m.get("content", "")) for m in req.get("messages", []))
        words = len(said.split())
        if req.get("stream"):
            return self._chat_stream(req, said)
        return self._send(200, {
            "id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()),
            "model": req.get("model"), "received_model": req.get("model"),
            "received_keys": [h for h in ("Authorization", "x-api-key") if h in self.headers],
            "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant",
                                                                "content": f"echo: {said}"}}],
            "usage": {"prompt_tokens": words, "completion_tokens": words + 1,
                      "total_tokens": 2 * words + 1}})

    def _transcribe(self, body):
        """A form's fields as the model saw them: what berth sent must be the client's form."""
        boundary = self.headers.get("Content-Type", "").partition("boundary=")[2].strip('"')
        fields = {}
        for part in body.split(b"--" + boundary.encode())[1:-1]:
            head, _, value = part.partition(b"\r\n\r\n")
            name = head.partition(b'name="')[2].partition(b'"')[0].decode()
            fields[name] = value[:-2]  # the CRLF before the next delimiter
        audio = fields.get("file", b"")
        return self._send(200, {
            "text": f"{len(audio)} bytes of audio", "received_model":
            fields.get("model", b"").decode(), "audio_sha256": hashlib.sha256(audio).hexdigest(),
            "content_length": self.headers.get("Content-Length")})

    def _sleep_mode(self, path):
        """vLLM's sleep API: weights off the GPU while asleep, back in WAKE_S seconds."""
        if path == "/sleep" and self.command == "POST":
            STATE["asleep"] = True
        elif path == "/wake_up" and self.command == "POST":
            time.sleep(float(os.environ.get("WAKE_S", "0.5")))
            STATE["asleep"] = False
        return self._send(200, {"is_sleeping": STATE["asleep"]})

    def _route(self):
        received_at = time.time()
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        body = self._body()
        if path == "/health":
            ok = STATE["healthy"] and time.monotonic() - STARTED >= LOAD_S
            return self._send(200 if ok else 503, {"healthy": ok})
        if path in ("/sleep", "/wake_up", "/is_sleeping") and "s" not in query:
            return self._sleep_mode(path)
        if STATE["asleep"] and (path.startswith("/v1/") or path.startswith("/echo")):
            return self._send(503, {"error": {"message": "the model is asleep", "type": "asleep"}})
        if path == "/echo" or path.startswith("/echo/"):
            return self._send(200, {
                "method": self.command, "path": path, "raw_path": self.path, "query": query,
                "headers": dict(self.headers), "body": body.decode("utf-8", "replace"),
                "replica": os.environ.get("BERTH_REPLICA"), "received_at": received_at,
                "client_port": self.client_address[1]})
        if path in ("/v1/chat/completions", "/v1/embeddings"):
            return self._openai(path, body)
        if path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            return self._transcribe(body)
        if path == "/env":
            return self._send(200, dict(os.environ))
        if path == "/sleep":
            return self._sleep(float(query.get("s", "1")))
        if path == "/stats":
            with LOCK:
                return self._send(200, dict(STATS))
        if path == "/bytes":
            return self._bytes(int(query.get("n", "1024")))
        if path == "/upload":
            return self._upload()
        if path == "/close-listener":
            threading.Thread(target=SERVER[0].shutdown).start()
            return self._send(200, {"listening": False})
        if path == "/stream":
            return self._stream(int(query.get("n", "5")), float(query.get("interval", "0.1")),
                                query.get("type", "text/event-stream"))
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

    def _stream(self, count, interval, media_type):
        self.send_response(200)
        self.send_header("Content-Type", media_type)
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

    def _chat_stream(self, req, said):
        """A streamed chat answer: one chunk per word, usage last when asked, then [DONE]."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        words = f"echo: {said}".split()
        interval = min(float(req.get("interval_s", 0)), 10)  # paced like a real model
        chunks = [{"choices": [{"index": 0, "delta": {"content": w + " "}}]} for w in words]
        if (req.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": {
                "prompt_tokens": len(said.split()), "completion_tokens": len(words),
                "total_tokens": len(said.split()) + len(words)}})
        for i, chunk in enumerate(chunks):
            if i and interval:
                time.sleep(interval)
            body = {"id": "chatcmpl-demo", "object": "chat.completion.chunk",
                    "model": req.get("model"), "sent_at": time.time(), **chunk}
            event = f"data: {json.dumps(body)}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.wfile.flush()
        done = b"data: [DONE]\n\n"
        self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _route


def main():
    # Exit at once on SIGTERM, as real model servers do (as PID 1 the default is to ignore
    # it, and every stop would wait out the engine's timeout before SIGKILL).
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    crash_after = float(os.environ.get("MODEL_CRASH_AFTER_S", "0"))
    if crash_after > 0:
        threading.Timer(crash_after, lambda: os._exit(4)).start()
    # A thread runs until it blocks (each runs microseconds between its reads, writes and
    # sleeps): no forced switch comes between a chunk's `sent_at` stamp and its write, which
    # with hundreds of streams woken at once held a stamped chunk back for milliseconds.
    sys.setswitchinterval(1.0)
    port = int(os.environ.get("PORT", "8080"))
    ThreadingHTTPServer.request_queue_size = 1024  # a burst of connects must not hit SYN retries
    server = ThreadingHTTPServer(("0.0.0.0", port), Handler)
    server.daemon_threads = True
    SERVER.append(server)
    print(f"model server listening on {port} as {os.environ.get('BERTH_REPLICA')}", flush=True)
    server.serve_forever()
    server.socket.close()  # /close-listener: refuse connections but stay up
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
