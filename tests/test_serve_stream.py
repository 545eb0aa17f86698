"""Streaming and the playground, driven by the clients people use: the official `openai` package
and a real headless Chromium (Debian's `chromium` with its `chromedriver`; `make test` installs
them when missing).

One application on a local Ray Serve instance serves a random `debug` model at 384 px (576 codes,
about 3 s a batch on two cores), so a stream has time to show its partial images and a client
time to leave mid-batch. Checked:

- the `openai` client: streamed generations and edits (1 and 2 input images) give the partial
  images asked for, the rows not generated yet grey, then the same image as without streaming;
  bad streaming requests are a `BadRequestError` naming the field;
- a client that disconnects mid-stream: the replica logs that its rows left the batch, and the
  request batched with it gets exactly the image it gets alone;
- the playground at `/` in Chromium: prompt, generate, the image growing, upload and edit, the
  gallery and its reuse button; its images are the server's, pixel for pixel.
"""

from __future__ import annotations

import base64
import glob
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serve_apps import bind_application, deployment_options, wait_for

GREY = (128, 128, 128)
SIDE = 384
SCREENSHOT = Path(os.environ.get("PLAYGROUND_SCREENSHOT", "outputs/playground-test.png"))


def png_bytes(color, size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB")


def assert_partial(image: Image.Image, rows: int, grid: int = SIDE // 16) -> None:
    """The first `rows` code rows are drawn, everything below them is the grey fill."""
    pixels = np.asarray(image)
    top = SIDE * rows // grid
    assert (pixels[top:] == GREY).all(), "rows not generated yet must be grey"
    assert not (pixels[:top] == GREY).all(), "the finished rows must be drawn"


@pytest.fixture(scope="module")
def stream_server(serve_cluster, tmp_path_factory):
    """serve/config.yaml's application, open, serving a 384 px debug model from a folder; a
    batch waits 0.5 s for company so that concurrent requests share it."""
    from ray import serve

    from janus_lab.model import debug
    from janus_lab.model.weights import save_pretrained

    folder = tmp_path_factory.mktemp("debug-384")
    save_pretrained(debug(image_size=SIDE, seed=4), str(folder))
    options = deployment_options()
    options["ImageModel"].pop("autoscaling_config")
    options["ImageModel"].update(num_replicas=1, user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.5,
                                                              "registry_poll_s": 0})
    args = {"model": str(folder), "device": "cpu", "defaults": {"cfg_weight": 4.0, "cfg_weight2": 2.0},
            "access": {"requests_per_minute": 0, "images_per_minute": 0}}
    serve.run(bind_application(args, options), name="janus-stream", route_prefix="/stream")
    yield f"{serve_cluster}/stream"
    serve.delete("janus-stream")


@pytest.fixture(scope="module")
def client(stream_server):
    import openai

    return openai.OpenAI(api_key="unused", base_url=f"{stream_server}/v1", max_retries=0, timeout=120)


@pytest.mark.integration
def test_a_streamed_generation_sends_its_partial_images_then_the_image_it_gets_without_streaming(client):
    events = list(client.images.generate(prompt="a red circle", stream=True, partial_images=2,
                                         extra_body={"seed": 5}))
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for event, rows in zip(events[:2], (8, 16)):  # 24 code rows, split in thirds
        assert event.size == f"{SIDE}x{SIDE}" and event.output_format == "png"
        assert_partial(b64_image(event.b64_json), rows)
    completed = events[-1]
    assert completed.usage.output_tokens == (SIDE // 16) ** 2
    plain = client.images.generate(prompt="a red circle", extra_body={"seed": 5})
    assert completed.b64_json == plain.data[0].b64_json


@pytest.mark.integration
def test_streamed_edits_with_one_and_two_input_images(client):
    red, blue = png_bytes((220, 20, 20)), png_bytes((20, 20, 220))
    for images in ([("a.png", red, "image/png")], [("a.png", red, "image/png"), ("b.png", blue, "image/png")]):
        events = list(client.images.edit(image=images, prompt="put the second on the first", stream=True,
                                         partial_images=1, extra_body={"seed": 8}))
        assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
        assert_partial(b64_image(events[0].b64_json), 12)
        assert events[1].usage.input_tokens_details.image_tokens == 2 * len(images) * (SIDE // 16) ** 2
        plain = client.images.edit(image=images, prompt="put the second on the first", extra_body={"seed": 8})
        assert events[1].b64_json == plain.data[0].b64_json


@pytest.mark.integration
def test_bad_streaming_requests_are_refused_before_the_stream_opens(client):
    import openai

    cases = [
        (dict(prompt="a cat", stream=True, partial_images=4), "partial_images"),
        (dict(prompt="a cat", partial_images=2), "partial_images"),  # partial images need a stream
        (dict(prompt="a cat", stream=True, response_format="png"), "response_format"),
        (dict(prompt="   ", stream=True), "prompt"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            result = client.images.generate(**kwargs)
            list(result) if kwargs.get("stream") else None
        assert caught.value.body["param"] == param, caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:
        list(client.images.edit(image=("a.png", b"not an image", "image/png"), prompt="x", stream=True))
    assert caught.value.body["param"] == "image[0]"


def replica_log_lines(text: str) -> list[str]:
    """Lines containing `text` in this cluster's ImageModel replica logs of the stream app."""
    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    lines = []
    for path in glob.glob(f"{session}/logs/serve/replica_janus-stream_ImageModel_*.log"):
        lines += [line for line in Path(path).read_text(errors="replace").splitlines() if text in line]
    return lines


@pytest.mark.integration
def test_a_client_leaving_mid_stream_frees_its_rows_and_the_request_batched_with_it_is_unchanged(stream_server):
    import requests

    def plain() -> str:
        response = requests.post(f"{stream_server}/v1/images/generations", json={"prompt": "a dog", "seed": 9},
                                 timeout=120)
        assert response.status_code == 200, response.text
        return response.json()["data"][0]["b64_json"]

    shared = {}
    neighbour = threading.Thread(target=lambda: shared.update(image=plain()))
    neighbour.start()
    time.sleep(0.1)  # inside the 0.5 s batch window: both requests go into one batch
    stream = requests.post(f"{stream_server}/v1/images/generations", stream=True, timeout=120,
                           json={"prompt": "a cat who leaves", "seed": 1, "stream": True, "partial_images": 3})
    assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
    for line in stream.iter_lines():
        if line.startswith(b"event: image_generation.partial_image"):
            break
    stream.close()  # the client goes away after its first partial image
    neighbour.join(timeout=120)
    deadline = time.monotonic() + 30
    while not (freed := replica_log_lines("'a cat who leaves': its client left")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert freed, "the replica never logged the left request's rows leaving the batch"
    step = int(freed[-1].rsplit("at step ", 1)[1].split()[0])
    assert "its 2 rows left the batch" in freed[-1] and step < (SIDE // 16) ** 2 - 1, freed[-1]
    assert replica_log_lines("a batch of 2 requests, 1 of them streaming"), "the two requests did not share a batch"
    assert shared["image"] == plain()  # the neighbour's image does not depend on who left


# --------------------------------------------------------------------------- the playground


@pytest.mark.integration
def test_the_playground_generates_streams_edits_and_reuses_in_a_real_browser(stream_server, browser, client,
                                                                             tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{stream_server}/")
    wait_for(browser, "document.getElementById('model').textContent.includes('384 px')")
    # The server's sampling defaults are filled in.
    assert browser.find_element(By.ID, "cfg_weight").get_attribute("value") == "4"
    assert browser.find_element(By.ID, "cfg_weight2").get_attribute("value") == "2"

    browser.find_element(By.ID, "prompt").send_keys("a blue square")
    browser.find_element(By.ID, "seed").send_keys("11")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, "document.getElementById('live').dataset.partial === '0'")
    partial = b64_image(browser.find_element(By.ID, "live").get_attribute("src").split(",", 1)[1])
    assert_partial(partial, 6)  # 3 partial images over 24 rows: the first after 6
    wait_for(browser, "document.querySelectorAll('#gallery .card').length === 1")
    log = browser.execute_script("return window.playgroundLog")
    assert [e["type"] for e in log] == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert card.find_element(By.CSS_SELECTOR, ".seed").text == "seed 11"
    assert len(card.find_elements(By.CSS_SELECTOR, ".strip img")) == 3
    shown = b64_image(card.find_element(By.CSS_SELECTOR, "img").get_attribute("src").split(",", 1)[1])
    served = client.images.generate(prompt="a blue square", extra_body={"seed": 11, "cfg_weight": 4})
    assert np.array_equal(np.asarray(shown), np.asarray(b64_image(served.data[0].b64_json)))

    # An edit: upload an image, generate, and catch the page mid-stream for the screenshot.
    upload = tmp_path / "input.png"
    upload.write_bytes(png_bytes((240, 220, 30), size=(96, 64)))
    browser.find_element(By.ID, "files").send_keys(str(upload))
    wait_for(browser, "document.querySelectorAll('#inputs img').length === 1")
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("make the background red")
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, "document.getElementById('live').dataset.partial === '1'")
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOT))
    wait_for(browser, "document.querySelectorAll('#gallery .card').length === 2")
    newest = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert "1 input image(s)" in newest.find_element(By.CSS_SELECTOR, ".settings").text
    assert browser.execute_script("return window.playgroundLog")[-1]["type"] == "image_edit.completed"
    shown = b64_image(newest.find_element(By.CSS_SELECTOR, "img").get_attribute("src").split(",", 1)[1])
    served = client.images.edit(image=("input.png", upload.read_bytes(), "image/png"),
                                prompt="make the background red", extra_body={"seed": 11, "cfg_weight": 4})
    assert np.array_equal(np.asarray(shown), np.asarray(b64_image(served.data[0].b64_json)))

    # Reuse the first result: its prompt and seed come back, its (absent) inputs too.
    browser.find_elements(By.CSS_SELECTOR, "#gallery .card .reuse")[1].click()
    assert browser.find_element(By.ID, "prompt").get_attribute("value") == "a blue square"
    assert browser.find_element(By.ID, "seed").get_attribute("value") == "11"
    assert not browser.find_elements(By.CSS_SELECTOR, "#inputs img")
    screenshot = Image.open(SCREENSHOT)
    assert screenshot.size[0] >= 1000 and len(set(screenshot.convert("RGB").getdata())) > 50

