"""``kql serve``: the JSON API (FastAPI's TestClient) and the page in a real headless
chromium (selenium), on a small registered model whose maps are checked against the
same query run through ``con.execute``.

The browser test needs Debian's chromium and chromedriver (``make test`` installs them):
without them it fails, saying how to install them.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

import kql
from helpers import smooth_noise_image
from models_zoo import sensitive_small_cnn

from fastapi.testclient import TestClient  # the web extra: pip install 'kql[web]'

from kql import cli, serve

QUERY = "OCCLUDE img USING net PATCH 6 STRIDE 4"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def con():
    con = kql.connect()
    con.register_model("net", sensitive_small_cnn())
    con.register_image("img", smooth_noise_image(24, 30))
    return con


@pytest.fixture(scope="module")
def client(con):
    return TestClient(serve.create_app(con, max_upload=64 * 1024))


def occlude(client, **fields):
    return client.post("/api/occlude", json={"model": "net", "image": "img", "patch": 6,
                                             "stride": 4, **fields})


def png_bytes(height=20, width=16) -> bytes:
    out = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


# -- the JSON API -------------------------------------------------------------------------------

def test_lists_models_images_and_samples(client):
    models = [m["name"] for m in client.get("/api/models").json()["models"]]
    images = client.get("/api/images").json()
    assert {"net", "efficientnet_lite0"} <= set(models)
    assert [i["name"] for i in images["images"]] == ["img"] and "chelsea" in images["samples"]


def test_occlude_returns_the_map_of_the_same_query(client, con):
    data = occlude(client).json()
    expected = con.execute(QUERY)
    np.testing.assert_allclose(np.asarray(data["values"], np.float32), expected.heatmap,
                               atol=1e-6, rtol=0)
    assert (data["rows"], data["cols"]) == expected.heatmap.shape
    assert data["probability"] == pytest.approx(expected.probability)
    assert data["label"] == expected.label and data["target"] == expected.target
    assert data["plan"].startswith("HeatMap:") and data["query"] == QUERY
    assert data["boxes"][1][2] == pytest.approx(list(expected.box(1, 2)))
    overlay = client.get(data["overlay_url"])
    assert overlay.status_code == 200 and overlay.content[:4] == b"\x89PNG"


def test_region_is_sent_in_original_pixels(client, con):
    data = occlude(client, region=[4, 2, 20, 16]).json()
    expected = con.execute(QUERY + " REGION (4, 2, 20, 16)").heatmap
    np.testing.assert_allclose(np.asarray(data["values"], np.float32), expected, atol=1e-6, rtol=0)


def test_compare_returns_both_maps_and_their_ssim(client, con):
    from kql.planner.tuning import heatmap_ssim

    data = occlude(client, stride=2, compare=True, ssim=0.5).json()
    exact, approx = (np.asarray(data[k]["values"], np.float32) for k in ("exact", "approx"))
    np.testing.assert_allclose(exact, con.execute("OCCLUDE img USING net PATCH 6 STRIDE 2").heatmap,
                               atol=1e-6, rtol=0)
    assert "WITH SSIM >= 0.5" in data["approx"]["query"]
    assert data["ssim"] == pytest.approx(heatmap_ssim(exact, approx))


def test_upload_registers_a_png_and_refuses_a_large_file(client):
    data = client.post("/api/upload", files={"file": ("a.png", png_bytes(), "image/png")}).json()
    assert data["name"].startswith("upload_") and (data["height"], data["width"]) == (20, 16)
    assert client.get(f"/api/image/{data['name']}.png").content[:4] == b"\x89PNG"
    big = client.post("/api/upload", files={"file": ("b.png", b"\0" * 200_000, "image/png")})
    assert big.status_code == 413 and "too large" in big.json()["error"]
    bad = client.post("/api/upload", files={"file": ("c.png", b"not an image", "image/png")})
    assert bad.status_code == 400 and "\n" not in bad.json()["error"]


def test_paths_outside_the_allowed_folders_are_refused(client):
    for path in ("'/etc/passwd'", "'../../../etc/hosts'", f"'{os.getcwd()}/../x.png'"):
        answer = occlude(client, image=path)
        assert answer.status_code == 403, path
        assert "working directory" in answer.json()["error"]


def test_a_file_in_the_catalog_directory_is_read(tmp_path):
    con = kql.connect(str(tmp_path))
    con.register_model("net", sensitive_small_cnn())
    (tmp_path / "scan.png").write_bytes(png_bytes(24, 30))
    client = TestClient(serve.create_app(con))
    answer = occlude(client, image=f"'{tmp_path / 'scan.png'}'")
    assert answer.status_code == 200, answer.json()
    assert answer.json()["query"].startswith(f"OCCLUDE '{tmp_path / 'scan.png'}' USING net")
    assert occlude(client, image="'/etc/hostname'").status_code == 403


@pytest.mark.parametrize("fields, words", [
    ({"patch": 0}, "patch must be a whole number"),
    ({"patch": "6; LOAD"}, "patch must be a whole number"),
    ({"patch": 60}, "larger than the image"),
    ({"model": "net USING x"}, "unknown model"),
    ({"image": "img PATCH 2"}, "unknown image"),
    ({"region": [0, 0, 0, 5]}, "region width"),
    ({"ssim": 2}, "ssim must be"),
])
def test_bad_requests_are_one_line_400s(client, fields, words):
    answer = occlude(client, **fields)
    assert answer.status_code == 400
    assert words in answer.json()["error"] and "\n" not in answer.json()["error"]


def test_cli_says_when_the_web_extra_is_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert cli.main(["serve"]) == cli.EXIT_USAGE
    assert capsys.readouterr().err.strip().endswith("kql serve needs the web extra: pip install 'kql[web]'")


def test_serve_reports_a_port_in_use_on_one_line(capsys):
    taken = serve.listen("127.0.0.1", 0)
    taken.listen()
    try:
        assert serve.serve("127.0.0.1", taken.getsockname()[1]) == 1
    finally:
        taken.close()
    assert capsys.readouterr().err.strip().startswith("error: cannot listen on 127.0.0.1:")


# -- the page in a real browser ------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(con):
    import uvicorn

    sock = serve.listen("127.0.0.1", 0)
    app = serve.create_app(con, allowed_hosts=list(serve.LOCAL_HOSTS))
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


def test_the_page_runs_a_query_and_shows_a_cell(server, browser, con):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(server + "/")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) >= 2)
    Select(browser.find_element(By.ID, "model")).select_by_value("net")
    Select(browser.find_element(By.ID, "image")).select_by_value("img")
    for field, value in (("patch", "6"), ("stride", "4")):
        box = browser.find_element(By.ID, field)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: d.execute_script(
        "const i = document.querySelector('img.overlay'); return i && i.complete && i.naturalWidth > 0"))
    canvas = browser.find_element(By.CSS_SELECTOR, ".map-canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, 10, 5).click().perform()
    text = browser.find_element(By.ID, "cell").text
    assert "cell (" in text, text
    i, j = (int(v) for v in text.split("cell (")[1].split(")")[0].split(","))
    assert f"= {con.execute(QUERY).heatmap[i, j]:.4f}" in text
    shot = browser.get_screenshot_as_png()
    overlay = browser.find_element(By.CSS_SELECTOR, "img.overlay")
    assert overlay.rect["width"] > 100 and distinct_colours(shot, overlay.rect) > 200
    assert distinct_colours(shot, canvas.rect) > 20
