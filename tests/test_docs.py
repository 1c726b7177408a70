"""The OpenAPI document and the two docs pages, rendered offline in headless Chromium."""

import html
import json
import os
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")
DOCS_PAGES = ("/docs", "/redoc")
CHROMIUM_TIMEOUT_SECONDS = 120


class AssetParser(HTMLParser):
    """Collects the URLs a page loads: script src, link href, img src."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        url = {"script": attrs.get("src"), "link": attrs.get("href"), "img": attrs.get("src")}.get(tag)
        if url:
            self.urls.append(url)


def page_assets(page: str) -> list[str]:
    parser = AssetParser()
    parser.feed(page)
    return parser.urls


def operations(spec: dict) -> list[tuple[str, str, dict]]:
    return [
        (method, path, operation)
        for path, item in spec["paths"].items()
        for method, operation in item.items()
        if method in HTTP_METHODS
    ]


def test_openapi_json_is_an_openapi_3_document(client):
    spec = client.get("/openapi.json").json
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] == "pubsub"
    assert spec["info"]["version"]
    assert "/topics/{id}/messages" in spec["paths"]
    for method, path, operation in operations(spec):
        assert operation["responses"], (method, path)
        for status, response in operation["responses"].items():
            assert "$ref" in response or response.get("description"), (method, path, status)


def test_every_operation_has_a_summary_and_an_error_response(client):
    spec = client.get("/openapi.json").json
    for method, path, operation in operations(spec):
        assert operation.get("summary", "").strip(), f"{method.upper()} {path} has no summary"
        errors = [
            status for status in operation["responses"] if status == "default" or status.startswith("4")
        ]
        assert errors, f"{method.upper()} {path} documents no 4xx or default response"


def refs(node) -> list[str]:
    """Every $ref in a JSON document."""
    if isinstance(node, list):
        return [ref for value in node for ref in refs(value)]
    if not isinstance(node, dict):
        return []
    found = [node["$ref"]] if "$ref" in node else []
    return found + [ref for value in node.values() for ref in refs(value)]


def test_openapi_refs_point_to_components(client):
    spec = client.get("/openapi.json").json
    for ref in refs(spec):
        assert ref.startswith("#/components/"), ref
        node = spec
        for key in ref[2:].split("/"):
            node = node.get(key.replace("~1", "/").replace("~0", "~"))
            assert node is not None, f"dangling $ref {ref}"


@pytest.mark.parametrize("url", DOCS_PAGES)
def test_docs_page_loads_only_local_static_assets(client, url):
    response = client.get(url)
    assert response.status_code == 200
    assets = page_assets(response.text)
    assert assets
    for asset in assets:
        parts = urlsplit(asset)
        assert not parts.scheme and not parts.netloc, f"{url} loads {asset} from another host"
        assert parts.path.startswith("/static/"), asset
        with client.get(asset) as static:
            assert static.status_code == 200, asset
            assert static.content_length > 0, asset


# The browser test: a real server on loopback, a real headless Chromium.


def find_chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    # The browser test is the only proof the pages render; CI must not pass without it.
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail("chromium not found and CI is set: install chromium (apt-get install chromium)")
    pytest.skip("chromium not found (apt-get install chromium)")


@pytest.fixture(scope="module")
def live_server(app):
    """The app on an ephemeral loopback port, in a daemon thread, for this module's tests."""
    server = make_server("127.0.0.1", 0, app)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def render_page(url: str, tmp_path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the URLs the page itself requested (from Chromium's net log)."""
    chromium = find_chromium()
    net_log = tmp_path / "netlog.json"
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-quic",
        f"--user-data-dir={tmp_path / 'profile'}",
        # No other host resolves: the page must render from the app alone.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--log-net-log={net_log}",
        "--virtual-time-budget=15000",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT_SECONDS)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout, requested_urls(net_log, url)


def requested_urls(net_log, page_url: str) -> list[str]:
    """URLs requested by the page (not by Chromium's own services), from a NetLog JSON file."""
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    parts = urlsplit(page_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return [
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start_job and event.get("params", {}).get("initiator") == origin
    ]


@pytest.mark.slow
@pytest.mark.parametrize("page", DOCS_PAGES)
def test_docs_page_renders_every_operation_in_a_browser(client, live_server, tmp_path, page):
    spec = client.get("/openapi.json").json
    dom, requested = render_page(live_server + page, tmp_path)
    text = html.unescape(dom)
    assert "/topics/{id}/messages" in text
    assert "Publish a batch" in text
    missing = [
        f"{method.upper()} {path}: {operation['summary']}"
        for method, path, operation in operations(spec)
        if operation["summary"] not in text or path not in text
    ]
    assert not missing, f"{page} did not render: {missing}"
    assert live_server + "/openapi.json" in requested
    elsewhere = [url for url in requested if not url.startswith(live_server + "/")]
    assert not elsewhere, f"{page} requested other hosts: {elsewhere}"
