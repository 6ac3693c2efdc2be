"""``ernie45 plan --serve``: the planner as a self-contained local web page (standard library only).

Routes: ``GET /`` the page (``ernie45/web/plan.html``, no external assets, enforced by its
Content-Security-Policy), ``GET /api/options`` the models, schemes and GPUs the form offers, and
``GET /api/plan?model=...&quant=...&context=...`` the same report as ``ernie45 plan --json``. Bad query
input answers HTTP 400 with ``{"error": message}``. Only preset names (and the model the server was
started with) are accepted, so the page cannot be used to probe the file system. Binds 127.0.0.1.
"""

from __future__ import annotations

import json
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from .config import PRESETS, ConfigError
from .plan import KV_DTYPE_BYTES, SCHEMES
from .plan_gpus import catalogue
from .plan_report import PlanRequest, build_report

CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
       "img-src data:; base-uri 'none'; form-action 'self'")
_INT = ("context", "batch", "num_gpus", "tp", "ep", "pp", "prefill_chunk", "int4_moe_layers")
_FLOAT = ("gpu_memory_utilization", "host_bandwidth_gbs")
_BOOL = ("offload_experts", "mtp", "recommendations")
_STR = ("model", "quant", "kv_dtype", "gpu")


def page() -> bytes:
    return resources.files("ernie45").joinpath("web/plan.html").read_bytes()


def options(default_model: str | None = None) -> dict:
    models = list(PRESETS) + ([default_model] if default_model and default_model not in PRESETS else [])
    return {"models": models, "default_model": default_model or models[0], "quant": list(SCHEMES),
            "kv_dtype": list(KV_DTYPE_BYTES), "gpus": [g.to_dict() for g in catalogue()]}


def _value(key: str, raw: str):
    if key in _INT:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"{key} must be an integer (got {raw!r})") from None
    if key in _FLOAT:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{key} must be a number (got {raw!r})") from None
    if key in _BOOL:
        if raw.lower() not in ("1", "true", "on", "yes", "0", "false", "off", "no"):
            raise ValueError(f"{key} must be true or false (got {raw!r})")
        return raw.lower() in ("1", "true", "on", "yes")
    return raw


def request_from_query(query: str, allowed_models: list[str]) -> PlanRequest:
    """Query string -> PlanRequest; ValueError (HTTP 400) names the bad parameter."""
    fields: dict = {}
    for key, values in parse_qs(query).items():
        if key not in _INT + _FLOAT + _BOOL + _STR:
            raise ValueError(f"unknown parameter {key!r}")
        if len(values) != 1:
            raise ValueError(f"parameter {key!r} given {len(values)} times")
        if values[0].strip():
            fields[key] = _value(key, values[0].strip())
    if "model" not in fields or "context" not in fields:
        raise ValueError("model and context are required")
    if fields["model"] not in allowed_models:
        raise ValueError(f"model must be one of {', '.join(allowed_models)}")
    return PlanRequest(**fields)


class PlanHandler(BaseHTTPRequestHandler):
    server_version = "ernie45-plan"
    default_model: str | None = None
    quiet = False

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html", "/plan"):
            return self._send(HTTPStatus.OK, page(), "text/html; charset=utf-8")
        if url.path == "/api/options":
            return self._json(HTTPStatus.OK, options(self.default_model))
        if url.path == "/api/plan":
            return self._plan(url.query)
        return self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page {url.path!r}; try / or /api/plan"})

    def _plan(self, query: str) -> None:
        try:
            req = request_from_query(query, options(self.default_model)["models"])
            report = build_report(req)
        except (ValueError, ConfigError) as e:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        self._json(HTTPStatus.OK, report)

    def _json(self, status: HTTPStatus, body: dict) -> None:
        self._send(status, json.dumps(body).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt: str, *args) -> None:
        if not self.quiet:
            super().log_message(fmt, *args)


def make_server(host: str = "127.0.0.1", port: int = 0, default_model: str | None = None,
                quiet: bool = False) -> ThreadingHTTPServer:
    """A bound, not yet serving, server (port 0 picks a free port: read ``server.server_address``)."""
    handler = type("Handler", (PlanHandler,), {"default_model": default_model, "quiet": quiet})
    return ThreadingHTTPServer((host, port), handler)


def serve(host: str = "127.0.0.1", port: int = 8045, default_model: str | None = None) -> None:
    server = make_server(host, port, default_model)
    bound_host, bound_port = server.server_address[:2]
    print(f"ernie45 plan: serving http://{bound_host}:{bound_port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
