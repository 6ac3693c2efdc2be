"""``ernie45 plan --serve``: the JSON API over HTTP, and the page end to end in headless Chromium.

The Chromium tests load the page with a query string (the page plans on load), dump the DOM after the
scripts ran and compare every number the chart and the recommendation table carry with the API's JSON.
Outside CI they skip when no Chromium is installed; under CI (``CI`` set) a missing Chromium fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urlencode

import pytest

from ernie45.plan_report import PlanRequest, build_report
from ernie45.plan_server import make_server

B300, B21 = "ERNIE-4.5-300B-A47B", "ERNIE-4.5-21B-A3B"


@pytest.fixture(scope="module")
def base_url():
    server = make_server("127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{host}:{port}"
    server.shutdown()
    server.server_close()


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ---- HTTP API --------------------------------------------------------------------------------------
def test_api_plan_equals_build_report(base_url):
    query = dict(model=B21, quant="int4", context=32768, batch=2, gpu="rtx4090", offload_experts="true")
    status, headers, body = _get(f"{base_url}/api/plan?{urlencode(query)}")
    assert status == 200 and headers["Content-Type"] == "application/json"
    expected = build_report(PlanRequest(model=B21, quant="int4", context=32768, batch=2, gpu="rtx4090",
                                        offload_experts=True))
    assert json.loads(body) == json.loads(json.dumps(expected))


@pytest.mark.parametrize("query, message", [
    ("model=ERNIE-4.5-21B-A3B&context=abc", "context must be an integer"),
    ("model=ERNIE-4.5-21B-A3B", "model and context are required"),
    ("model=ERNIE-4.5-21B-A3B&context=10&colour=red", "unknown parameter 'colour'"),
    ("model=/etc&context=10", "model must be one of"),
    ("model=ERNIE-4.5-21B-A3B&context=10&quant=int3", "quant 'int3' is not one of"),
    ("model=ERNIE-4.5-21B-A3B&context=10&gpu=A100", "ambiguous"),
    ("model=ERNIE-4.5-21B-A3B&context=0", "context must be >= 1"),
    ("model=ERNIE-4.5-21B-A3B&context=10&mtp=maybe", "mtp must be true or false"),
    ("model=ERNIE-4.5-21B-A3B&context=10&num_gpus=3&tp=2", "uses 2 GPUs"),
    ("model=ERNIE-4.5-21B-A3B&context=10&gpu_memory_utilization=0", "gpu_memory_utilization must be in (0, 1]"),
])
def test_api_bad_input_is_400_with_a_message(base_url, query, message):
    status, headers, body = _get(f"{base_url}/api/plan?{query}")
    assert status == 400 and headers["Content-Type"] == "application/json"
    assert message in json.loads(body)["error"]


def test_unknown_path_is_404_json(base_url):
    status, _, body = _get(f"{base_url}/nope")
    assert status == 404 and "error" in json.loads(body)


def test_page_is_self_contained(base_url):
    status, headers, body = _get(f"{base_url}/")
    html = body.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert "@import" not in html and "url(" not in html and "<link" not in html


def test_cli_serve_binds_localhost_and_answers():
    """`ernie45 plan --serve --port 0` prints its URL on stderr and serves until stopped."""
    proc = subprocess.Popen([sys.executable, "-m", "ernie45.plan_cli", "--serve", "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"http://127\.0\.0\.1:\d+/", line)
        assert url, line
        status, _, body = _get(url.group(0) + "api/options")
        assert status == 200 and "H100-SXM" in [g["name"] for g in json.loads(body)["gpus"]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()


# ---- the page in headless Chromium ---------------------------------------------------------------------
def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; CI must run .ci/install-chromium.sh first")
    pytest.skip("chromium is not installed (apt-get install chromium); required under CI")


def _dump_dom(url: str, profile) -> str:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
           "--disable-extensions", f"--user-data-dir={profile}", "--virtual-time-budget=15000", "--dump-dom", url]
    for _ in range(2):  # a loaded CI machine may dump before the fetch settles; the second try waits longer
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
        if 'data-state="done"' in dom or 'data-state="error"' in dom:
            return dom
        cmd[-3] = "--virtual-time-budget=60000"
    return dom


class _Collect(HTMLParser):
    """Elements carrying the data-* attributes the page renders its numbers into."""

    def __init__(self):
        super().__init__()
        self.state, self.stage, self.error = None, None, ""
        self.segments: dict[int, list[tuple[str, int]]] = {}
        self.fields, self.recs, self.capacity, self._in_error = {}, {}, None, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.state = a.get("data-state")
        if tag == "g" and "data-stage" in a:
            self.stage = int(a["data-stage"])
            self.segments[self.stage] = []
        if tag == "rect" and "data-part" in a:
            self.segments[self.stage].append((a["data-part"], int(a["data-bytes"])))
        if tag == "line" and a.get("id") == "capacity":
            self.capacity = int(a["data-bytes"])
        if "data-field" in a:
            self.fields[a["data-field"]] = a["data-value"]
        if tag == "tr" and "data-gpu" in a:
            self.recs[a["data-gpu"]] = a
        self._in_error = a.get("id") == "error"

    def handle_data(self, data):
        if self._in_error:
            self.error += data


def _page(base_url: str, query: dict, profile) -> _Collect:
    parsed = _Collect()
    parsed.feed(_dump_dom(f"{base_url}/?{urlencode(query)}", profile))
    return parsed


def _expected_segments(stage: dict) -> list[tuple[str, int]]:
    order = ["embed", "attention", "dense_mlp", "experts", "shared_experts", "router", "norms", "lm_head", "mtp"]
    parts = [(p, stage["weights"][p]) for p in order if stage["weights"].get(p)]
    return parts + [("kv_cache", stage["kv_cache"]), ("activations", stage["activations"]),
                    ("overhead", stage["overhead"]["high"])]


@pytest.mark.parametrize("query", [
    dict(model=B300, quant="int4", context=131072, gpu="H100"),
    dict(model=B21, quant="mixed-2bit", context=65536, batch=4, gpu="RTX4090", tp=2, offload_experts="true",
         gpu_memory_utilization=0.8),
])
def test_page_chart_and_recommendations_equal_the_api(base_url, tmp_path, query):
    page = _page(base_url, query, tmp_path / "profile")
    assert page.state == "done", page.error
    _, _, body = _get(f"{base_url}/api/plan?{urlencode(query)}")
    api = json.loads(body)
    assert page.segments == {st["stage"]: _expected_segments(st) for st in api["per_gpu"]}
    assert page.capacity == api["gpu"]["budget_bytes"] == int(page.fields["budget_bytes"])
    assert api["request"]["gpu_memory_utilization"] == query.get("gpu_memory_utilization", 0.9)
    assert int(page.fields["weights_total"]) == api["whole_model"]["weights_total"]
    assert int(page.fields["kv_cache"]) == api["whole_model"]["kv_cache"]
    assert page.fields["fit"] == api["fit"]
    assert int(page.fields["max_context"]) == api["max_context"]
    assert int(page.fields["max_sequences"]) == api["max_sequences"]
    assert page.fields["tok_s"] == f"{api['decode_bound']['per_sequence_tok_s']:.1f}"
    lay = api["layout"]
    assert page.fields["layout"] == f"{lay['num_gpus']}/{lay['tp']}/{lay['ep']}/{lay['pp']}"
    assert set(page.recs) == {r["gpu"] for r in api["recommendations"]}
    for rec in api["recommendations"]:
        row = page.recs[rec["gpu"]]
        assert row["data-min-gpus"] == ("" if rec["min_gpus"] is None else str(rec["min_gpus"]))
        if rec["min_gpus"] is not None:
            assert int(row["data-max-context"]) == rec["max_context"]
            assert int(row["data-max-sequences"]) == rec["max_sequences"]


def test_page_shows_the_api_error(base_url, tmp_path):
    page = _page(base_url, dict(model=B21, context=1024, gpu="A100"), tmp_path / "profile")
    assert page.state == "error" and "ambiguous" in page.error
