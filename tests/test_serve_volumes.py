"""``kql serve`` with volumes: the API lists a volume with its depth, draws any of its
slices, and returns its map slice by slice; the page (headless chromium) browses the
map's slices over the scan's and reads a cell, checked against ``con.execute``."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import kql
from kql import serve
from serve_page import api_client, browser, distinct_colours, server, start_query  # noqa: F401
from volume_models import blob_volume, resnet3d, sensitive_volume

QUERY = "OCCLUDE ct USING net PATCH 4 STRIDE 2"


@pytest.fixture(scope="module")
def con():
    volume = blob_volume(10, 12, 14, seed=3)
    con = kql.connect()
    con.register_model("net", sensitive_volume(resnet3d(), volume, (4, 4, 4), (float(volume.mean()),)))
    con.register_volume("ct", volume)
    con.register_image("img", torch.rand(1, 16, 16))
    return con


@pytest.fixture(scope="module")
def app(con):
    return serve.create_app(con, allowed_hosts=list(serve.LOCAL_HOSTS))


@pytest.fixture(scope="module")
def client(con):
    return api_client(serve.create_app(con))


def test_a_volume_is_listed_with_its_depth_and_drawn_slice_by_slice(client, con):
    images = {im["name"]: im for im in client.get("/api/images").json()["images"]}
    assert (images["ct"]["depth"], images["ct"]["height"], images["ct"]["width"]) == (10, 12, 14)
    assert images["img"]["depth"] is None
    pictures = []
    for index in (None, 0, 9):
        answer = client.get("/api/image/ct.png" + ("" if index is None else f"?slice={index}"))
        assert answer.status_code == 200, answer.text
        with Image.open(io.BytesIO(answer.content)) as picture:
            assert picture.size == (14, 12)                   # a slice: H x W
            pictures.append(np.asarray(picture))
    volume = con.catalog.resolve_image("ct")[0]
    assert np.corrcoef(pictures[0].ravel(), volume[5].numpy().ravel())[0, 1] > 0.99   # the middle
    assert not np.array_equal(pictures[1], pictures[2])
    for bad in ("10", "-1", "x", "99999999"):
        answer = client.get(f"/api/image/ct.png?slice={bad}")
        assert answer.status_code == 400 and "\n" not in answer.json()["error"]


def test_a_volume_map_comes_back_slice_by_slice(client, con):
    data = client.post("/api/occlude", json={"model": "net", "image": "ct", "patch": 4,
                                             "stride": 2}).json()
    expected = con.execute(QUERY).heatmap
    assert expected.max() - expected.min() > 0.05              # a map that varies
    assert data["volume"] and (data["slices"], data["rows"], data["cols"]) == expected.shape
    np.testing.assert_allclose(np.array(data["values"], np.float32), expected, atol=1e-6)
    assert data["slice_first"] == [0, 2, 4, 6] and data["slice_patch"] == 4
    assert data["boxes"][1][2] == [4, 2, 4, 4]                # x, y, w, h of cell (., 1, 2)
    overlay = client.get(data["overlay_url"])
    assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")


def test_the_page_browses_a_volume_maps_slices(server, browser, con):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    wait = start_query(browser, server, "net", "ct", 4, 2)
    assert browser.find_element(By.ID, "slice").is_displayed()       # the volume's slider
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".map-slice-at")
               and "of 4" in d.find_element(By.CSS_SELECTOR, ".map-slice-at").text)
    expected = con.execute(QUERY).heatmap
    strongest = int(np.unravel_index(int(np.argmin(expected)), expected.shape)[0])
    assert browser.find_element(By.CSS_SELECTOR, ".map-slice").get_attribute("value") == str(strongest)
    canvas = browser.find_element(By.CSS_SELECTOR, ".map-canvas")
    wait.until(lambda d: canvas.rect["width"] > 100)
    shots = []
    for s in (0, 3):
        browser.execute_script(
            "const r = document.querySelector('.map-slice'); r.value = arguments[0];"
            "r.dispatchEvent(new Event('input'));", s)
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".map-slice-at").text.startswith(f"{s} of 4"))
        ActionChains(browser).move_to_element_with_offset(canvas, 5, 5).click().perform()
        text = browser.find_element(By.ID, "cell").text
        assert f"cell ({s}, " in text, text
        i, j = (int(v) for v in text.split(f"cell ({s}, ")[1].split(")")[0].split(","))
        assert f"= {expected[s, i, j]:.4f}" in text, text
        shots.append(browser.get_screenshot_as_png())
    assert distinct_colours(shots[0], canvas.rect) > 20
    assert shots[0] != shots[1]                               # another slice, another picture
