"""``kql serve``: the JSON API (FastAPI's TestClient) and the page in a real headless
chromium (selenium), on a small registered model whose maps are checked against the
same query run through ``con.execute``.

The browser test needs Debian's chromium and chromedriver (``make test`` installs them):
without them it fails, saying how to install them (tests/serve_page.py: the server, the
browser and the page's steps, shared with tests/test_serve_volumes.py).
"""

from __future__ import annotations

import io
import json
import os
import sys
import time

import numpy as np
import pytest
from PIL import Image

import kql
from helpers import smooth_noise_image
from models_zoo import sensitive_small_cnn

from fastapi.testclient import TestClient  # the web extra: pip install 'kql[web]'

from kql import cli, serve, serve_guard
from serve_page import api_client, browser, distinct_colours, server, start_query  # noqa: F401

QUERY = "OCCLUDE img USING net PATCH 6 STRIDE 4"


@pytest.fixture(scope="module")
def con():
    con = kql.connect()
    con.register_model("net", sensitive_small_cnn())
    con.register_image("img", smooth_noise_image(24, 30))
    return con


@pytest.fixture(scope="module")
def client(con):
    return api_client(serve.create_app(con, max_upload=64 * 1024))


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


def test_compare_returns_both_maps_and_their_ssim(con):
    from kql.planner.tuning import heatmap_ssim

    big = kql.connect()
    big.register_model("net", con.catalog.resolve_model("net").module)
    big.register_image("big", smooth_noise_image(64, 64))       # a 30x30 map: checked, approximate
    data = occlude(api_client(serve.create_app(big)), image="big", stride=2, compare=True,
                   ssim=0.5).json()
    exact, approx = (np.asarray(data[k]["values"], np.float32) for k in ("exact", "approx"))
    np.testing.assert_allclose(exact, big.execute("OCCLUDE big USING net PATCH 6 STRIDE 2").heatmap,
                               atol=1e-6, rtol=0)
    assert "WITH SSIM >= 0.5" in data["approx"]["query"] and data["note"] is None
    assert not np.array_equal(exact, approx)
    assert data["ssim"] == pytest.approx(heatmap_ssim(exact, approx))


def test_compare_on_a_map_too_small_to_check_runs_once_and_says_why(client, con, monkeypatch):
    ran = []
    viewer = client.app.state.viewer
    real = viewer.con.execute
    monkeypatch.setattr(viewer.con, "execute", lambda text, **kw: ran.append(text) or real(text, **kw))
    data = occlude(client, compare=True, ssim=0.9).json()           # a 5x7 map
    assert [t for t in ran if t.startswith("OCCLUDE")] == [QUERY + " WITH SSIM >= 0.9"]
    assert data["approx"] is None and data["ssim"] is None
    assert data["note"].startswith("this 5x7 map is too small for the approximate check")
    np.testing.assert_allclose(np.asarray(data["exact"]["values"], np.float32),
                               con.execute(QUERY).heatmap, atol=1e-6, rtol=0)


def flat_png(height, width) -> bytes:
    """A PNG of one grey: a large image in a small file."""
    out = io.BytesIO()
    Image.fromarray(np.full((height, width), 128, np.uint8)).save(out, "PNG")
    return out.getvalue()


def upload(client, data: bytes):
    return client.post("/api/upload", files={"file": ("a.png", data, "image/png")})


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
    client = api_client(serve.create_app(con))
    answer = occlude(client, image=f"'{tmp_path / 'scan.png'}'")
    assert answer.status_code == 200, answer.json()
    assert answer.json()["query"].startswith(f"OCCLUDE '{tmp_path / 'scan.png'}' USING net")
    assert occlude(client, image="'/etc/hostname'").status_code == 403


def test_uploads_are_read_within_the_pixel_and_memory_limits():
    con = kql.connect()
    client = api_client(serve.create_app(con, max_upload=64 * 1024))
    con.execute("SET max_image_pixels = 100")
    answer = upload(client, png_bytes(20, 16))
    assert answer.status_code == 400
    assert answer.json()["error"] == ("image file 'the upload' has 20x16 = 320 pixels, more than "
                                      "max_image_pixels (100)")
    con.execute("SET max_image_pixels = 64000000")
    con.execute("SET memory_limit = '1 MB'")                     # decodes 65,536 pixels at most
    answer = upload(client, flat_png(300, 300))
    assert answer.status_code == 400 and "90,000 pixels" in answer.json()["error"]
    assert answer.json()["error"].endswith("(memory_limit 1.0 MB decodes at most 65,536 pixels)")
    assert upload(client, flat_png(200, 300)).status_code == 200     # 60,000 pixels fit


