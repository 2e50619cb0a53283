"""The audit log: every control write with its actor, address, action, target and outcome,
refused ones too; never a secret value or a token; reloads by signal beside them."""

from __future__ import annotations

import json
import signal
import time

from helpers import Berthd, body, config_text

ADMIN = {"Authorization": "Bearer admin-secret"}


async def test_control_writes_and_refusals_are_recorded_without_secrets(api):
    _, client = await api()
    assert (await client.post("/v1/endpoints", json=body("llm"), headers=ADMIN)).status == 201
    assert (await client.post("/v1/endpoints", json={"name": "Bad!"}, headers=ADMIN)).status \
        == 422
    assert (await client.post("/v1/endpoints", json=body("x"))).status == 401
    resp = await client.post("/v1/endpoints/llm/tokens", headers=ADMIN)
    token = await resp.json()
    mine = {"Authorization": f"Bearer {token['token']}"}
    assert (await client.delete("/v1/endpoints/llm", headers=mine)).status == 403
    assert (await client.put("/v1/secrets/HF_TOKEN", json={"value": "hf_s3cr3t"},
                             headers=ADMIN)).status == 200
    assert (await client.patch("/v1/endpoints/llm", json={"max_replicas": 2},
                               headers={**ADMIN, "Origin": "https://evil.example"})).status \
        == 403
    assert (await client.delete(f"/v1/endpoints/llm/tokens/{token['id']}",
                                headers=ADMIN)).status == 200
    assert (await client.get("/v1/endpoints", headers=ADMIN)).status == 200  # reads: no row
    resp = await client.get("/v1/audit", headers=ADMIN)
    rows = (await resp.json())["audit"]
    seen = [(r["actor"], r["action"], r["target"], r["status"], r["outcome"]) for r in rows]
    assert seen == [
        ("admin", "endpoint.create", "llm", 201, "ok"),
        ("admin", "endpoint.create", "-", 422, "invalid"),
        ("none", "endpoint.create", "-", 401, "unauthorized"),
        ("admin", "token.create", f"llm/{token['id']}", 201, "ok"),
        (token["id"], "endpoint.delete", "llm", 403, "forbidden"),
        ("admin", "secret.set", "HF_TOKEN", 200, "ok"),
        ("admin", "endpoint.update", "llm", 403, "origin_refused"),
        ("admin", "token.revoke", f"llm/{token['id']}", 200, "ok"),
    ]
    assert all(r["remote"] == "127.0.0.1" and r["ts"] > 0 for r in rows)
    text = json.dumps(rows)
    assert "hf_s3cr3t" not in text and token["token"] not in text  # never a value or token
    mine_only = await (await client.get(f"/v1/audit?actor={token['id']}", headers=ADMIN)).json()
    assert [r["action"] for r in mine_only["audit"]] == ["endpoint.delete"]
    by_target = await (await client.get("/v1/audit?target=HF_TOKEN", headers=ADMIN)).json()
    assert [r["action"] for r in by_target["audit"]] == ["secret.set"]
    assert (await client.get("/v1/audit?since=later", headers=ADMIN)).status == 400
    assert (await client.get("/v1/audit", headers=mine)).status == 401  # revoked above


def test_reloads_by_signal_are_recorded(tmp_path, network, model_image, docker_host):
    config = tmp_path / "config.toml"
    good = config_text(tmp_path / "state", network, model_image, {}, "min_free_disk = 0")
    config.write_text(good)
    d = Berthd(tmp_path, config)
    try:
        d.wait_message("READY=1")
        config.write_text(good + "\n[endpoints.Bad]\nimage = 1\n")
        d.signal(signal.SIGHUP)
        d.wait_message("READY=1")
        config.write_text(good)
        d.signal(signal.SIGHUP)
        d.wait_message("READY=1")
        for _ in range(50):
            _, answer = d.get("/v1/audit?actor=sighup")
            if len(answer["audit"]) == 2:
                break
            time.sleep(0.1)
        assert [(r["action"], r["target"], r["outcome"]) for r in answer["audit"]] == [
            ("config.reload", str(config), "refused: 2 error(s)"),
            ("config.reload", str(config), "ok")]
    finally:
        d.close()
