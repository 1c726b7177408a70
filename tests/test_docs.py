"""The OpenAPI document and the two docs pages, rendered offline in headless Chromium."""

import contextlib
import html
import json
import os
import secrets
import shutil
import subprocess
import threading
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

from pubsub import clients, db

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "options", "head", "trace")
DOCS_PAGES = ("/docs", "/redoc")
CHROMIUM_TIMEOUT_SECONDS = 120
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # No other host resolves: the page must work from the app alone.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


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


# The browser tests: a real server on loopback, a real headless Chromium.


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing(what: str, install: str):
    """Skip a browser test for lack of WHAT, except in CI, where the browser tests must run."""
    if in_ci():
        pytest.fail(f"{what} not found and CI is set: {install}")
    pytest.skip(f"{what} not found ({install})")


def find_chromium() -> str:
    # The browser tests are the only proof the pages work; CI must not pass without them.
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    return path or missing("chromium", "apt-get install chromium")


@contextlib.contextmanager
def serving(app):
    """APP on an ephemeral loopback port, in a daemon thread; yields its base URL."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def live_server(app):
    """The default app (auth off) on loopback, for this module's tests."""
    with serving(app) as url:
        yield url


def render_page(url: str, tmp_path) -> tuple[str, list[str]]:
    """The DOM after scripts ran, and the URLs the page itself requested (from Chromium's net log)."""
    chromium = find_chromium()
    net_log = tmp_path / "netlog.json"
    command = [
        chromium,
        *CHROMIUM_FLAGS,
        f"--user-data-dir={tmp_path / 'profile'}",
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


# Swagger UI's Authorize, driven through Debian's chromedriver (never Selenium Manager's downloads).

BROWSER_WAIT_SECONDS = 15
TOPICS_GET = "//div[contains(@class, 'opblock-get')][.//span[@data-path='/topics']]"
TOPICS_POST = "//div[contains(@class, 'opblock-post')][.//span[@data-path='/topics']]"
AUTHORIZE_BUTTON = "//div[@class='auth-wrapper']/button[contains(@class, 'authorize')]"
# React tracks a textarea's value: set it with the native setter, then say so with an input event.
SET_TEXTAREA = """
const [editor, value] = arguments;
Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, "value").set.call(editor, value);
editor.dispatchEvent(new Event("input", {bubbles: true}));
"""
OAUTH2_BOX = "//div[@class='auth-container'][.//h4[contains(., 'oauth2 (OAuth2, clientCredentials)')]]"


def find_chromedriver() -> str:
    """Debian's chromedriver, the same version as its chromium (the package depends on it)."""
    path = shutil.which("chromedriver")
    return path or missing("chromedriver", "apt-get install chromium-driver")


@pytest.fixture(scope="module")
def auth_app(make_app):
    return make_app(AUTH_ENABLED=True, AUTH_SECRET_KEY=secrets.token_hex(32))


class RequestLog:
    """WSGI middleware that notes each request's method, path, Authorization scheme and media type."""

    def __init__(self, app):
        self.app = app
        self.requests: list[tuple[str, str, str, str]] = []

    def __call__(self, environ, start_response):
        scheme = environ.get("HTTP_AUTHORIZATION", "").partition(" ")[0]
        media_type = environ.get("CONTENT_TYPE", "").partition(";")[0]
        self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"], scheme, media_type))
        return self.app(environ, start_response)


@pytest.fixture(scope="module")
def auth_server(auth_app):
    """The app with auth on, on loopback: its URL and the log of the requests it received."""
    log = RequestLog(auth_app)
    with serving(log) as url:
        yield url, log


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium under WebDriver; quit (browser and driver) at teardown."""
    chromium = find_chromium()
    chromedriver = find_chromedriver()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium", "pip install -r requirements-dev.txt")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with the driver's path given too, Selenium Manager never runs
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,1600"):
        options.add_argument(flag)
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(BROWSER_WAIT_SECONDS)
        driver.set_script_timeout(BROWSER_WAIT_SECONDS)
        yield driver
    finally:
        driver.quit()


class SwaggerUI:
    """The few Swagger UI 5 controls the test uses. Every element is looked up afresh (React may
    re-render it) and waited for, never slept for."""

    def __init__(self, driver):
        from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.wait = WebDriverWait(
            driver,
            BROWSER_WAIT_SECONDS,
            poll_frequency=0.1,
            ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),
        )

    def find(self, within: str, css: str | None = None):
        """The element CSS inside the one at XPath WITHIN (or WITHIN itself), once visible."""

        def present(driver):
            element = driver.find_element("xpath", within)
            if css:
                element = element.find_element("css selector", css)
            return element if element.is_displayed() else None

        return self.wait.until(present, f"no visible {css or ''} in {within}")

    def text(self, within: str, css: str | None = None) -> str:
        return self.find(within, css).text

    def click(self, within: str, css: str | None = None) -> None:
        element = self.find(within, css)
        self.driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
        self.wait.until(lambda _: element.is_enabled(), f"{css} in {within} is disabled")
        element.click()

    def gone(self, within: str, css: str) -> None:
        self.wait.until(
            lambda driver: not driver.find_element("xpath", within).find_elements("css selector", css),
            f"{css} still in {within}",
        )

    def open_operation(self, operation: str) -> None:
        self.click(operation, ".opblock-summary-control")
        self.click(operation, ".try-out__btn")

    def lock(self, operation: str) -> str:
        return self.find(operation, ".authorization__btn").get_attribute("aria-label")

    def execute(self, operation: str) -> tuple[str, str]:
        """Execute the operation; the status code and the body the page then shows."""
        if self.driver.find_element("xpath", operation).find_elements("css selector", ".btn-clear"):
            self.click(operation, ".btn-clear")
        self.gone(operation, ".live-responses-table")
        self.click(operation, ".execute")
        status = self.text(operation, ".live-responses-table .response .response-col_status")
        body = self.driver.find_element("xpath", operation).find_elements(
            "css selector", ".live-responses-table .response .response-col_description pre"
        )
        return status.split()[0], body[0].text if body else ""

    def set_body(self, operation: str, body: str) -> None:
        """Replace the request body, as a paste would (typing it re-renders the page per key)."""
        editor = self.find(operation, "textarea.body-param__text")
        self.driver.execute_script(SET_TEXTAREA, editor, body)
        self.wait.until(lambda _: editor.get_attribute("value") == body, "the body did not change")

    def authorize_client_credentials(self, client_id: str, secret: str) -> None:
        self.click(AUTHORIZE_BUTTON)
        self.find(OAUTH2_BOX, "input#client_id_clientCredentials").send_keys(client_id)
        self.find(OAUTH2_BOX, "input#client_secret_clientCredentials").send_keys(secret)
        self.click(OAUTH2_BOX, "button.authorize")

        # Authorized: the box shows Logout; a failed token request shows an error instead.
        def settled(driver):
            box = driver.find_element("xpath", OAUTH2_BOX)
            return "Logout" in box.text or box.find_elements("css selector", ".errors")

        self.wait.until(settled, "the oauth2 box neither authorized nor showed an error")
        box = self.find(OAUTH2_BOX)
        errors = [error.text for error in box.find_elements("css selector", ".errors")]
        assert "Logout" in box.text, f"Swagger UI did not authorize: {errors}"
        self.click(OAUTH2_BOX, ".btn-done")
        self.wait.until(lambda driver: not driver.find_elements("css selector", ".dialog-ux"), "still open")


@pytest.mark.slow
def test_swagger_ui_authorize_with_client_credentials_then_execute(auth_app, auth_server, browser):
    url, log = auth_server
    log.requests.clear()
    with auth_app.app_context(), db.begin() as conn:
        client_id, secret = clients.create_client(conn, "swagger-ui", "*")
    browser.get(url + "/docs")
    ui = SwaggerUI(browser)

    ui.open_operation(TOPICS_GET)
    assert ui.lock(TOPICS_GET) == "authorization button unlocked"
    status, body = ui.execute(TOPICS_GET)
    assert status == "401", body
    assert json.loads(body)["detail"] == "missing bearer token"

    ui.authorize_client_credentials(str(client_id), secret)
    # Swagger UI 5's way: grant_type in a form, the client's credentials in an HTTP Basic header.
    assert ("POST", "/oauth/token", "Basic", "application/x-www-form-urlencoded") in log.requests
    assert ui.lock(TOPICS_GET) == "authorization button locked"
    status, body = ui.execute(TOPICS_GET)
    assert status == "200", body
    assert json.loads(body)["data"] == []

    ui.open_operation(TOPICS_POST)
    ui.set_body(TOPICS_POST, json.dumps({"id": "from-swagger-ui"}))
    status, body = ui.execute(TOPICS_POST)
    assert status == "201", body
    assert json.loads(body)["id"] == "from-swagger-ui"
    assert ("POST", "/topics", "Bearer", "application/json") in log.requests
