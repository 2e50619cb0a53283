"""GET /openapi.json: every route berthd serves, built from the pydantic models in
daemon.schemas (and EndpointSpec, the config file's own model), never written out by hand."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from berth.daemon import schemas as s
from berth.daemon.config import NAME_PATTERN, EndpointFields, EndpointSpec
from berth.daemon.control import SECRET_NAME, TokenLimitsBody
from berth.daemon.gpus_api import CordonBody
from berth.daemon.keys import OPENAPI
from berth.daemon.openai_api import FORM_ROUTES, JSON_ROUTES

JSON = "application/json"


@dataclass(frozen=True)
class Op:
    method: str
    path: str
    summary: str
    ok: tuple[int, type[BaseModel] | None]  # None: the model server's own answer
    body: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    query: tuple[tuple[str, dict[str, Any]], ...] = ()
    auth: str = "admin"  # admin | endpoint | none
    tag: str = "control"
    also: tuple[tuple[int, type[BaseModel]], ...] = ()  # more success answers
    # OpenAPI links from the success answer: (target "method path", its path parameter, the
    # body field that fills it). They tell clients (and fuzzers) where a created id is used.
    links: tuple[tuple[str, str, str], ...] = ()
    media: str = "*/*"  # content type of an answer that has no model
    body_optional: bool = False
    body_media: str = JSON
    error_model: type[BaseModel] = s.ErrorBody  # the OpenAI routes answer OpenAI's shape


INT = {"type": "integer", "minimum": 1, "maximum": 10000}
NAME = ("name",)
EP_ERRORS = (404,)
BODY_ERRORS = (400, 415, 422)
INVOKE_ERRORS = (404, 413, 429, 502, 503, 504)

OPS: tuple[Op, ...] = (
    Op("get", "/healthz", "Liveness of berthd itself (503 while the Docker engine is "
       "unreachable)", (200, s.Health), auth="none", tag="health", also=((503, s.Health),)),
    Op("get", "/openapi.json", "This document", (200, None), auth="none", tag="health",
       media=JSON),
    Op("get", "/metrics", "Prometheus metrics: calls, replicas, GPUs, tasks", (200, None),
       media="text/plain"),
    Op("get", "/v1/endpoints", "Every endpoint with live status", (200, s.EndpointList)),
    Op("get", "/v1/models", "OpenAI model list: the models this key may call, with their "
       "state; never starts a replica", (200, s.ModelList), errors=(401,), auth="endpoint",
       tag="openai", error_model=s.OpenAIError),
    Op("get", "/v1/models/{model}", "One model, OpenAI shape (404 model_not_found)",
       (200, s.ModelView), errors=(401, 404), auth="endpoint", tag="openai",
       error_model=s.OpenAIError),
    *(Op("post", f"/v1/{path}", f"OpenAI {path}: routed by `model` to the endpoint that "
         "serves it, then as /invoke. Any status can be the model's own answer; berth's own "
         "errors (400 missing_model/bad_json, 401, 403, 404 model_not_found, 413, 429, 502, "
         "503, 504) carry OpenAI's error object.", (200, None), s.OpenAIRequest,
         auth="endpoint", tag="data plane", error_model=s.OpenAIError)
      for path in JSON_ROUTES),
    *(Op("post", f"/v1/{path}", f"OpenAI {path} (multipart): routed by the `model` form "
         "field, which must come before the file; the audio streams to the replica. Errors as "
         "on the JSON routes, plus 400 bad_form.", (200, None), s.OpenAIForm,
         auth="endpoint", tag="data plane", error_model=s.OpenAIError,
         body_media="multipart/form-data") for path in FORM_ROUTES),
    Op("post", "/v1/endpoints", "Create an endpoint", (201, s.EndpointView), EndpointSpec,
       (*BODY_ERRORS, 409), links=tuple((f"{m} /v1/endpoints/{{name}}", "name", "name")
                                        for m in ("get", "patch", "delete"))),
    Op("get", "/v1/endpoints/{name}", "One endpoint: spec and replicas",
       (200, s.EndpointView), errors=EP_ERRORS),
    Op("put", "/v1/endpoints/{name}", "Create (201) or replace (200) an endpoint; the name "
       "comes from the URL", (200, s.EndpointView), EndpointFields, (*BODY_ERRORS, 409),
       also=((201, s.EndpointView),)),
    Op("patch", "/v1/endpoints/{name}", "Change some fields of an endpoint",
       (200, s.EndpointView), s.EndpointPatch, (*BODY_ERRORS, 404, 409)),
    Op("delete", "/v1/endpoints/{name}", "Drain, stop and forget an endpoint (and its cache "
       "volume with purge_cache=true)", (200, s.EndpointDeleted), errors=(400, 404, 409),
       query=(("purge_cache", {"type": "boolean"}),)),
    Op("post", "/v1/endpoints/{name}/restart", "Replace every replica by a fresh one (a new "
       "generation starts first; the old ones drain once it is ready)", (200, s.EndpointView),
       errors=(404,)),
    Op("get", "/v1/endpoints/{name}/logs", "Replica logs, streamed as text", (200, None),
       media="text/plain", errors=(400, 404),
       query=(("tail", {"type": "string", "pattern": "^([0-9]+|all)$"}),
              ("follow", {"type": "boolean"}), ("replica", {"type": "string"}))),
    Op("post", "/v1/endpoints/{name}/tokens", "New access token (shown once), with optional "
       "limits", (201, s.TokenCreated), TokenLimitsBody, (*EP_ERRORS, *BODY_ERRORS),
       body_optional=True),
    Op("patch", "/v1/endpoints/{name}/tokens/{id}", "Change a token's limits (null: none)",
       (200, s.TokenView), TokenLimitsBody, (*EP_ERRORS, *BODY_ERRORS), body_optional=True),
    Op("get", "/v1/endpoints/{name}/tokens", "Token ids and dates", (200, s.TokenList),
       errors=EP_ERRORS),
    Op("delete", "/v1/endpoints/{name}/tokens/{id}", "Revoke a token", (200, s.TokenRevoked),
       errors=EP_ERRORS),
    Op("get", "/v1/secrets", "Secret names and dates, never values", (200, s.SecretList)),
    Op("put", "/v1/secrets/{name}", "Store a secret", (200, s.SecretStored), s.SecretValue,
       BODY_ERRORS),
    Op("delete", "/v1/secrets/{name}", "Delete a secret", (200, s.SecretDeleted),
       errors=(404,)),
    Op("get", "/v1/gpus", "GPUs, holders, readings and health", (200, s.GpuList)),
    Op("post", "/v1/gpus/{uuid}/cordon", "No new replica on this GPU (uuid or index); its "
       "replicas drain while replacements start elsewhere; kept across restarts",
       (200, s.GpuView), CordonBody, (*BODY_ERRORS, 404, 409), body_optional=True),
    Op("post", "/v1/gpus/{uuid}/uncordon", "Back in service (a GPU not cordoned: no-op)",
       (200, s.GpuView), errors=(404, 409)),
    Op("post", "/v1/gpus/{uuid}/healthy", "A GPU found sick is repaired: back in service "
       "(a healthy GPU: no-op)", (200, s.GpuView), errors=(404, 409)),
    Op("get", "/v1/audit", "Every control write, refused ones too: time, actor, remote, "
       "action, target, status, outcome (oldest first)", (200, s.AuditList), errors=(400,),
       query=(("since", {"type": "number"}), ("actor", {"type": "string"}),
              ("target", {"type": "string"}), ("limit", INT))),
    Op("get", "/v1/backup", "A consistent online copy of the state database (SQLite), "
       "streamed; restore it with `berthd restore FILE` while berthd is stopped", (200, None),
       errors=(503, 507), media="application/vnd.sqlite3"),
    Op("get", "/v1/usage", "Calls, errors and model tokens by hour, day, token or model",
       (200, s.UsageSummary), errors=(400,),
       query=(("since", {"type": "string"}), ("until", {"type": "string"}),
              ("endpoint", {"type": "string"}), ("token", {"type": "string"}),
              ("group_by", {"type": "string", "enum": ["hour", "day", "token", "model"]}))),
    # follow=true (live, text/event-stream; README) is left out here on purpose: a stream
    # that never ends reads as a hang to clients and fuzzers walking this document.
    Op("get", "/v1/events", "Scale, start, ready, crash, eviction, reload and API changes",
       (200, s.EventList), errors=(400,), query=(("endpoint", {"type": "string"}),
                                                 ("since", {"type": "number"}),
                                                 ("limit", INT))),
    Op("get", "/v1/tasks/counts", "How many tasks are kept, by endpoint and status",
       (200, s.TaskCounts)),
    Op("get", "/v1/tasks", "Async tasks, newest first", (200, s.TaskList), errors=(400,),
       query=(("endpoint", {"type": "string"}),
              ("status", {"type": "string", "enum": ["queued", "running", "succeeded",
                                                      "failed", "cancelled"]}),
              ("limit", INT))),
    *(Op(m, "/invoke/{name}/{path}", "Sync call, proxied to /{path} on one replica. Any "
         "status can be the model's own answer; berth's own errors (404 unknown endpoint, 413, "
         "429, 502, 503, 504) carry the JSON error body.", (200, None), auth="endpoint",
         tag="data plane") for m in ("get", "post", "put", "patch", "delete")),
    Op("post", "/async/{name}/{path}", "Async call: stored, answered 202 at once",
       (202, s.TaskView), errors=(404, 413, 422, 429, 503, 507), auth="endpoint",
       tag="data plane",
       links=tuple((target, "id", "id") for target in (
           "get /tasks/{id}", "get /tasks/{id}/result", "delete /tasks/{id}"))),
    Op("get", "/tasks/{id}", "A task", (200, s.TaskView), errors=(404,), auth="endpoint",
       tag="data plane"),
    Op("get", "/tasks/{id}/result", "The replica's answer to a task, as it was (any status); "
       "berth's own errors: 404 unknown task or no result, 409 not finished, 410 purged",
       (200, None), auth="endpoint", tag="data plane"),
    Op("delete", "/tasks/{id}", "Cancel a task", (200, s.TaskView), errors=(404, 409),
       auth="endpoint", tag="data plane"),
)


def _schema(model: type[BaseModel], components: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(schema.pop("$defs", {}))
    components[model.__name__] = schema
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _params(op: Op) -> list[dict[str, Any]]:
    params = []
    for part in op.path.split("/"):
        if part.startswith("{"):
            name = part.strip("{}")
            schema: dict[str, Any] = {"type": "string", "minLength": 1}
            if name == "name" and op.path.startswith(("/v1/endpoints", "/invoke", "/async")):
                schema["pattern"] = NAME_PATTERN
            elif name == "name" and op.path.startswith("/v1/secrets"):
                schema["pattern"] = SECRET_NAME.pattern
            params.append({"name": name, "in": "path", "required": True, "schema": schema})
    params += [{"name": n, "in": "query", "required": False, "schema": sch}
               for n, sch in op.query]
    return params


def _operation_id(method: str, path: str) -> str:
    return f"{method}_{path}"


def _operation(op: Op, components: dict[str, Any]) -> dict[str, Any]:
    error = {"description": "error", "content": {JSON: {"schema": _schema(op.error_model,
                                                                         components)}}}
    status, model = op.ok
    if model is None:
        ok: dict[str, Any] = {"description": "the answer",
                              "content": {op.media: {"schema": {}}}}
    else:
        ok = {"description": "ok", "content": {JSON: {"schema": _schema(model, components)}}}
    if op.links:
        ok["links"] = {re.sub(r"[^A-Za-z0-9]+", "_", target).strip("_"): {
            "operationId": _operation_id(*target.split(" ")),
            "parameters": {param: f"$response.body#/{field}"}} for target, param, field in op.links}
    responses: dict[str, Any] = {str(status): ok}
    for code, also in op.also:
        responses[str(code)] = {"description": "ok",
                                "content": {JSON: {"schema": _schema(also, components)}}}
    if model is None and op.tag == "data plane":
        responses["default"] = {"description": "the model server's own answer",
                                "content": {"*/*": {"schema": {}}}}
    # The model server's own answers (data plane, no model) are covered by "default" above.
    guarded = op.auth != "none" and (model is not None or op.tag != "data plane")
    codes = set(op.errors) | ({401, 403} if guarded else set())
    for code in sorted(codes):
        responses[str(code)] = error
    operation: dict[str, Any] = {"summary": op.summary, "tags": [op.tag],
                                 "parameters": _params(op), "responses": responses,
                                 "operationId": _operation_id(op.method, op.path)}
    if op.body is not None:
        operation["requestBody"] = {"required": not op.body_optional, "content": {
            op.body_media: {"schema": _schema(op.body, components)}}}
    if op.auth == "admin":
        operation["security"] = [{"bearer": []}]
    elif op.auth == "endpoint":
        # An endpoint with `public = true` answers without a token, so on the data plane the
        # token is optional as far as the document can say; {} is OpenAPI's "no auth" option.
        operation["security"] = [{"bearer": []}, {}]
    return operation


def document() -> dict[str, Any]:
    components: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for op in OPS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, components)
    return {
        "openapi": "3.1.0",
        "info": {"title": "berth", "version": "0.1.0",
                 "description": "Private model serving on one multi-GPU server."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "the admin token, or (data plane) a token of the "
                                      "endpoint called"}}},
    }


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(request.app[OPENAPI])



def add_openapi(app: web.Application) -> None:
    app[OPENAPI] = document()
    app.router.add_get("/openapi.json", openapi_json)
