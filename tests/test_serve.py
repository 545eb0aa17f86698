"""The image server (`serve/`, `janus_lab.serving`): request checks, and the whole application on
Ray Serve over HTTP on 127.0.0.1, serving the registry's champion on the local stack.

The integration part deploys `serve/config.yaml`'s deployments (their options as written, with
the overrides below so that autoscaling and overload show within seconds) and then, in order:
answers T2I and edit requests, refuses bad ones with 4xx, follows the champion alias when a
promotion moves it (no request failing meanwhile), scales from 1 to 2 replicas under load and
back, and answers 503 past the queue limit with nothing else failing.

A second application on the same Serve instance takes API keys (one from an environment
variable, others from a file) behind two API replicas: 401 without a key or with a wrong one,
200 with either key and through the official `openai` client, 429 with Retry-After past a key's
limits counted across both replicas, and a key added to the file accepted without a restart.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import os
import threading
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image

from janus_lab.config import ConfigError
from janus_lab.serving import ModelUserConfig, ServeArgs, ServeLimits, build_app
from janus_lab.serving.access import ApiKeys, KeySourceError, SlidingWindowLimits, key_digest, key_id
from janus_lab.serving.api import ApiError, check_image, parse_fields, parse_stream, GENERATION_FIELDS, EDIT_FIELDS
from janus_lab.serving.settings import AccessConfig
from registry_runs import make_run
from serve_apps import bind_application, deployment_options, serve_config

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = f"serve-tests-{os.getpid()}"


def png_bytes(size=(64, 64), color=(200, 30, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- unit: no cluster


def test_config_file_is_a_valid_serve_config_whose_args_and_user_config_parse(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    config = serve_config()
    ServeDeploySchema.model_validate(config)  # what `serve run` / `serve deploy` check
    (application,) = config["applications"]
    assert application["import_path"] == "serve.app:build"
    args = ServeArgs.parse(application["args"])
    assert args.model == "models:/janus-4o@champion"
    deployments = {d["name"]: d for d in application["deployments"]}
    assert set(deployments) == {"ImageModel", "ImageApi", "ApiLimiter"}
    # The per-key counts live in the limiter: a second replica would count on its own.
    assert deployments["ApiLimiter"]["num_replicas"] == 1
    assert args.access.open, "the local demo runs without keys (the cluster's override adds them)"
    model = deployments["ImageModel"]
    ModelUserConfig.parse(model["user_config"])
    scaling = model["autoscaling_config"]
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] >= 2
    assert model["max_queued_requests"] > 0
    monkeypatch.syspath_prepend(str(REPO))  # `serve run` imports from the current directory
    from serve.app import build

    assert build is build_app
    # `serve deploy` refuses options for a deployment the application does not have.
    from ray.serve._private.build_app import build_app as build_deployments

    built = build_deployments(build_app(application["args"]), name=application["name"])
    assert {d.name for d in built.deployments} == set(deployments)


def test_args_name_a_misspelt_key_and_read_the_sweep_defaults_file(tmp_path):
    with pytest.raises(ConfigError, match="limits.max_m.*max_n"):
        ServeArgs.parse({"limits": {"max_m": 3}})
    with pytest.raises(ConfigError, match="device: expected one of 'auto', 'cpu', 'cuda', got str 'tpu'"):
        ServeArgs.parse({"device": "tpu"})
    with pytest.raises(ConfigError, match="dtype: expected one of 'auto', 'float32', 'bfloat16', got str 'float16'"):
        ServeArgs.parse({"dtype": "float16"})
    best = tmp_path / "best.yaml"
    best.write_text("cfg_weight: 3.5\ncfg_weight2: 1.5\ntemperature: 0.8\n")
    parsed = ServeArgs.parse({"defaults_file": str(best)})
    assert (parsed.defaults.cfg_weight, parsed.defaults.cfg_weight2, parsed.defaults.temperature) == (3.5, 1.5, 0.8)
    best.write_text("cfg_wieght: 3.5\n")
    with pytest.raises(ConfigError, match="defaults_file .*cfg_wieght.*cfg_weight"):
        ServeArgs.parse({"defaults_file": str(best)})


KEY_A, KEY_B, KEY_C = "alpha-" + "a" * 26, "bravo-" + "b" * 26, "charlie-" + "c" * 24
"""Test keys: made up here, long enough for the minimum length."""


@pytest.mark.parametrize("args, text", [
    ({"api_key": KEY_A}, "api_key: API keys are never written in the config"),
    ({"access": {"api_keys": [KEY_A]}}, "access.api_keys: API keys are never written in the config"),
    ({"access": {"api_keys_env": KEY_A}}, "must be the name of an environment variable"),
    ({"access": {"api_keys_file": "keys.txt"}}, "must be an absolute path"),
    ({"access": {"images_per_minute": 2}, "limits": {"max_n": 4}}, "images_per_minute .* at least limits.max_n"),
])
def test_a_key_written_in_the_config_or_a_bad_access_setting_is_refused(args, text):
    with pytest.raises(ConfigError, match=text) as caught:
        ServeArgs.parse(args)
    assert KEY_A not in str(caught.value)  # the error never repeats a key


def test_keys_come_from_a_variable_and_a_file_and_rotate_without_a_restart(tmp_path):
    key_file = tmp_path / "keys"
    key_file.write_text(f"# team keys\n{KEY_B}\n\n")
    access = AccessConfig(api_keys_env="TEST_KEYS", api_keys_file=str(key_file))
    keys = ApiKeys(access, environ={"TEST_KEYS": f" {KEY_A} ,"}, recheck_s=0)
    assert keys.count == 2 and KEY_A not in keys.describe() and KEY_B not in keys.describe()
    assert keys.identify(f"Bearer {KEY_A}") == key_id(key_digest(KEY_A))
    assert keys.identify(f"bearer {KEY_B}") == key_id(key_digest(KEY_B))
    for header in (None, "", KEY_A, f"Basic {KEY_A}", "Bearer ", f"Bearer {KEY_C}", f"Bearer {KEY_A}x"):
        assert keys.identify(header) is None, header
    # Rotation: the new key joins, clients move, the old one leaves; no new ApiKeys.
    key_file.write_text(f"{KEY_B}\n{KEY_C}\n")
    assert keys.identify(f"Bearer {KEY_C}") is not None and keys.identify(f"Bearer {KEY_B}") is not None
    key_file.write_text(f"{KEY_C}\n")
    assert keys.identify(f"Bearer {KEY_B}") is None and keys.identify(f"Bearer {KEY_C}") is not None
    # A broken file keeps the keys read before instead of locking everyone out.
    key_file.write_text("short\n")
    assert keys.identify(f"Bearer {KEY_C}") is not None


def test_a_configured_key_source_without_keys_refuses_to_start_open(tmp_path):
    with pytest.raises(KeySourceError, match=r"\$TEST_KEYS but no key was found"):
        ApiKeys(AccessConfig(api_keys_env="TEST_KEYS"), environ={})
    with pytest.raises(KeySourceError, match="api_keys_file .*missing"):
        ApiKeys(AccessConfig(api_keys_file=str(tmp_path / "missing")), environ={})
    with pytest.raises(KeySourceError, match="at least 16 characters") as caught:
        ApiKeys(AccessConfig(api_keys_env="TEST_KEYS"), environ={"TEST_KEYS": "letmein"})
    assert "letmein" not in str(caught.value)
    open_server = ApiKeys(AccessConfig(), environ={})
    assert open_server.identify(None) == "open" and "OPEN" in open_server.describe()


def test_limits_count_requests_and_images_per_key_over_a_sliding_minute():
    now = [0.0]
    limits = SlidingWindowLimits(requests_per_window=3, images_per_window=8, clock=lambda: now[0])
    assert all(limits.admit("a", 2).allowed for _ in range(3))
    refused = limits.admit("a", 1)
    assert (refused.allowed, refused.limit, refused.retry_after_s) == (False, "requests", 60)
    assert limits.admit("b", 4).allowed  # another key has its own counts
    now[0] = 30.0
    assert not limits.admit("a", 1).allowed
    now[0] = 60.0  # the first three leave the window together
    assert limits.admit("a", 4).allowed and limits.admit("a", 4).allowed
    refused = limits.admit("a", 1)
    assert (refused.allowed, refused.limit, refused.retry_after_s) == (False, "images", 60)
    now[0] = 119.5
    assert limits.admit("a", 1).allowed is False and limits.admit("a", 1).retry_after_s == 1


@pytest.mark.parametrize("fields, param, text", [
    ({}, "prompt", "is required"),
    ({"prompt": "   "}, "prompt", "is empty"),
    ({"prompt": 3}, "prompt", "must be a string"),
    ({"prompt": "a", "n": 5}, "n", "between 1 and 4"),
    ({"prompt": "a", "n": 0}, "n", "between 1 and 4"),
    ({"prompt": "a", "n": 1.5}, "n", "must be an integer"),
    ({"prompt": "a", "cfg_weight": float("nan")}, "cfg_weight", "must be finite"),
    ({"prompt": "a", "temperature": float("inf")}, "temperature", "must be finite"),
    ({"prompt": "a", "temperature": -1}, "temperature", ">= 0"),
    ({"prompt": "a", "seed": -1}, "seed", "between 0"),
    ({"prompt": "a", "top_p": 1.5}, "top_p", "(0, 1]"),
    ({"prompt": "a", "response_format": "url"}, "response_format", "b64_json, png"),
    ({"prompt": "a", "response_format": "png", "n": 2}, "response_format", "one image"),
    ({"prompt": "a", "size": "1024x1024"}, "size", "64x64"),
    ({"prompt": "a", "cfg_weigth": 2}, "cfg_weigth", "unknown field"),
])
def test_bad_json_fields_are_refused_naming_the_field(fields, param, text):
    with pytest.raises(ApiError) as caught:
        parse_fields(fields, GENERATION_FIELDS, ServeLimits(max_n=4), 64, from_text=False)
    assert caught.value.status == 400 and caught.value.param == param and text in caught.value.message


def test_form_fields_are_converted_and_checked():
    payload, response_format = parse_fields(
        {"prompt": "make it blue", "n": "2", "cfg_weight": "3", "cfg_weight2": "1.5", "seed": "7"},
        EDIT_FIELDS, ServeLimits(), 64, from_text=True)
    assert payload == {"prompt": "make it blue", "parallel_size": 2, "cfg_weight": 3.0, "cfg_weight2": 1.5, "seed": 7}
    assert response_format == "b64_json"
    for fields, param in [({"prompt": "a", "cfg_weight2": "nan"}, "cfg_weight2"), ({"prompt": "a", "n": "two"}, "n")]:
        with pytest.raises(ApiError) as caught:
            parse_fields(fields, EDIT_FIELDS, ServeLimits(), 64, from_text=True)
        assert caught.value.param == param


def test_stream_and_partial_images_are_checked_from_json_and_form_fields():
    assert parse_stream({"prompt": "a"}, "b64_json", from_text=False) is None
    assert parse_stream({"stream": True}, "b64_json", from_text=False) == 0
    assert parse_stream({"stream": "true", "partial_images": "3"}, "b64_json", from_text=True) == 3
    assert parse_stream({"stream": "false", "partial_images": "0"}, "b64_json", from_text=True) is None
    for fields, response_format, param, text in [
        ({"stream": "yes"}, "b64_json", "stream", "true or false"),
        ({"stream": True, "partial_images": 4}, "b64_json", "partial_images", "between 0 and 3"),
        ({"partial_images": 2}, "b64_json", "partial_images", "needs stream=true"),
        ({"stream": True}, "png", "response_format", "b64_json"),
    ]:
        with pytest.raises(ApiError) as caught:
            parse_stream(fields, response_format, from_text=False)
        assert caught.value.status == 400 and caught.value.param == param and text in caught.value.message


def test_uploads_are_checked_from_size_and_header_before_decoding():
    limits = ServeLimits(max_upload_bytes=4096, max_input_pixels=1000 * 1000)
    check_image(png_bytes(), limits, "image[0]")  # fine
    cases = [
        (b"GIF89a but not really", 400, "not an image"),
        (b"\x00" * 5000, 413, "more than the limit of 4096"),
        (png_bytes((2000, 1000), mode="1"), 400, "2000x1000 = 2000000 pixels"),  # a few hundred bytes on disk
        (b"", 400, "is empty"),
    ]
    for data, status, text in cases:
        with pytest.raises(ApiError) as caught:
            check_image(data, limits, "image[1]")
        assert (caught.value.status, caught.value.param) == (status, "image[1]") and text in caught.value.message


def test_an_uploaded_non_square_image_is_letterboxed_before_the_model_reads_it():
    """A replica's path for an edit upload (`ImageModel.generate`: validate, then generate and
    encode): a 100 x 60 upload gives exactly what its letterboxed 64 x 64 square gives."""
    import numpy as np

    from janus_lab.data.images import letterbox
    from janus_lab.generation import GenerationRequest
    from janus_lab.generation.requests import validate_request
    from janus_lab.serving.model import ImageModel, load_model

    current = load_model(ServeArgs.parse({"model": "debug", "device": "cpu"}), max_batch_size=2)
    engine = current.engine

    def edited(upload: bytes) -> bytes:
        request = GenerationRequest("make it blue", input_images=[upload], temperature=0, seed=5)
        prepared = validate_request(request, engine.limits, engine.builder, engine.max_sequence_length)
        return ImageModel.func_or_class._generate_and_encode(current, [(prepared, None, None)])[0]["images"][0]

    rng = np.random.default_rng(3)
    wide = Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8))
    as_uploaded, squared = io.BytesIO(), io.BytesIO()
    wide.save(as_uploaded, format="PNG")
    letterbox(wide, 64).save(squared, format="PNG")
    stretched = io.BytesIO()
    wide.resize((64, 64), Image.Resampling.BICUBIC).save(stretched, format="PNG")
    assert edited(as_uploaded.getvalue()) == edited(squared.getvalue())
    assert edited(as_uploaded.getvalue()) != edited(stretched.getvalue())  # the check can tell them apart


# --------------------------------------------------------------------------- integration

# Options over serve/config.yaml's, so autoscaling and overload show in seconds on two cores.
MODEL_OVERRIDES = {
    "max_ongoing_requests": 2,
    "max_queued_requests": 3,
    "graceful_shutdown_timeout_s": 2,
    "user_config": {"max_batch_size": 2, "batch_wait_timeout_s": 0.02, "registry_poll_s": 1},
    "autoscaling_config": {"min_replicas": 1, "initial_replicas": 1, "max_replicas": 2,
                           "target_ongoing_requests": 1, "upscale_delay_s": 1, "downscale_delay_s": 3,
                           "metrics_interval_s": 0.5, "look_back_period_s": 2},
}


@pytest.fixture(scope="module")
def registry(local_stack):
    """Three debug-model exports registered as `name` v1 (gated), v2 (forced) and a later run."""
    from janus_lab.model import debug
    from janus_lab.model.weights import save_pretrained
    from janus_lab.registry import PromoteConfig, promote

    root = f"s3://{local_stack.bucket}/tests/serve-{os.getpid()}"
    name = f"janus-4o-serve-{uuid.uuid4().hex[:8]}"
    runs = {}
    for key, seed, val_nll in [("first", 1, 9.5), ("forced", 2, 9.6), ("better", 3, 9.3)]:
        save_pretrained(debug(seed=seed), f"{root}/export-{key}")
        runs[key] = make_run(local_stack.mlflow_tracking_uri, EXPERIMENT, f"{root}/export-{key}", val_nll)
    first = promote(PromoteConfig(run_id=runs["first"], name=name))
    forced = promote(PromoteConfig(run_id=runs["forced"], name=name, force=True, reason="serve test: swap weights"))
    assert (first.champion, forced.champion) == ("1", "2"), (first.summary(), forced.summary())
    return name, runs


@pytest.fixture(scope="module")
def server(serve_cluster, local_stack, registry):
    """The application of serve/config.yaml, serving models:/<name>@champion, open (no keys) and
    without per-key limits, as the local demo; yields its base URL."""
    from ray import serve

    name, _ = registry
    application = serve_config()["applications"][0]
    options = deployment_options()
    options["ImageModel"].update(MODEL_OVERRIDES)
    # The replicas read the registry and S3 of the test stack.
    options["ImageModel"]["ray_actor_options"] = {**options["ImageModel"]["ray_actor_options"],
                                                  "runtime_env": {"env_vars": local_stack.env()}}
    args = {**application["args"], "model": f"models:/{name}@champion",
            "access": {**application["args"]["access"], "requests_per_minute": 0, "images_per_minute": 0}}
    serve.run(bind_application(args, options), name="janus-images", route_prefix="/")
    yield serve_cluster


def generate(base: str, **body):
    import requests

    return requests.post(f"{base}/v1/images/generations", json=body, timeout=120)


def edit(base: str, images: list[bytes], **fields):
    import requests

    files = [("image", (f"in{k}.png", data, "image/png")) for k, data in enumerate(images)]
    return requests.post(f"{base}/v1/images/edits", files=files, data={k: str(v) for k, v in fields.items()},
                         timeout=120)


def decoded(response) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))) for item in response.json()["data"]]


@pytest.mark.integration
def test_models_and_health_name_the_champion_version_and_its_run(server, registry):
    import requests

    name, runs = registry
    models = requests.get(f"{server}/v1/models", timeout=30).json()["data"]
    assert len(models) == 1
    assert models[0]["id"] == name and models[0]["version"] == "2" and models[0]["alias"] == "champion"
    assert models[0]["run_id"] == runs["forced"] and models[0]["image_size"] == 64
    health = requests.get(f"{server}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.integration
def test_text_to_image_returns_pngs_of_the_model_size_and_a_seed_reproduces_them(server):
    first = generate(server, prompt="a red circle on a blue background", n=2, seed=11, cfg_weight=4.0)
    assert first.status_code == 200, first.text
    images = decoded(first)
    assert len(images) == 2 and all(i.format == "PNG" and i.size == (64, 64) and i.mode == "RGB" for i in images)
    assert first.json()["seed"] == 11 and first.headers["X-Model-Version"] == "2"
    again = generate(server, prompt="a red circle on a blue background", n=2, seed=11, cfg_weight=4.0)
    other = generate(server, prompt="a red circle on a blue background", n=2, seed=12, cfg_weight=4.0)
    assert again.json()["data"] == first.json()["data"]
    assert other.json()["data"] != first.json()["data"]
    raw = generate(server, prompt="a green square", seed=3, response_format="png")
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(raw.content)).size == (64, 64)


@pytest.mark.integration
def test_edit_with_one_and_two_input_images_returns_pngs(server):
    for inputs in ([png_bytes()], [png_bytes(), png_bytes((80, 40), (10, 200, 10))]):
        response = edit(server, inputs, prompt="make the circle blue", seed=5, cfg_weight=3, cfg_weight2=2)
        assert response.status_code == 200, response.text
        (image,) = decoded(response)
        assert image.format == "PNG" and image.size == (64, 64)
    # An RGBA or palette upload is converted, not refused.
    rgba = io.BytesIO()
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(rgba, format="PNG")
    assert edit(server, [rgba.getvalue()], prompt="brighter", seed=1).status_code == 200


@pytest.mark.integration
def test_bad_requests_get_a_4xx_naming_the_field(server):
    import requests

    limits = ServeArgs.parse(serve_config()["applications"][0]["args"]).limits
    huge_header = png_bytes((5000, 4000), mode="1")  # 20 M pixels claimed, a few kB sent
    cases = [
        (generate(server, prompt=""), 400, "prompt"),
        (generate(server, prompt="word " * (limits.max_text_tokens + 10)), 400, "prompt"),
        (generate(server, prompt="a cat", n=limits.max_n + 1), 400, "n"),
        (requests.post(f"{server}/v1/images/generations", data='{"prompt": "a", "cfg_weight": NaN}',
                       headers={"content-type": "application/json"}, timeout=30), 400, "cfg_weight"),
        (requests.post(f"{server}/v1/images/generations", data="not json", timeout=30), 400, None),
        (edit(server, [b"this is not an image"], prompt="fix it"), 400, "image[0]"),
        (edit(server, [png_bytes(), b"\x89PNG" + b"\x00" * (limits.max_upload_bytes + 1)], prompt="x"), 413, "image[1]"),
        (edit(server, [huge_header], prompt="fix it"), 400, "image[0]"),
        (edit(server, [], prompt="fix it"), 400, None),
        (edit(server, [png_bytes()], prompt="x", cfg_weight2="inf"), 400, "cfg_weight2"),
        (edit(server, [png_bytes()] * (limits.max_input_images + 1), prompt="x"), 400, "image"),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] == "invalid_request_error"
        if param is not None:
            assert error["param"] == param, error
    # The replicas are still fine afterwards.
    assert generate(server, prompt="still alive", seed=1).status_code == 200


@pytest.mark.integration
def test_moving_the_champion_swaps_the_model_with_no_request_failing(server, registry):
    from janus_lab.registry import PromoteConfig, promote

    name, runs = registry
    statuses, versions, stop = [], set(), threading.Event()

    def keep_asking():
        while not stop.is_set():
            response = generate(server, prompt="a yellow triangle", seed=2)
            statuses.append(response.status_code)
            versions.add(response.headers.get("X-Model-Version"))

    worker = threading.Thread(target=keep_asking)
    worker.start()
    try:
        time.sleep(1.0)
        assert promote(PromoteConfig(run_id=runs["better"], name=name)).champion == "3"
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and "3" not in versions:
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join()
    assert {"2", "3"} <= versions, versions
    assert set(statuses) == {200}, statuses


def replica_count() -> int:
    from ray import serve
    from ray.serve._private.common import ReplicaState

    deployment = serve.status().applications["janus-images"].deployments["ImageModel"]
    return deployment.replica_states.get(ReplicaState.RUNNING, 0)


@pytest.mark.integration
def test_sustained_load_scales_to_two_replicas_and_back_to_one(server):
    assert replica_count() == 1
    counts, statuses, stop = [], [], threading.Event()

    def client():
        while not stop.is_set():
            statuses.append(generate(server, prompt="a blue square", n=2).status_code)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            pool.submit(client)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and max(counts, default=0) < 2:
            counts.append(replica_count())
            time.sleep(0.5)
        stop.set()
    assert max(counts) == 2, counts
    assert set(statuses) <= {200, 503} and statuses.count(200) > 0
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and replica_count() != 1:
        time.sleep(1.0)
    assert replica_count() == 1


@pytest.mark.integration
def test_a_burst_past_the_queue_limit_gets_503_with_retry_after_and_nothing_else_fails(server):
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda k: generate(server, prompt="a busy street", n=4, seed=k), range(24)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(503) > 0 and statuses.count(200) > 0, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"].isdigit()
            assert response.json()["error"]["type"] == "overloaded"
    assert generate(server, prompt="after the burst", seed=1).status_code == 200


# --------------------------------------------------------------------------- integration: API keys

KEYS_ENV = "JANUS_TEST_API_KEYS"
KEY_LIMITED, KEY_IMAGES, KEY_ROTATED = "delta-" + "d" * 26, "echo-" + "e" * 27, "foxtrot-" + "f" * 24
KEYED_ACCESS = {"requests_per_minute": 6, "images_per_minute": 8}
"""Small enough to reach in a test; the model's max_n (4) fits in the images limit."""


