"""The web viewer's test bench, for tests/test_serve*.py: a client that sends the
server's token, a uvicorn server of the requesting module's ``app`` fixture, a headless
Debian chromium (``make test`` installs it and its chromedriver: nothing is downloaded),
and the page's steps to start a query."""

from __future__ import annotations

import io
import shutil
import threading
import time

import numpy as np
import pytest
from PIL import Image

from fastapi.testclient import TestClient  # the web extra: pip install 'kql[web]'

from kql import serve

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def api_client(app, **options) -> TestClient:
    """A client of ``app`` that sends the server's token, as the page does."""
    client = TestClient(app, **options)
    client.headers[serve.TOKEN_HEADER] = client.get("/api/session").json()["token"]
    return client


@pytest.fixture(scope="module")
def server(app):
    import uvicorn

    sock = serve.listen("127.0.0.1", 0)
    instance = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=instance.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not instance.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert instance.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    instance.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: apt-get install -y chromium chromium-driver "
                    "(make test installs them)", pytrace=False)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))   # no selenium-manager
    yield driver
    driver.quit()


def distinct_colours(png: bytes, rect: dict) -> int:
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    box = (int(rect["x"]), int(rect["y"]), int(rect["x"] + rect["width"]), int(rect["y"] + rect["height"]))
    pixels = np.asarray(shot.crop(box)).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))


def start_query(browser, server: str, model: str, image: str, patch: int, stride: int):
    """Open the page, pick ``model`` and ``image``, set the patch and stride, press Run;
    the page's ``WebDriverWait`` (30 s) back."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 2)
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    Select(browser.find_element(By.ID, "image")).select_by_value(image)
    for field, value in (("patch", patch), ("stride", stride)):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(str(value))
    browser.find_element(By.ID, "run").click()
    return wait
