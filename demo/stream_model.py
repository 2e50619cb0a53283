"""A lean streaming chat model for benchmarks (stdlib asyncio, one thread; in the demo image
as /srv/stream_model.py).

Why: model_server.py runs a thread per connection. With 500 streamed chats its threads took
1.1-1.2 s of CPU a round, twice berthd's, on a 2-core box, so a benchmark of berth's relay
measured the test model's contention. Real model servers (vLLM's) stream every call from one
event loop; so does this one, at a few tens of microseconds a chunk.

  GET  /health                200
  POST /v1/chat/completions   as model_server.py answers it: with `"stream": true` one SSE
                              chunk per word of "echo: <messages>", `interval_s` apart, the
                              usage chunk last when stream_options.include_usage, then [DONE];
                              else one JSON answer with usage. Each streamed chunk carries
                              `sent_at`: time.time() as it is written (host and container
                              share the clock).
Requests have a Content-Length body (or none); connections are kept alive.
"""

import asyncio
import json
import os
import signal
import time

DONE = b"data: [DONE]\n\n"
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
               b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")


class Connection(asyncio.Protocol):
    """One client connection: requests one after the other, a stream's timers in between."""

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
        self.streaming = False
        self.close_after = False

    def data_received(self, data):
        self.buffer += data
        self.next_request()

    def next_request(self):
        if self.streaming:
            return  # (the next request is read when this stream ends)
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        lines = head.split(b"\r\n")
        method, target = lines[0].split(b" ")[:2]
        fields = dict(line.partition(b":")[::2] for line in lines[1:])
        fields = {name.strip().lower(): value.strip() for name, value in fields.items()}
        length = int(fields.get(b"content-length", b"0"))
        if len(rest) < length:
            return
        body, self.buffer = rest[:length], rest[length:]
        self.close_after = fields.get(b"connection", b"").lower() == b"close"
        self.route(method, target.partition(b"?")[0], body)

    def route(self, method, path, body):
        if path == b"/health":
            return self.answer(200, {"healthy": True})
        if method != b"POST" or path != b"/v1/chat/completions":
            return self.answer(404, {"error": "no such path", "path": path.decode()})
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            return self.answer(400, {"error": {"message": "not JSON", "type": "invalid"}})
        said = " ".join(str(m.get("content", "")) for m in req.get("messages", []))
        if req.get("stream"):
            return self.stream(req, said)
        words = len(said.split())
        return self.answer(200, {
            "id": "chatcmpl-demo", "object": "chat.completion", "created": int(time.time()),
            "model": req.get("model"), "choices": [{"index": 0, "finish_reason": "stop",
                                                    "message": {"role": "assistant",
                                                                "content": f"echo: {said}"}}],
            "usage": {"prompt_tokens": words, "completion_tokens": words + 1,
                      "total_tokens": 2 * words + 1}})

    def answer(self, status, payload):
        body = json.dumps(payload).encode()
        self.transport.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
        self.ended()

    def stream(self, req, said):
        words = f"echo: {said}".split()
        chunks = [{"choices": [{"index": 0, "delta": {"content": w + " "}}]} for w in words]
        if (req.get("stream_options") or {}).get("include_usage"):
            chunks.append({"choices": [], "usage": {
                "prompt_tokens": len(said.split()), "completion_tokens": len(words),
                "total_tokens": len(said.split()) + len(words)}})
        interval = min(float(req.get("interval_s", 0)), 10)
        self.streaming = True
        self.transport.write(STREAM_HEAD)
        self.send(req.get("model"), chunks, 0, interval)

    def send(self, model, chunks, i, interval):
        if self.transport.is_closing():
            return  # the client left
        body = {"id": "chatcmpl-demo", "object": "chat.completion.chunk", "model": model,
                "sent_at": time.time(), **chunks[i]}
        event = b"data: %s\n\n" % json.dumps(body).encode()
        self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
        if i + 1 < len(chunks):
            asyncio.get_running_loop().call_later(interval, self.send, model, chunks, i + 1,
                                                  interval)
            return
        self.transport.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(DONE), DONE))
        self.streaming = False
        self.ended()

    def ended(self):
        if self.close_after:
            self.transport.close()
        elif self.buffer:
            self.next_request()


async def serve(port):
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: os._exit(0))  # (as model_server.py)
    server = await loop.create_server(Connection, "0.0.0.0", port, backlog=1024)
    print(f"stream model listening on {port} as {os.environ.get('BERTH_REPLICA')}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(serve(int(os.environ.get("PORT", "8080"))))