@pytest.fixture(scope="module")
def keyed_server(serve_cluster, tmp_path_factory):
    """A second application on the same Serve instance, at /keyed: the debug model behind two
    ImageApi replicas that take KEY_A from an environment variable and KEY_B (and the keys of the
    limit tests) from a file. Yields (base URL, key file)."""
    from ray import serve

    key_file = tmp_path_factory.mktemp("keys") / "api-keys"
    key_file.write_text(f"# one per line\n{KEY_B}\n{KEY_LIMITED}\n{KEY_IMAGES}\n")
    options = deployment_options()
    options["ImageModel"] = {"num_replicas": 1, "max_ongoing_requests": 8, "ray_actor_options": {"num_cpus": 1},
                             "user_config": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02, "registry_poll_s": 0}}
    options["ImageApi"].update(num_replicas=2, ray_actor_options={
        "num_cpus": 0, "runtime_env": {"env_vars": {KEYS_ENV: KEY_A}}})
    args = {"model": "debug", "device": "cpu",
            "access": {"api_keys_env": KEYS_ENV, "api_keys_file": str(key_file), **KEYED_ACCESS}}
    serve.run(bind_application(args, options), name="janus-images-keyed", route_prefix="/keyed")
    yield f"{serve_cluster}/keyed", key_file
    serve.delete("janus-images-keyed")


