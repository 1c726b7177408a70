"""The web console in a real browser: headless Chromium under Selenium (Debian's chromedriver, as
test_docs) walks the main paths against the app on a loopback server, and saves a screenshot of
each page it checks. One browser for the module; cookies are cleared before each test.

PUBSUB_CONSOLE_SCREENSHOTS=<dir> also writes the overview and the DLQ there: docs/images/ holds
the two the README shows (`PUBSUB_CONSOLE_SCREENSHOTS=docs/images pytest tests/test_console_browser.py`).
"""

import os
import shutil

import pytest

from tests.auth_support import new_client
from tests.conftest import ApiHelper, threaded_server
from tests.test_docs import CHROMIUM_FLAGS, find_chromedriver, find_chromium, missing

WAIT_SECONDS = 15
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where this run's screenshots go."""
    return tmp_path_factory.mktemp("console-screenshots")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module; quit (browser and driver) at the end."""
    chromium = find_chromium()
    chromedriver = find_chromedriver()
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("selenium", "pip install -r requirements-dev.txt")
    profile = tmp_path_factory.mktemp("console-browser")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # with the driver's path given too, Selenium Manager never runs
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile / 'profile'}", "--window-size=1400,1000"):
        options.add_argument(flag)
    service = Service(executable_path=chromedriver, log_output=str(profile / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_page_load_timeout(WAIT_SECONDS)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server(app):
    with threaded_server(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def auth_server(auth_app):
    with threaded_server(auth_app) as port:
        yield f"http://127.0.0.1:{port}"


class Page:
    """The browser on one of the servers: open a path, find, wait; never sleep."""

    def __init__(self, driver, base: str, shots):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        self.base = base
        self.shots = shots
        self.wait = WebDriverWait(driver, WAIT_SECONDS, poll_frequency=0.1)
        driver.get(base + "/console/login")  # cookies are per host: both servers are 127.0.0.1
        driver.delete_all_cookies()

    def open(self, path: str) -> None:
        self.driver.get(self.base + path)

    def css(self, selector: str):
        from selenium.webdriver.common.by import By

        return self.wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, selector))

    def text(self, selector: str = "main") -> str:
        return self.css(selector).text

    def until_text(self, selector: str, expected: str) -> None:
        from selenium.common.exceptions import StaleElementReferenceException
        from selenium.webdriver.common.by import By

        def has(driver):
            elements = driver.find_elements(By.CSS_SELECTOR, selector)
            try:
                return bool(elements) and expected in elements[0].text
            except StaleElementReferenceException:  # the page it was on went away meanwhile: look again
                return False

        self.wait.until(has, f"{expected!r} never appeared in {selector}")

    def rows(self) -> list:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, "#subscriptions tbody tr")

    def fill(self, selector: str, value: str) -> None:
        field = self.css(selector)
        field.clear()
        field.send_keys(value)

    def screenshot(self, name: str) -> None:
        path = self.shots / f"{name}.png"
        assert self.driver.save_screenshot(str(path))
        wanted = os.environ.get("PUBSUB_CONSOLE_SCREENSHOTS")
        if wanted and name in ("console-overview", "console-dlq"):
            shutil.copy(path, os.path.join(wanted, f"{name}.png"))


def arrange(api: ApiHelper) -> list[str]:
    """A few topics and subscriptions with a backlog, and dead letters in invoices; their ids."""
    api.create_topic("orders")
    api.create_topic("payments")
    api.create_subscription("invoices", "orders", max_delivery_attempts=3, ack_deadline_seconds=30)
    api.create_subscription("mailer", "orders", filter={"country": ["BR", "US"]})
    api.create_subscription("audit-log", "payments", backoff_min_seconds=10, backoff_max_seconds=600)
    api.publish("orders", [{"order_id": 1000 + n, "country": "BR", "total": 19.9 + n} for n in range(12)])
    api.publish("payments", [{"payment_id": n, "status": "captured"} for n in range(3)])
    api.consume("mailer", batch_size=4)
    delivered = api.consume("invoices", batch_size=3)
    ids = [message["id"] for message in delivered]
    assert api.client.post("/subscriptions/invoices/nacks?dead_letter=true", json=ids).status_code == 204
    return sorted(ids)


def test_overview_shows_the_backlog_and_refreshes_itself(browser, server, shots, api):
    arrange(api)
    page = Page(browser, server, shots)
    page.open("/console/")
    assert "Authentication is off" in page.text("header")
    row = page.text('tr[data-id="invoices"]')
    # available, backoff, delayed, delivered, waiting behind a key, DLQ
    assert row.startswith("invoices orders 9 0 0 0 0 3"), row
    assert "3 attempts, backoff 5–300 s" in row
    # The worst backlog on top: mailer is owed 12 (8 available, 4 delivered), invoices 9.
    assert [row.get_attribute("data-id") for row in page.rows()] == [
        "mailer",
        "invoices",
        "audit-log",
    ]  # not by id
    page.screenshot("console-overview")
    api.publish("orders", [{"order_id": 2000}])
    # console.js fetches the counts again every 5 s: no reload, so no form loses its input.
    page.fill("#new-topic input[name=id]", "typed-meanwhile")
    page.until_text('tr[data-id="invoices"] .available', "10")
    assert page.css("#new-topic input[name=id]").get_attribute("value") == "typed-meanwhile"


def test_a_dead_letter_opened_and_reprocessed(browser, server, shots, api):
    ids = arrange(api)
    page = Page(browser, server, shots)
    page.open("/console/")
    page.css('tr[data-id="invoices"] a').click()
    page.until_text("h1", "Subscription invoices")
    first = page.css(f'#dlq tr[data-id="{ids[0]}"]')
    payload = first.find_element("css selector", "pre.payload").text
    assert payload.startswith('{\n  "country": "BR",\n  "order_id": 10'), payload  # pretty-printed
    page.screenshot("console-dlq")
    first.find_element("css selector", "input[type=checkbox]").click()
    page.css("#reprocess").click()
    page.until_text(".flashes", "1 dead letter(s) back in the queue")
    assert sorted(m["id"] for m in api.dlq("invoices")) == ids[1:]
    assert ids[0] not in page.text("main")
    page.screenshot("console-reprocessed")
    page.css("#purge-dlq").click()  # console.js asks first
    page.wait.until(lambda driver: driver.switch_to.alert).accept()
    page.until_text(".flashes", "2 dead letter(s) deleted")
    assert api.dlq("invoices") == []


def test_a_subscription_created(browser, server, shots, api):
    from selenium.webdriver.support.ui import Select

    api.create_topic("orders")
    api.create_topic("payments")
    page = Page(browser, server, shots)
    page.open("/console/")
    page.fill("#new-subscription input[name=id]", "audit")
    Select(page.css("#new-subscription select[name=topic_id]")).select_by_visible_text("payments")
    page.fill("#new-subscription input[name=max_delivery_attempts]", "7")
    page.fill("#new-subscription input[name=filter]", '{"status": ["captured"]}')
    page.css("#create-subscription").click()
    page.until_text(".flashes", "subscription audit created")
    settings = page.text("#settings")
    assert "Max delivery attempts 7" in settings and '{"status":["captured"]}' in settings
    created = api.client.get("/subscriptions/audit").json
    assert (created["topic_id"], created["max_delivery_attempts"]) == ("payments", 7)
    page.screenshot("console-subscription-created")


def test_login_then_a_403_for_a_missing_scope_then_logout(browser, auth_server, shots, auth_app):
    client_id, secret = new_client(auth_app, "topics:read topics:create")
    page = Page(browser, auth_server, shots)
    page.open("/console/")
    page.until_text("h1", "Log in")  # no session: the overview sends us here
    page.fill("#client_id", client_id)
    page.fill("#client_secret", "wrong")
    page.css("#login").click()
    page.until_text("#login-failed", "invalid client credentials")
    page.fill("#client_id", client_id)
    page.fill("#client_secret", secret)
    page.css("#login").click()
    # Logged in, but the overview also lists subscriptions: subscriptions:read is missing.
    page.until_text("h1", "403 Forbidden")
    assert "this needs subscriptions:read" in page.text("#detail")
    assert client_id in page.text("#who")
    assert "token" not in browser.current_url and secret not in browser.current_url
    page.screenshot("console-forbidden")
    page.open("/console/topics/nowhere")  # topics:read is enough for a topic page: a 404 here
    page.until_text("h1", "404")
    page.css("#logout").click()
    page.until_text("h1", "Log in")
    page.open("/console/")
    page.until_text("h1", "Log in")