def test_uploads_are_kept_in_a_bounded_store():
    def uploaded(client, count):
        names = [upload(client, png_bytes()).json()["name"] for _ in range(count)]
        listed = [i["name"] for i in client.get("/api/images").json()["images"]]
        return names, listed

    con = kql.connect()
    client = api_client(serve.create_app(con, keep_uploads=2))
    names, listed = uploaded(client, 3)
    assert listed == sorted(names[1:])
    assert names[0] not in {row["name"] for row in con.catalog.image_rows()}     # its pixels freed
    gone = client.get(f"/api/image/{names[0]}.png")
    assert gone.status_code == 400 and "unknown image" in gone.json()["error"]
    assert client.get(f"/api/image/{names[2]}.png").status_code == 200
    one = 3 * 20 * 16 * 4                                           # float32 bytes of one upload
    client = api_client(serve.create_app(kql.connect(), keep_bytes=2 * one + 1))
    names, listed = uploaded(client, 4)
    assert listed == sorted(names[2:])


def test_request_bodies_are_capped(client):
    spaces = b"{" + b" " * 100_000 + b"}"                          # a valid, empty, 100 KB object
    json_type = {"Content-Type": "application/json"}
    for content in (spaces, iter([spaces[:50_000], spaces[50_000:]])):   # chunked: no length
        answer = client.post("/api/occlude", content=content, headers=json_type)
        assert answer.status_code == 413 and "too large" in answer.json()["error"]