def with_key(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


@pytest.mark.integration
def test_requests_without_a_key_or_with_a_wrong_one_get_401_before_the_body_is_read(keyed_server):
    import requests

    base, _ = keyed_server
    cases = [
        requests.get(f"{base}/v1/models", timeout=30),
        requests.get(f"{base}/v1/models", headers=with_key(KEY_C), timeout=30),
        requests.get(f"{base}/v1/models", headers={"Authorization": KEY_A}, timeout=30),  # no "Bearer"
        requests.post(f"{base}/v1/images/generations", json={"prompt": "a red circle"}, timeout=30),
        # A body that would be a 400 is never parsed without a key.
        requests.post(f"{base}/v1/images/generations", data="not json", headers=with_key(KEY_C), timeout=30),
        requests.post(f"{base}/v1/images/edits", files=[("image", ("a.png", png_bytes(), "image/png"))],
                      data={"prompt": "x"}, headers=with_key(KEY_A + "x"), timeout=30),
    ]
    for response in cases:
        assert response.status_code == 401, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert KEY_A not in response.text and KEY_C not in response.text
    assert requests.get(f"{base}/healthz", timeout=30).status_code == 200  # health stays open


@pytest.mark.integration
def test_either_of_two_keys_is_accepted(keyed_server):
    import requests

    base, _ = keyed_server
    for key in (KEY_A, KEY_B):  # from the environment variable, from the file
        assert requests.get(f"{base}/v1/models", headers=with_key(key), timeout=30).status_code == 200
        response = requests.post(f"{base}/v1/images/generations", json={"prompt": "a blue square", "seed": 1},
                                 headers=with_key(key), timeout=120)
        assert response.status_code == 200, response.text
        assert decoded(response)[0].size == (64, 64)


@pytest.mark.integration
def test_the_openai_client_sends_its_api_key_and_gets_images(keyed_server):
    import openai

    base, _ = keyed_server
    client = openai.OpenAI(api_key=KEY_A, base_url=f"{base}/v1", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["debug"]
    result = client.images.generate(model="debug", prompt="a green triangle", n=1, size="64x64",
                                    response_format="b64_json")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert image.format == "PNG" and image.size == (64, 64)
    wrong = openai.OpenAI(api_key=KEY_C, base_url=f"{base}/v1", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


@pytest.mark.integration
def test_past_a_keys_limits_the_answer_is_429_with_retry_after_across_two_api_replicas(keyed_server):
    import requests
    from ray import serve
    from ray.serve._private.common import ReplicaState

    base, _ = keyed_server
    api = serve.status().applications["janus-images-keyed"].deployments["ImageApi"]
    assert api.replica_states.get(ReplicaState.RUNNING, 0) == 2
    burst = KEYED_ACCESS["requests_per_minute"] + 4

    def ask(k: int):
        return requests.post(f"{base}/v1/images/generations", json={"prompt": "a busy street", "seed": k},
                             headers=with_key(KEY_LIMITED), timeout=120)

    # Concurrent, so the proxy spreads them over both replicas; each replica counting on its
    # own would let up to twice the limit through.
    with concurrent.futures.ThreadPoolExecutor(burst) as pool:
        responses = list(pool.map(ask, range(burst)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * KEYED_ACCESS["requests_per_minute"] + [429] * 4, statuses
    for response in responses:
        if response.status_code == 429:
            assert 1 <= int(response.headers["Retry-After"]) <= 60
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    # Another key is not affected; its images are counted on their own.
    images = [requests.post(f"{base}/v1/images/generations", json={"prompt": "a cat", "n": n, "seed": 2},
                            headers=with_key(KEY_IMAGES), timeout=120) for n in (4, 4, 1)]
    assert [r.status_code for r in images] == [200, 200, 429], [r.text for r in images]
    assert images[2].json()["error"]["type"] == "images" and images[2].headers["Retry-After"].isdigit()


@pytest.mark.integration
def test_a_key_added_to_the_file_works_on_every_replica_without_a_restart(keyed_server):
    import requests

    base, key_file = keyed_server
    assert requests.get(f"{base}/v1/models", headers=with_key(KEY_ROTATED), timeout=30).status_code == 401
    key_file.write_text(key_file.read_text() + f"{KEY_ROTATED}\n")
    time.sleep(1.5)  # the replicas look at the file at most once a second
    statuses = {requests.get(f"{base}/v1/models", headers=with_key(KEY_ROTATED), timeout=30).status_code
                for _ in range(8)}
    assert statuses == {200}
