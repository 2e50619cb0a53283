"""berth: command-line client of berthd's API.

URL and token come from --url/--token, else env BERTH_URL/BERTH_TOKEN, else the defaults
(http://127.0.0.1:8080, no token). Exit codes: 0 ok, 1 the API answered an error, 2 usage,
3 berthd cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

EXIT_API = 1
EXIT_UNREACHABLE = 3


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def call(url: str, token: str | None, path: str) -> Any:
    request = urllib.request.Request(url.rstrip("/") + path)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        try:
            detail = json.loads(err.read())["error"]
            message = f"{detail['code']}: {detail['message']}"
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {err.code}"
        raise CliError(f"error: {message}", EXIT_API) from err
    except (urllib.error.URLError, OSError) as err:
        raise CliError(f"error: cannot reach berthd at {url}: {err}", EXIT_UNREACHABLE) from err


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [header, *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False))
                     .rstrip() for line in lines)


def show_endpoints(data: dict[str, Any]) -> str:
    rows = [[e["name"], e["status"], str(sum(r["state"] == "ready" for r in e["replicas"])),
             str(len(e["replicas"])), f"{e['spec']['min_replicas']}-{e['spec']['max_replicas']}",
             str(e["spec"]["gpus"]), e["spec"]["image"], e["error"] or ""]
            for e in data["endpoints"]]
    return table(rows, ["NAME", "STATUS", "READY", "REPLICAS", "SCALE", "GPUS", "IMAGE",
                        "ERROR"])


def show_endpoint(e: dict[str, Any]) -> str:
    head = f"{e['name']}  {e['status']}  generation {e['generation']}  image {e['spec']['image']}"
    if e["error"]:
        head += f"\nerror: {e['error']}"
    rows = [[r["id"], r["state"], r["address"] or "", ",".join(str(g.get("index", "?"))
             for g in r["gpus"]), str(r["in_flight"]), r["reason"] or ""] for r in e["replicas"]]
    return head + "\n" + table(rows, ["REPLICA", "STATE", "ADDRESS", "GPUS", "IN-FLIGHT",
                                      "REASON"])


def show_gpus(data: dict[str, Any]) -> str:
    rows = [[str(g["index"]), g["name"], f"{g['memory_mib']} MiB", g["endpoint"] or "-",
             g["replica"] or "-",
             "-" if g["utilization_pct"] is None else f"{g['utilization_pct']}%"]
            for g in data["gpus"]]
    return table(rows, ["GPU", "NAME", "MEMORY", "ENDPOINT", "REPLICA", "UTIL"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth", description="client of the berthd API")
    p.add_argument("--url", default=os.environ.get("BERTH_URL", "http://127.0.0.1:8080"))
    p.add_argument("--token", default=os.environ.get("BERTH_TOKEN"))
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    sub = p.add_subparsers(dest="command", required=True)
    endpoints = sub.add_parser("endpoints", help="list or show endpoints")
    esub = endpoints.add_subparsers(dest="action", required=True)
    esub.add_parser("ls", help="list endpoints")
    get = esub.add_parser("get", help="one endpoint with its replicas")
    get.add_argument("name")
    sub.add_parser("gpus", help="GPUs and who holds them")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    render: Callable[[dict[str, Any]], str]
    try:
        if args.command == "gpus":
            data, render = call(args.url, args.token, "/v1/gpus"), show_gpus
        elif args.action == "ls":
            data, render = call(args.url, args.token, "/v1/endpoints"), show_endpoints
        else:
            data = call(args.url, args.token, f"/v1/endpoints/{args.name}")
            render = show_endpoint
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