def test_cross_site_requests_are_refused(con):
    client = TestClient(serve.create_app(con))
    token = client.get("/api/session").json()["token"]
    page = client.get("/").headers                   # nobody may frame it, nor read it cross-site
    assert page["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page["content-security-policy"]
    assert "access-control-allow-origin" not in client.get("/api/session").headers
    body = {"model": "net", "image": "img", "patch": 6, "stride": 4}
    token_header = {serve.TOKEN_HEADER: token}
    for headers in ({"Origin": "http://evil.example"},               # a form POST of another page
                    {"Origin": "http://evil.example", **token_header},
                    {"Origin": "null", **token_header},
                    {"Referer": "http://evil.example/page.html", **token_header},
                    {},                                               # no token
                    {serve.TOKEN_HEADER: token[:-1] + "x"}):
        for answer in (client.post("/api/upload", files={"file": ("a.png", png_bytes(), "image/png")},
                                   headers=headers),
                       client.post("/api/occlude", json=body, headers=headers)):
            assert answer.status_code == 403, headers
            assert "refused" in answer.json()["error"] and "\n" not in answer.json()["error"]
    same = {"Origin": "http://testserver", "Referer": "http://testserver/", **token_header}
    assert client.post("/api/occlude", json=body, headers=same).status_code == 200
    assert client.post("/api/occlude", json=body, headers=token_header).status_code == 200
    assert client.post("/api/upload", files={"file": ("a.png", png_bytes(), "image/png")},
                       headers=same).status_code == 200


def test_progress_reports_positions_and_time_left(con):
    app = serve.create_app(con)
    client = api_client(app)
    seen = []

    class Watched(serve.RunProgress):               # what the page would read, as the run goes
        def __call__(self, done, total):
            super().__call__(done, total)
            seen.append(client.get("/api/progress").json())

    app.state.viewer.progress = Watched()
    data = occlude(client, stride=2).json()
    total = data["positions"]
    assert total == 130 and {s["total"] for s in seen} == {total}
    middle = [s for s in seen if 0 < s["done"] < total]
    assert middle and all(s["running"] for s in middle)
    assert f"/{total} positions" in middle[-1]["text"] and "s left" in middle[-1]["text"]
    after = client.get("/api/progress").json()
    assert not after["running"] and after["done"] == after["total"] == total


def test_globs_folders_and_links_out_of_the_folders_open_nothing(tmp_path, monkeypatch):
    from kql.catalog import images

    outside, folder = tmp_path / "outside", tmp_path / "catalog"
    outside.mkdir(), folder.mkdir(), (folder / "sub").mkdir()
    (outside / "secret.png").write_bytes(png_bytes(24, 30))
    (folder / "scan.png").write_bytes(png_bytes(24, 30))
    (folder / "leak.png").symlink_to(outside / "secret.png")
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    con = kql.connect(str(folder))
    con.register_model("net", sensitive_small_cnn())
    con.execute(f"LOAD IMAGE away FROM '{outside}/secret.png'")
    con.execute(f"LOAD IMAGES scans FROM '{folder}/s*.png'")
    opened = []
    real_open = images.open_regular_file
    monkeypatch.setattr(images, "open_regular_file",
                        lambda path, *a, **k: opened.append(os.path.realpath(path)) or real_open(path, *a, **k))
    client = api_client(serve.create_app(con), raise_server_exceptions=False)
    refused = {f"'{folder}/*.png'": (400, "glob"), f"'{folder}/linked/*.png'": (403, "directory"),
               f"'{folder}/leak.png'": (403, "directory"), f"'{folder}/linked/secret.png'": (403, "directory"),
               f"'{folder}/sub'": (400, "folder"), "away": (403, "outside"), "scans": (400, "image table")}
    for image, (status, words) in refused.items():
        by_name = [] if "/" in image else [client.get(f"/api/image/{image}.png")]
        for answer in [occlude(client, image=image), *by_name]:
            assert answer.status_code == status, (image, answer.json())
            assert words in answer.json()["error"]
    assert not any(path.startswith(str(outside)) for path in opened), opened
    assert [i["name"] for i in client.get("/api/images").json()["images"]] == ["away"]
    assert occlude(client, image=f"'{folder}/scan.png'").status_code == 200


HOSTILE = [float("nan"), float("inf"), float("-inf"), 10 ** 400, -(10 ** 400), 1e308, -1, 0,
           2 ** 63, "6", "", "x" * 5000, "\ud800", "'/etc/passwd'", "'*'", "sample('x')", [], [6],
           [0, 0, float("nan"), 5], {"a": 1}, None, True, False, [[[[[]]]]], {"$": {"$": [1]}}]


def test_hostile_json_is_a_one_line_4xx_never_a_500(con):
    client = api_client(serve.create_app(con), raise_server_exceptions=False)
    base = {"model": "net", "image": "img", "patch": 6, "stride": 4}
    bodies = [{**base, field: value} for field in (*serve_guard.FIELDS, "zzz") for value in HOSTILE]
    bodies += [{**base, "region": [0, 0, value, 5]} for value in HOSTILE]
    bodies += [{key: v for key, v in base.items() if key != gone} for gone in base]
    texts = [json.dumps(b) for b in bodies] + [
        "[]", '"x"', "1", "null", "true", "{}", "{", "[" * 30_000 + "]" * 30_000, '"\\ud800"', ""]
    for text in texts:
        answer = client.post("/api/occlude", content=text, headers={"Content-Type": "application/json"})
        assert answer.status_code in (200, 400, 403, 413), (text[:80], answer.text[:200])
        if answer.status_code != 200:
            error = answer.json()["error"]
            assert "\n" not in error and 0 < len(error) <= 300, (text[:80], error)
    raw = b"\xff\xfe{"                                                   # not UTF-8
    answer = client.post("/api/occlude", content=raw, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400
    for path in ("/api/image/%ED%A0%80.png", "/api/image/%27%00%27.png", "/api/image/" + "a" * 5000 + ".png",
                 "/api/image/sample:..%2F..%2Fetc.png", "/api/result/%27%3B/overlay.png",
                 "/api/image/%27%2A%27.png"):
        answer = client.get(path)
        assert 400 <= answer.status_code < 500, (path, answer.text[:200])
    for files, data in (({}, {"file": "text"}), ({"file": ("a", b"x"), "other": ("b", b"y")}, {}),
                        ({"file": ("a.dcm", b"DICM" * 40, "application/dicom")}, {})):
        answer = client.post("/api/upload", files=files or None, data=data or None)
        assert 400 <= answer.status_code < 500, (files, answer.text[:200])
    for content, kind in ((b"{}", "application/json"), (b"--x\r\n", "multipart/form-data; boundary=x"),
                          (b"--x", "multipart/form-data")):
        answer = client.post("/api/upload", content=content, headers={"Content-Type": kind})
        assert 400 <= answer.status_code < 500, (content, answer.text[:200])


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
def app(con):
    return serve.create_app(con, allowed_hosts=list(serve.LOCAL_HOSTS))


def test_the_page_runs_a_query_and_shows_a_cell(server, browser, con):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    wait = start_query(browser, server, "net", "img", 6, 4)
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


class SlowProgress(serve.RunProgress):
    """The run's real progress, each batch held 0.3 s so that the page's line can be seen."""

    def __call__(self, done, total):
        super().__call__(done, total)
        time.sleep(0.3)


def test_the_page_shows_progress_a_legend_and_clears_the_last_cell(server, app, browser, con,
                                                                   monkeypatch):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    monkeypatch.setattr(app.state.viewer, "progress", SlowProgress())
    wait = start_query(browser, server, "net", "img", 6, 2)         # 130 positions in 5 batches
    status = lambda: browser.find_element(By.ID, "status").text
    wait.until(lambda d: "/130 positions" in status() and "s left" in status())
    wait.until(lambda d: status().startswith("done: 130 positions in"))
    legend = browser.find_element(By.CSS_SELECTOR, ".legend-bar")
    shot = browser.get_screenshot_as_png()
    assert legend.rect["width"] > 200 and distinct_colours(shot, legend.rect) > 30
    probability = con.execute("OCCLUDE img USING net PATCH 6 STRIDE 2").probability
    labels = browser.find_element(By.CSS_SELECTOR, ".legend-labels").text
    assert f"{probability:.4f} unoccluded" in labels and "lowers P" in labels
    canvas = browser.find_element(By.CSS_SELECTOR, ".map-canvas")
    ActionChains(browser).move_to_element_with_offset(canvas, 10, 5).click().perform()
    assert "cell (" in browser.find_element(By.ID, "cell").text
    browser.find_element(By.ID, "run").click()
    wait.until(lambda d: "cell (" not in d.find_element(By.ID, "cell").text)
    wait.until(lambda d: status().startswith("done:"))
    assert browser.find_element(By.ID, "cell").text == "Click a cell of a map to see its value."
