"""densegrpo.contracts.hub: finding weights offline, one-line errors, weights_only state-dict loading."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from densegrpo.contracts import hub
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.hub import (
    CheckpointLoadError,
    WeightsNotFoundError,
    hub_file,
    load_pretrained,
    load_state_dict,
)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(repo_id):
        raise AssertionError("the hub was probed while offline")

    monkeypatch.setattr(hub, "probe_hub", no_network)


def test_offline_missing_hub_file_is_one_line_naming_the_weights(offline):
    with pytest.raises(WeightsNotFoundError) as info:
        hub_file("densegrpo-test/no-such-repo", "head.pth", what="toy MLP", field="head", offline=False)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "toy MLP" in message and "densegrpo-test/no-such-repo/head.pth" in message
    assert "offline" in message and "`head`" in message and "local file" in message


def test_offline_missing_pretrained_is_one_line_and_never_loads_from_the_hub(offline):
    calls = []

    def load(source, local_files_only):
        calls.append(local_files_only)
        raise OSError(f"{source} is not cached")

    with pytest.raises(WeightsNotFoundError) as info:
        load_pretrained(load, "densegrpo-test/no-such-model", what="toy CLIP model", field="model", offline=False)
    message = str(info.value)
    assert "\n" not in message and "toy CLIP model" in message and "hf download densegrpo-test/no-such-model" in message
    assert calls == [True]


def test_config_flag_is_offline_without_the_environment(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hub.hub_offline(False) and hub.hub_offline(True)
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hub.hub_offline() and not hub.hub_reachable()


def test_unreachable_hub_is_one_line_with_the_cause(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(repo_id):
        raise ConnectionError("Name or service\nnot known")

    monkeypatch.setattr(hub, "probe_hub", unreachable)
    with pytest.raises(WeightsNotFoundError) as info:
        hub_file("densegrpo-test/no-such-repo", "w.pt", what="toy", field="checkpoint", offline=False)
    message = str(info.value)
    assert "\n" not in message and "could not be downloaded" in message and "ConnectionError: Name or service not known" in message


def test_local_folder_and_file_are_found_and_missing_ones_named(offline, tmp_path):
    (tmp_path / "head.pth").write_bytes(b"x")
    assert hub_file(str(tmp_path), "head.pth", what="toy", field="head", offline=True) == str(tmp_path / "head.pth")
    assert hub_file(str(tmp_path / "head.pth"), "other", what="toy", field="head", offline=True) == str(tmp_path / "head.pth")
    with pytest.raises(WeightsNotFoundError, match=r"toy checkpoint 'w\.pt' is not in folder"):
        hub_file(str(tmp_path), "w.pt", what="toy", field="checkpoint", offline=True, noun="checkpoint")
    with pytest.raises(WeightsNotFoundError, match=r"does not exist; set the reward's `head` to a local \.pt file"):
        hub_file(str(tmp_path / "no" / "such" / "dir"), "w.pt", what="toy", field="head", offline=True, local_file="a local .pt file")
    seen = []
    assert load_pretrained(lambda s, local_files_only: seen.append((s, local_files_only)) or "model", str(tmp_path),
                           what="toy", field="model", offline=True) == "model"
    assert seen == [(str(tmp_path), True)]


def test_weights_only_round_trip_and_wrappers(tmp_path):
    from safetensors.torch import save_file

    state = torch.nn.Linear(3, 2).state_dict()
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    save_file(state, tmp_path / "w.safetensors")
    for name in ("plain.pt", "ddp.pt", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == state.keys(), name
        for key in state:
            torch.testing.assert_close(loaded[key], state[key], rtol=0, atol=0)


def test_pickled_code_is_refused_unless_allowed(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "fn": print}, path)  # a function needs full unpickling
    with pytest.raises(CheckpointLoadError) as info:
        load_state_dict(path, fix="set `allow_pickle: true`")
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message and message.endswith("set `allow_pickle: true`")
    assert "pickled.pt" in message and "GLOBAL print" in message  # names the file and the refused global
    with pytest.raises(KeyError, match="refused"):
        load_state_dict(path, error=KeyError)
    assert load_state_dict(path, allow_pickle=True)["w"].item() == 1.0


def test_device_dtype_and_lazy_import():
    assert hub.resolve_device("cpu") == torch.device("cpu")
    assert hub.resolve_dtype("bfloat16") is torch.bfloat16
    code = (
        "import sys, densegrpo.contracts.hub, densegrpo.components.rewards.clip_preprocess; "
        "heavy = [m for m in ('transformers', 'huggingface_hub') if m in sys.modules]; assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
