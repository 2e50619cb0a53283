"""berth: command-line client of berthd's API.

URL and token come from --url/--token, else env BERTH_URL/BERTH_TOKEN, else the local config
(--config, default /etc/berth/config.toml: daemon.listen and daemon.admin_token_file), else
http://127.0.0.1:8080 with no token. Tables for people, --json for scripts. These global options
may come before or after the subcommand (`berth endpoints ls --json`); given in both places,
the later wins. Exit codes: 0 ok, 1 the API answered an error (printed as one line), 2 usage or
a bad file, 3 berthd unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

EXIT_API = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
DEFAULT_CONFIG = "/etc/berth/config.toml"


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class Client:
    """One berthd, over HTTP."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def _request(self, method: str, path: str, body: Any = None) -> urllib.request.Request:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        return request

    def call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            with urllib.request.urlopen(self._request(method, path, body), timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except ValueError as err:  # (JSONDecodeError, UnicodeDecodeError)
            raise CliError(f"error: {self.url} did not answer as berthd does (not JSON): is "
                           "--url right?", EXIT_API) from err
        except urllib.error.HTTPError as err:
            raise CliError(f"error: {_api_error(err)}", EXIT_API) from err
        except (urllib.error.URLError, OSError) as err:
            raise CliError(f"error: cannot reach berthd at {self.url}: {err}",
                           EXIT_UNREACHABLE) from err

    def download(self, path: str, dest: Path) -> int:
        """Save a streamed answer to `dest` whole or not at all (written beside, then renamed);
        its size."""
        part = dest.with_name(dest.name + ".part")
        try:
            with urllib.request.urlopen(self._request("GET", path), timeout=600) as resp, \
                    open(part, "wb") as out:
                shutil.copyfileobj(resp, out, 1024 * 1024)
            os.replace(part, dest)
            return dest.stat().st_size
        except urllib.error.HTTPError as err:
            raise CliError(f"error: {_api_error(err)}", EXIT_API) from err
        except (urllib.error.URLError, OSError) as err:
            raise CliError(f"error: cannot save {dest} from {self.url}: {err}",
                           EXIT_UNREACHABLE) from err
        finally:
            part.unlink(missing_ok=True)

    def lines(self, path: str) -> Iterator[str]:
        """A streamed text answer, line by line (logs)."""
        try:
            with urllib.request.urlopen(self._request("GET", path), timeout=None) as resp:
                for raw in resp:
                    yield raw.decode("utf-8", "replace").rstrip("\n")
        except urllib.error.HTTPError as err:
            raise CliError(f"error: {_api_error(err)}", EXIT_API) from err
        except (urllib.error.URLError, OSError) as err:
            raise CliError(f"error: cannot reach berthd at {self.url}: {err}",
                           EXIT_UNREACHABLE) from err


def _api_error(err: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(err.read())["error"]
        return f"{detail['code']}: {detail['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {err.code}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=False))
                     .rstrip() for line in [header, *rows])


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


# --- renderers: API JSON -> text for people ---------------------------------------------------

def show_endpoints(data: dict[str, Any]) -> str:
    rows = [[e["name"], e["status"], str(sum(r["state"] == "ready" for r in e["replicas"])),
             str(len(e["replicas"])), f"{e['spec']['min_replicas']}-{e['spec']['max_replicas']}",
             str(e["spec"]["gpus"]), e["source"], e["spec"]["image"], e["error"] or ""]
            for e in data["endpoints"]]
    return table(rows, ["NAME", "STATUS", "READY", "REPLICAS", "SCALE", "GPUS", "SOURCE",
                        "IMAGE", "ERROR"])


def show_endpoint(e: dict[str, Any]) -> str:
    head = (f"{e['name']}  {e['status']}  generation {e['generation']}  source {e['source']}  "
            f"image {e['spec']['image']} ({e.get('image', 'unknown')})  in flight "
            f"{e['in_flight']}  queued {e['queued']}")
    if e["error"]:
        head += f"\nerror: {e['error']}"
    if e.get("cache"):
        size = e["cache"]["size_bytes"]
        head += (f"\ncache {e['cache']['volume']} at {e['cache']['path']}: "
                 + (f"{size / 1024 ** 2:.1f} MiB" if size is not None else "size unknown"))
    if e.get("starts"):
        last, median = e["starts"]["last"], e["starts"]["median"]
        head += (f"\nlast start {phases(last)}; median of last {e['starts']['count']} "
                 f"{phases(median)}")
    rows = [[r["id"], r["state"], r["address"] or "",
             ",".join(str(g.get("index", "?")) for g in r["gpus"]) or "-",
             gpu_memory(r.get("gpu_memory_used_mib") or {}), str(r["in_flight"]),
             when(r["last_call_at"]), r["reason"] or ""] for r in e["replicas"]]
    return head + "\n" + table(rows, ["REPLICA", "STATE", "ADDRESS", "GPUS", "GPU MEM",
                                      "IN-FLIGHT", "LAST CALL", "REASON"])


def gpu_memory(used: dict[str, int]) -> str:
    return f"{sum(used.values())} MiB" if used else "-"


def phases(start: dict[str, float]) -> str:
    return (f"{start['total_s']:.1f} s (pull {start['pull_s']:.1f}, create "
            f"{start['create_s']:.1f}, start {start['start_s']:.1f}, load {start['load_s']:.1f})")


def gpu_health(g: dict[str, Any]) -> str:
    if not g["healthy"]:
        return f"unhealthy: {g['health_reason']}"
    return f"cordoned: {g['cordon_reason']}" if g["cordoned"] else "ok"


def holder(g: dict[str, Any]) -> tuple[str, str]:
    """(endpoint, replica) columns: the whole-GPU holder, or each share with its memory."""
    if g.get("shares"):
        return (",".join(sorted({s["endpoint"] or "?" for s in g["shares"]})),
                ", ".join(f"{s['replica']} ({s['memory_mib']} MiB)" for s in g["shares"]))
    lent = f" (asleep; lent to {g['lent_to']})" if g.get("lent_to") else ""
    return g["endpoint"] or "-", (g["replica"] or "-") + lent


def show_gpus(data: dict[str, Any]) -> str:
    rows = [[str(g["index"]), g["name"], f"{g['memory_mib']} MiB", *holder(g),
             "-" if g["utilization_pct"] is None else f"{g['utilization_pct']}%", gpu_health(g)]
            for g in data["gpus"]]
    return table(rows, ["GPU", "NAME", "MEMORY", "ENDPOINT", "REPLICA", "UTIL", "HEALTH"])


def show_tasks(data: dict[str, Any]) -> str:
    rows = [[t["id"], t["endpoint"], t["status"], str(t["attempts"]), when(t["created_at"]),
             str((t["result"] or {}).get("status", "-")), t["error"] or ""]
            for t in data["tasks"]]
    return table(rows, ["TASK", "ENDPOINT", "STATUS", "ATTEMPTS", "CREATED", "RESULT",
                        "ERROR"])


def show_task_counts(data: dict[str, Any]) -> str:
    rows = [[c["endpoint"], c["status"], str(c["count"])] for c in data["counts"]]
    return table(rows, ["ENDPOINT", "STATUS", "TASKS"])


def show_task(t: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {v}" for k, v in t.items())


def show_tokens(data: dict[str, Any]) -> str:
    return table([[t["id"], t["endpoint"], when(t["created_at"]),
                   str(t.get("requests_per_minute") or "-"), str(t.get("tokens_per_day") or "-")]
                  for t in data["tokens"]], ["ID", "ENDPOINT", "CREATED", "RPM", "TPD"])


def show_audit(data: dict[str, Any]) -> str:
    return table([[when(a["ts"]), a["actor"], a["remote"], a["action"], a["target"],
                   str(a["status"] or "-"), a["outcome"]] for a in data["audit"]],
                 ["TIME", "ACTOR", "FROM", "ACTION", "TARGET", "STATUS", "OUTCOME"])


def show_usage(data: dict[str, Any]) -> str:
    key = {"token": ["token"], "model": ["endpoint", "model"]}.get(data["group_by"],
                                                                   [data["group_by"]])
    counts = ["calls", "errors", "prompt_tokens", "completion_tokens"]
    rows = [[str(u[k]) for k in [*key, *counts]] for u in data["usage"]]
    rows.append(["total", *[""] * (len(key) - 1), *(str(data["total"][k]) for k in counts)])
    return table(rows, [k.upper() for k in key] + ["CALLS", "ERRORS", "PROMPT", "COMPLETION"])


def show_secrets(data: dict[str, Any]) -> str:
    return table([[s["name"], when(s["created_at"]), when(s["updated_at"])]
                  for s in data["secrets"]], ["NAME", "CREATED", "UPDATED"])


def show_events(data: dict[str, Any]) -> str:
    return table([[when(e["ts"]), e["kind"], e["endpoint"] or "-", e["replica"] or "-",
                   e["message"]] for e in data["events"]],
                 ["TIME", "KIND", "ENDPOINT", "REPLICA", "MESSAGE"])


def show_message(template: str) -> Callable[[dict[str, Any]], str]:
    """A one-line confirmation, e.g. "deleted {name}" filled from the API's answer."""
    return lambda data: template.format(**data)


# --- apply -f --------------------------------------------------------------------------------

def read_specs(path: str) -> list[dict[str, Any]]:
    """Endpoints from a TOML or JSON file: [endpoints.NAME] tables, {"endpoints": {...}},
    a list of specs, or one spec with a name."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data = _parse(path, raw)
    except (OSError, ValueError) as exc:
        raise CliError(f"error: cannot read {path}: {exc}", EXIT_USAGE) from exc
    if isinstance(data, list):
        return data
    if isinstance(data, dict) and isinstance(data.get("endpoints"), dict):
        return [{**spec, "name": name} for name, spec in data["endpoints"].items()]
    if isinstance(data, dict) and "name" in data:
        return [data]
    raise CliError(f"error: {path} holds no endpoints ([endpoints.NAME] tables, a list of "
                   "specs, or one spec with a name)", EXIT_USAGE)


def _parse(path: str, raw: bytes) -> Any:
    """JSON for .json, TOML for .toml; otherwise whichever of the two parses."""
    if path.endswith(".json"):
        return json.loads(raw)
    if path.endswith(".toml"):
        return tomllib.loads(raw.decode())
    try:
        return json.loads(raw)
    except ValueError:
        return tomllib.loads(raw.decode())


def apply(client: Client, path: str, as_json: bool) -> int:
    results, failed = [], 0
    for spec in read_specs(path):
        name = str(spec.get("name", ""))
        try:
            body = client.call("PUT", f"/v1/endpoints/{q(name)}", spec)
            results.append(body)
            if not as_json:
                print(f"applied {name} (generation {body['generation']}, {body['status']})")
        except CliError as exc:
            if exc.code != EXIT_API:
                raise
            failed += 1
            print(f"{name}: {exc}", file=sys.stderr)
    if as_json:
        print(json.dumps(results, indent=2))
    return EXIT_API if failed else 0


# --- argument parsing ---------------------------------------------------------------------------

def global_options(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--url, --token, --config, --json. Given to the top-level parser with their real defaults,
    and to every subcommand with none (argparse.SUPPRESS), so that they may follow the
    subcommand as users type them (`berth endpoints ls --json`) and a later one wins."""
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value
    parser.add_argument("--url", default=default(None),
                        help="berthd URL (env BERTH_URL; else the local config)")
    parser.add_argument("--token", default=default(None),
                        help="admin or endpoint token (env BERTH_TOKEN)")
    parser.add_argument("--config", default=default(DEFAULT_CONFIG),
                        help="local berthd config to read the URL and admin token from")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print the API's JSON")


Adder = Callable[..., argparse.ArgumentParser]  # add_parser of one level of subcommands


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="berth", description="client of the berthd API")
    global_options(p)
    common = argparse.ArgumentParser(add_help=False)
    global_options(common, suppress=True)

    def commands(parent: argparse.ArgumentParser, dest: str, required: bool = True) -> Adder:
        """add_parser of `parent`'s subcommands, each taking the global options too."""
        sub = parent.add_subparsers(dest=dest, required=required)
        return lambda name, **kw: sub.add_parser(name, parents=[common], **kw)

    command = commands(p, "command")
    for add in (_endpoint_commands, _task_commands, _token_commands, _secret_commands,
                _gpu_commands):
        add(command, commands)
    _other_commands(command)
    return p


def _endpoint_commands(command: Adder, commands: Callable[..., Adder]) -> None:
    action = commands(command("endpoints", help="endpoints"), "action")
    action("ls", help="list endpoints")
    action("get", help="one endpoint with its replicas").add_argument("name")
    ap = action("apply", help="create or replace endpoints from a TOML or JSON file")
    ap.add_argument("-f", "--file", required=True)
    rm = action("delete", help="drain, stop and forget an endpoint")
    rm.add_argument("name")
    rm.add_argument("--purge-cache", action="store_true", help="remove its cache volume too")
    action("restart", help="replace every replica by a fresh one, new first").add_argument(
        "name")
    sc = action("scale", help="change min/max replicas")
    sc.add_argument("name")
    sc.add_argument("--min", type=int, dest="min_replicas")
    sc.add_argument("--max", type=int, dest="max_replicas")


def _task_commands(command: Adder, commands: Callable[..., Adder]) -> None:
    action = commands(command("tasks", help="async tasks"), "action")
    tls = action("ls", help="list tasks")
    tls.add_argument("--endpoint")
    tls.add_argument("--status")
    action("counts", help="how many tasks, by endpoint and status")
    action("get", help="one task").add_argument("id")
    action("cancel", help="cancel a task").add_argument("id")


def _token_commands(command: Adder, commands: Callable[..., Adder]) -> None:
    action = commands(command("tokens", help="endpoint tokens"), "action")
    for verb, text in (("create", "new token (shown once)"), ("limit", "change its limits")):
        tc = action(verb, help=text)
        tc.add_argument("name")
        if verb == "limit":
            tc.add_argument("id")
        tc.add_argument("--rpm", type=int, help="requests per minute (0: no limit)")
        tc.add_argument("--tpd", type=int, help="model tokens per UTC day (0: no limit)")
    action("ls", help="tokens of an endpoint").add_argument("name")
    rv = action("revoke", help="revoke a token")
    rv.add_argument("name")
    rv.add_argument("id")


def _secret_commands(command: Adder, commands: Callable[..., Adder]) -> None:
    action = commands(command("secrets", help="secrets"), "action")
    st = action("set", help="store a secret (value from the argument or stdin)")
    st.add_argument("name")
    st.add_argument("value", nargs="?")
    action("ls", help="names and dates")
    action("rm", help="delete a secret").add_argument("name")


def _gpu_commands(command: Adder, commands: Callable[..., Adder]) -> None:
    action = commands(command("gpus", help="GPUs, who holds them, health (no action: the "
                              "list); cordon and uncordon"), "action", required=False)
    co = action("cordon", help="no new replica on the GPU; its replicas move elsewhere")
    co.add_argument("gpu", help="uuid or index")
    co.add_argument("--reason")
    action("uncordon", help="back in service").add_argument("gpu", help="uuid or index")
    action("healthy", help="a GPU found sick is repaired").add_argument(
        "gpu", help="uuid or index")


def _other_commands(command: Adder) -> None:
    lg = command("logs", help="replica logs")
    lg.add_argument("name")
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("--tail", default="100")
    lg.add_argument("--replica")
    command("backup", help="save a consistent copy of berthd's database").add_argument("file")
    us = command("usage", help="calls and model tokens by hour, day, token or model")
    us.add_argument("--since", help="unix time or ISO 8601 date/time (default: all)")
    us.add_argument("--until", help="unix time or ISO 8601 date/time")
    us.add_argument("--endpoint")
    us.add_argument("--token-id", help="a token id, admin or public")
    us.add_argument("--group-by", default="day", choices=["hour", "day", "token", "model"])
    au = command("audit", help="who changed what: every control write, refused ones too")
    au.add_argument("--since", type=float, default=0.0)
    au.add_argument("--actor", help="admin, a token id, none, unknown-token or sighup")
    au.add_argument("--target", help="an endpoint, endpoint/token id, secret or task id")
    ev = command("events", help="scale, start, ready, crash, eviction, reload...")
    ev.add_argument("--endpoint")
    ev.add_argument("--since", type=float, default=0.0)


def local_config(path: str) -> tuple[str | None, str | None]:
    """URL and admin token from a berthd config on this machine, where readable."""
    try:
        with open(path, "rb") as f:
            daemon = tomllib.load(f).get("daemon", {})
    except (OSError, ValueError):
        return None, None
    listen = str(daemon.get("listen", "127.0.0.1:8080")).replace("0.0.0.0", "127.0.0.1")
    token = None
    if daemon.get("admin_token_file"):
        try:
            with open(daemon["admin_token_file"], encoding="utf-8") as f:
                token = f.readline().strip() or None
        except OSError:
            pass
    return f"http://{listen}", token


def make_client(args: argparse.Namespace) -> Client:
    url, token = local_config(args.config)
    return Client(args.url or os.environ.get("BERTH_URL") or url or "http://127.0.0.1:8080",
                  args.token or os.environ.get("BERTH_TOKEN") or token)


def q(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def with_query(path: str, params: dict[str, Any]) -> str:
    """`path` with the params that are set (not None, empty or 0) as its query, if any."""
    query = urllib.parse.urlencode({k: v for k, v in params.items() if v})
    return f"{path}?{query}" if query else path


Route = tuple[str, str, Any, Callable[[Any], str]]  # method, path, body, renderer


def route(args: argparse.Namespace) -> Route:
    """(method, path, body, renderer) for every command but apply and logs."""
    c = args.command
    if c == "gpus":
        if args.action is None:
            return "GET", "/v1/gpus", None, show_gpus
        body = {"reason": args.reason} if getattr(args, "reason", None) else None
        return ("POST", f"/v1/gpus/{q(args.gpu)}/{args.action}", body,
                show_message("GPU {index} ({uuid}): cordoned={cordoned}, healthy={healthy}"))
    if c == "events":
        return ("GET", with_query("/v1/events", {"endpoint": args.endpoint, "since": args.since}),
                None, show_events)
    if c == "audit":
        return ("GET", with_query("/v1/audit", {"since": args.since, "actor": args.actor,
                                                "target": args.target}), None, show_audit)
    if c == "usage":
        return ("GET", with_query("/v1/usage", {
            "since": args.since, "until": args.until, "endpoint": args.endpoint,
            "token": args.token_id, "group_by": args.group_by}), None, show_usage)
    routes = {"endpoints": _endpoint_route, "tasks": _task_route, "tokens": _token_route,
              "secrets": _secret_route}
    return routes[c](args, args.action)


def _endpoint_route(args: argparse.Namespace, a: str) -> Route:
    if a == "ls":
        return "GET", "/v1/endpoints", None, show_endpoints
    if a == "get":
        return "GET", f"/v1/endpoints/{q(args.name)}", None, show_endpoint
    if a == "delete":
        return ("DELETE", with_query(f"/v1/endpoints/{q(args.name)}",
                                     {"purge_cache": "true" if args.purge_cache else None}), None,
                show_message("deleted {name}; {replicas_stopping} replica(s) stopping"))
    if a == "restart":
        return "POST", f"/v1/endpoints/{q(args.name)}/restart", None, show_endpoint
    body = {k: v for k, v in (("min_replicas", args.min_replicas),
                              ("max_replicas", args.max_replicas)) if v is not None}
    if not body:
        raise CliError("error: scale needs --min and/or --max", EXIT_USAGE)
    return "PATCH", f"/v1/endpoints/{q(args.name)}", body, show_endpoint


def _task_route(args: argparse.Namespace, a: str) -> Route:
    if a == "ls":
        return ("GET", with_query("/v1/tasks", {"endpoint": args.endpoint,
                                                "status": args.status}), None, show_tasks)
    if a == "counts":
        return "GET", "/v1/tasks/counts", None, show_task_counts
    return "GET" if a == "get" else "DELETE", f"/tasks/{q(args.id)}", None, show_task


def _token_route(args: argparse.Namespace, a: str) -> Route:
    base = f"/v1/endpoints/{q(args.name)}/tokens"
    limits = {k: v or None for k, v in (("requests_per_minute", getattr(args, "rpm", None)),
                                        ("tokens_per_day", getattr(args, "tpd", None)))
              if v is not None}
    if a == "create":
        return "POST", base, limits or None, show_message("{token}")
    if a == "limit":
        if not limits:
            raise CliError("error: limit needs --rpm and/or --tpd", EXIT_USAGE)
        return ("PATCH", f"{base}/{q(args.id)}", limits, show_message(
            "{id}: {requests_per_minute} requests/min, {tokens_per_day} tokens/day"))
    if a == "ls":
        return "GET", base, None, show_tokens
    return "DELETE", f"{base}/{q(args.id)}", None, show_message("revoked {id}")


def _secret_route(args: argparse.Namespace, a: str) -> Route:
    if a == "ls":
        return "GET", "/v1/secrets", None, show_secrets
    if a == "rm":
        return "DELETE", f"/v1/secrets/{q(args.name)}", None, show_message("deleted {name}")
    value = args.value if args.value is not None else sys.stdin.read().rstrip("\n")
    return "PUT", f"/v1/secrets/{q(args.name)}", {"value": value}, show_message("stored {name}")


def run(args: argparse.Namespace) -> int:
    client = make_client(args)
    if args.command == "endpoints" and args.action == "apply":
        return apply(client, args.file, args.json)
    if args.command == "backup":
        size = client.download("/v1/backup", Path(args.file))
        print(f"saved {size} bytes to {args.file}; restore with: berthd restore {args.file}")
        return 0
    if args.command == "logs":
        query = urllib.parse.urlencode({"follow": str(args.follow).lower(), "tail": args.tail,
                                        **({"replica": args.replica} if args.replica else {})})
        for line in client.lines(f"/v1/endpoints/{q(args.name)}/logs?{query}"):
            print(line, flush=True)
        return 0
    method, path, body, render = route(args)
    data = client.call(method, path, body)
    print(json.dumps(data, indent=2) if args.json else render(data))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except CliError as exc:
        print(exc, file=sys.stderr)
        return exc.code
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # an answer not berthd's
        print(f"error: an answer berth cannot read ({type(exc).__name__}: {exc}): is --url "
              "a berthd of this version?", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
