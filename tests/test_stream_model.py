"""demo/stream_model.py, the benchmarks' lean streaming model, as berth runs it from the demo
image: streamed chats (one chunk per word, each stamped, usage last, [DONE]) and JSON ones,
on a kept-alive connection to the replica."""

from __future__ import annotations

import json
import time

import aiohttp

from build_image import PYTHON

COMMAND = [PYTHON, "-u", "/srv/stream_model.py"]


async def test_the_stream_model_streams_stamped_chunks_and_answers_json(front):
    address, _ = await front(command=COMMAND)
    url = f"http://{address}/v1/chat/completions"
    ask = {"model": "h", "messages": [{"role": "user", "content": "one two three"}]}
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # (the second on the connection the first left idle)
            began = time.time()
            async with session.post(url, json={**ask, "stream": True, "interval_s": 0.01,
                                               "stream_options": {"include_usage": True}}) as r:
                assert r.status == 200 and r.content_type == "text/event-stream"
                events = (await r.read()).decode().split("\n\n")
            data = [e.removeprefix("data: ") for e in events if e]
            assert data[-1] == "[DONE]"
            chunks = [json.loads(d) for d in data[:-1]]
            words = [c["choices"][0]["delta"]["content"] for c in chunks[:-1]]
            assert words == ["echo: ", "one ", "two ", "three "]
            assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4,
                                           "total_tokens": 7}
            stamps = [c["sent_at"] for c in chunks]
            assert began <= stamps[0] and stamps == sorted(stamps)
            assert stamps[-1] - stamps[0] >= 0.03  # four gaps of interval_s
        async with session.post(url, json=ask) as r:
            answer = await r.json()
        assert r.status == 200 and answer["model"] == "h"
        assert answer["choices"][0]["message"]["content"] == "echo: one two three"
        assert answer["usage"]["completion_tokens"] == 4
