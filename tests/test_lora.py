"""LoRA adapters: what training makes of them, the merged export, and many adapters served over
one base.

Adapters here are made the way a trained one looks (PEFT's layers, their B matrices away from
zero) on the random debug model, so that an adapter visibly changes what the model draws.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from janus_lab.generation import GenerationEngine, GenerationRequest
from janus_lab.generation.loading import load_generation_model
from janus_lab.model import adapters
from janus_lab.model.builders import debug
from janus_lab.model.weights import save_pretrained
from janus_lab.train.config import LoraConfig


def adapted_debug(cfg: LoraConfig, seed: int, image_size: int = 64):
    """The debug model (init seed 0) with adapters whose B matrices are random (seed `seed`)."""
    bundle = debug(image_size=image_size, seed=0)
    adapters.apply_lora(bundle.model, cfg, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in bundle.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return bundle


def write_adapter(folder, cfg: LoraConfig, seed: int, base: adapters.AdapterBase) -> str:
    bundle = adapted_debug(cfg, seed, base.image_size)
    adapters.save_adapter(adapters.adapter_state(bundle.model.state_dict()), cfg, base, folder)
    return str(folder)


GREEDY = [GenerationRequest("a red circle on a blue background", parallel_size=2, temperature=0, seed=3),
          GenerationRequest("make the circle green", input_images=[Image.new("RGB", (64, 64), (30, 60, 220))],
                            temperature=0, seed=4)]


def codes(bundle, requests=GREEDY) -> list[torch.Tensor]:
    return [result.codes for result in GenerationEngine.from_bundle(bundle).generate(requests)]


def test_lora_trains_only_the_adapters_of_the_layers_it_names():
    bundle = debug(seed=0)
    adapters.apply_lora(bundle.model, LoraConfig(rank=4), seed=0)
    trainable = {name for name, param in bundle.model.named_parameters() if param.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert all(".language_model.layers." in name for name in trainable), "SigLIP's q_proj must not be adapted"
    assert len(trainable) == 2 * 2 * 7
    with_head = debug(seed=0)
    adapters.apply_lora(with_head.model, LoraConfig(rank=4, generation_head=True, aligner=True), seed=0)
    names = {name for name, param in with_head.model.named_parameters() if param.requires_grad}
    assert any("generation_head.vision_head.lora_A" in name for name in names)
    assert any("generation_aligner.fc1.lora_A" in name for name in names)


def test_an_adapter_is_saved_in_peft_format_and_loads_with_peft_alone(tmp_path):
    import peft
    from safetensors.torch import load_file

    cfg = LoraConfig(rank=4)
    folder = write_adapter(tmp_path / "adapter", cfg, seed=1, base=adapters.AdapterBase("debug", None, 64, 0))
    names = set(load_file(f"{folder}/{adapters.ADAPTER_WEIGHTS}"))
    assert all(name.startswith("base_model.model.model.language_model.layers.") for name in names)
    assert not any(".default." in name for name in names)
    # peft's own loader on a plain base: the same codes as our loader.
    plain = debug(seed=0)
    peft.PeftModel.from_pretrained(plain.model, folder)
    assert all(torch.equal(a, b) for a, b in zip(codes(plain), codes(load_generation_model(folder))))


def test_a_merged_export_generates_the_same_codes_as_base_plus_adapter_under_greedy_decoding(tmp_path):
    cfg = LoraConfig(rank=8, generation_head=True)
    trained = adapted_debug(cfg, seed=2)
    folder = tmp_path / "adapter"
    adapters.save_adapter(adapters.adapter_state(trained.model.state_dict()), cfg,
                          adapters.AdapterBase("debug", None, 64, 0), folder)
    merged = debug(seed=0)
    merged.model.load_state_dict(adapters.merged_state(trained.model.state_dict(), trained.model, cfg))
    save_pretrained(merged, tmp_path / "merged")

    with_adapter = codes(load_generation_model(str(folder)))
    from_merged = codes(load_generation_model(str(tmp_path / "merged")))
    base = codes(debug(seed=0))
    for adapted, folded, plain in zip(with_adapter, from_merged, base):
        assert torch.equal(adapted, folded)
        assert not torch.equal(adapted, plain), "the adapter must change what the model draws"


def test_an_adapter_is_refused_by_another_base_and_without_its_base_file(tmp_path):
    from janus_lab.serving.adapters import AdapterHost

    folder = write_adapter(tmp_path / "a", LoraConfig(rank=4), seed=1, base=adapters.AdapterBase("debug", None, 64, 7))
    host = AdapterHost(debug(seed=0).model, "debug:64px:seed0", {"a": folder})
    with pytest.raises(adapters.AdapterError, match="trained on debug:64px:seed7, but this server's model is "
                                                     "debug:64px:seed0"):
        host.load("a")
    with pytest.raises(adapters.AdapterError, match="no adapter named 'b'; this server has: a"):
        host.load("b")
    (tmp_path / "a" / adapters.BASE_FILE).unlink()
    with pytest.raises(adapters.AdapterError, match="without janus_adapter.json"):
        load_generation_model(folder)


def test_serve_args_refuse_adapters_over_a_moving_alias_or_compiled_graphs():
    from janus_lab.config import ConfigError
    from janus_lab.serving.settings import ServeArgs

    with pytest.raises(ConfigError, match="follows an alias"):
        ServeArgs.parse({"model": "models:/janus-4o@champion", "adapters": {"style": "/a"}})
    with pytest.raises(ConfigError, match="compile=true"):
        ServeArgs.parse({"model": "mini", "compile": True, "adapters": {"style": "/a"}})
    with pytest.raises(ConfigError, match="adapters.a:b"):
        ServeArgs.parse({"model": "mini", "adapters": {"a:b": "/a"}})


# --------------------------------------------------------------------------- serving


def served_image(url: str, model: str | None, prompt: str, seed: int) -> tuple[Image.Image, dict]:
    import requests

    body = {"prompt": prompt, "seed": seed, "cfg_weight": 3.0, "temperature": 1.0, "top_k": 50}
    if model is not None:
        body["model"] = model
    response = requests.post(f"{url}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    payload = response.json()
    image = Image.open(io.BytesIO(base64.b64decode(payload["data"][0]["b64_json"]))).convert("RGB")
    return image, payload["model"]


def offline_image(source, prompt: str, seed: int) -> Image.Image:
    bundle = load_generation_model(source)
    request = GenerationRequest(prompt, seed=seed, cfg_weight=3.0, temperature=1.0, top_k=50)
    return GenerationEngine.from_bundle(bundle).generate([request])[0].images[0]


@pytest.fixture(scope="module")
def adapter_server(serve_cluster, tmp_path_factory):
    """serve/config.yaml's application over a debug base in a folder with two adapters for it, one
    replica keeping one adapter at a time (so serving both evicts and reloads), batches waiting
    0.5 s so that concurrent requests share one."""
    from ray import serve

    from serve_apps import bind_application, deployment_options

    root = tmp_path_factory.mktemp("adapters")
    save_pretrained(debug(seed=0), root / "base")
    base = adapters.AdapterBase("debug", str(root / "base"), 64, 0)
    sources = {name: write_adapter(root / name, LoraConfig(rank=4, generation_head=True), seed, base)
               for name, seed in (("style", 11), ("brand", 12))}
    options = deployment_options()
    options["ImageModel"].pop("autoscaling_config")
    options["ImageModel"].update(num_replicas=1, user_config={"max_batch_size": 8, "batch_wait_timeout_s": 0.5,
                                                              "registry_poll_s": 0})
    args = {"model": str(root / "base"), "device": "cpu", "adapters": sources, "max_adapters_per_replica": 1,
            "access": {"requests_per_minute": 0, "images_per_minute": 0}}
    serve.run(bind_application(args, options), name="janus-adapters", route_prefix="/adapters")
    yield f"{serve_cluster}/adapters", str(root / "base"), sources
    serve.delete("janus-adapters")


@pytest.mark.integration
def test_the_server_answers_two_adapters_and_the_base_concurrently_each_with_its_own_models_images(adapter_server):
    import requests

    url, base, sources = adapter_server
    models = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
    served_id = models[0]["id"]
    assert [m["id"] for m in models] == [served_id, f"{served_id}:brand", f"{served_id}:style"]
    asks = [(model, prompt, seed) for model in (None, f"{served_id}:style", "janus-4o:brand")
            for prompt, seed in (("a red circle on a blue background", 5), ("a green square", 6))]
    with ThreadPoolExecutor(len(asks)) as pool:
        answers = list(pool.map(lambda ask: served_image(url, *ask), asks))
    expected = {None: base, f"{served_id}:style": sources["style"], "janus-4o:brand": sources["brand"]}
    offline = {ask: offline_image(expected[ask[0]], ask[1], ask[2]) for ask in asks}
    for ask, (image, model) in zip(asks, answers):
        assert model["adapter"] == (ask[0].rsplit(":", 1)[1] if ask[0] else None)
        assert np.array_equal(np.asarray(image), np.asarray(offline[ask])), f"{ask}: not its own model's image"
    # And they differ: each adapter draws otherwise than the base.
    first = {ask[0]: np.asarray(image) for ask, (image, _) in zip(asks, answers) if ask[2] == 5}
    assert not np.array_equal(first[None], first[f"{served_id}:style"])
    assert not np.array_equal(first[f"{served_id}:style"], first["janus-4o:brand"])


@pytest.mark.integration
def test_an_unknown_adapter_is_a_404_naming_the_ones_served(adapter_server):
    import requests

    url, _, _ = adapter_server
    response = requests.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "model": "x:nope"},
                             timeout=30)
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_found"
    assert "brand, style" in error["message"]


@pytest.mark.integration
def test_the_playground_offers_the_adapters_and_draws_with_the_one_chosen(adapter_server, browser):
    """In real Chromium: the adapter list comes from /v1/models, and the picture drawn with an
    adapter chosen is the one the API gives for `<id>:<adapter>` (and differs from the base's)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from serve_apps import wait_for

    url, _, _ = adapter_server
    browser.get(f"{url}/")
    wait_for(browser, "document.getElementById('model').textContent.includes('64 px')")
    assert browser.find_element(By.ID, "adapter-row").is_displayed()
    choice = Select(browser.find_element(By.ID, "adapter"))
    assert [option.text for option in choice.options] == ["none: the base", "brand", "style"]
    served_id = choice.options[2].get_attribute("value").rsplit(":", 1)[0]
    choice.select_by_visible_text("style")
    for name, value in (("prompt", "a red circle on a blue background"), ("seed", "5"), ("cfg_weight", "3"),
                        ("temperature", "1"), ("top_k", "50")):
        field = browser.find_element(By.ID, name)
        field.clear()
        field.send_keys(value)
    browser.find_element(By.ID, "generate").click()
    wait_for(browser, "document.querySelectorAll('#gallery .card').length === 1")
    card = browser.find_element(By.CSS_SELECTOR, "#gallery .card")
    assert f"model={served_id}:style" in card.find_element(By.CSS_SELECTOR, ".settings").text.replace(" ", "")
    src = card.find_element(By.CSS_SELECTOR, "img").get_attribute("src").split(",", 1)[1]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(src))).convert("RGB"))
    with_style, _ = served_image(url, f"{served_id}:style", "a red circle on a blue background", 5)
    base, _ = served_image(url, None, "a red circle on a blue background", 5)
    assert np.array_equal(shown, np.asarray(with_style))
    assert not np.array_equal(shown, np.asarray(base))
