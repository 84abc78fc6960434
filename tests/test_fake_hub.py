"""The fake Hub speaks enough of the Hub's API for `huggingface_hub` to push a model and `from_pretrained` to reload it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TEXT, TINY_VISION
from fake_hub import FakeHub
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
from transformers import CLIPConfig, CLIPModel

TOKEN = "hf_test"


@pytest.fixture(scope="module")
def pushed_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = CLIPConfig(
        text_config={**TINY_TEXT, "vocab_size": 99, "max_position_embeddings": 77}, vision_config=TINY_VISION
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    (folder / "notes").mkdir()
    (folder / "notes" / "run.txt").write_text("trained for 0 steps\n")
    return folder


def _local_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("xet", [True, False], ids=["pipelined-upload", "create-commit"])
def test_push_and_reload_round_trip(
    fake_hub: FakeHub,
    pushed_model_dir: Path,
    xet: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With hf_xet installed, upload_folder takes its pipelined path; without, create_commit. Both must work.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", not xet)
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)

    repo_url = api.create_repo("user/m")
    api.upload_folder(folder_path=pushed_model_dir, repo_id=repo_url.repo_id, commit_message="Add model")

    assert repo_url.repo_id == "user/m"
    assert fake_hub.files("user/m") == _local_files(pushed_model_dir)
    assert fake_hub.commit_messages("user/m")[0] == "Add model"
    reloaded = CLIPModel.from_pretrained("user/m")
    original = CLIPModel.from_pretrained(pushed_model_dir)
    for (name, expected), actual in zip(original.state_dict().items(), reloaded.state_dict().values(), strict=True):
        assert torch.equal(expected, actual), name
    assert fake_hub.unhandled == [] and fake_hub.server_errors == []
    assert not any("xet" in path or "lfs" in path for _, path in fake_hub.requests)


def test_repo_listing_and_info(fake_hub: FakeHub, pushed_model_dir: Path) -> None:
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    assert api.whoami()["name"] == "user"
    # A name without a namespace goes under the token's user, as `Trainer.init_hf_repo` relies on.
    repo_id = api.create_repo("m").repo_id
    api.upload_folder(folder_path=pushed_model_dir, repo_id=repo_id)

    info = api.model_info(repo_id)
    top_level = {entry.path for entry in api.list_repo_tree(repo_id)}
    everything = {entry.path for entry in api.list_repo_tree(repo_id, recursive=True)}

    assert repo_id == "user/m"
    assert info.sha == api.repo_info(repo_id).sha
    assert {sibling.rfilename for sibling in info.siblings} == set(_local_files(pushed_model_dir))
    assert top_level == {"config.json", "model.safetensors", "notes"}
    assert everything == top_level | {"notes/run.txt"}
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_id)
    assert conflict.value.response.status_code == 409
    api.create_repo(repo_id, exist_ok=True)


def test_second_upload_replaces_and_deletes_files(fake_hub: FakeHub, tmp_path: Path) -> None:
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)
    api.create_repo("user/m")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    api.upload_folder(folder_path=tmp_path, repo_id="user/m")

    (tmp_path / "a.txt").write_text("one, edited")
    (tmp_path / "b.txt").unlink()
    api.upload_folder(folder_path=tmp_path, repo_id="user/m", delete_patterns="*.txt", commit_message="Edit")

    assert fake_hub.files("user/m") == {"a.txt": b"one, edited"}
    assert fake_hub.commit_messages("user/m")[0] == "Edit"
    assert Path(hf_hub_download("user/m", "a.txt")).read_bytes() == b"one, edited"


def test_write_without_token_is_refused(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("user/m", {"a.txt": b"kept"})
    (tmp_path / "a.txt").write_text("overwritten")
    anonymous = HfApi(endpoint=fake_hub.url, token=False)

    with pytest.raises(HfHubHTTPError, match="Authentication required") as create_error:
        anonymous.create_repo("user/new")
    with pytest.raises(HfHubHTTPError) as upload_error:
        anonymous.upload_folder(folder_path=tmp_path, repo_id="user/m")
    with pytest.raises(HfHubHTTPError, match="Invalid credentials") as bad_token_error:
        HfApi(endpoint=fake_hub.url, token="hf_wrong").upload_folder(folder_path=tmp_path, repo_id="user/m")

    assert create_error.value.response.status_code == 401
    assert upload_error.value.response.status_code == 401
    assert bad_token_error.value.response.status_code == 401
    assert not fake_hub.repo_exists("user/new")
    assert fake_hub.files("user/m") == {"a.txt": b"kept"}


def test_write_to_another_namespace_is_forbidden(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add_repo("other/m", {"a.txt": b"theirs"})
    (tmp_path / "a.txt").write_text("mine")
    api = HfApi(endpoint=fake_hub.url, token=TOKEN)

    with pytest.raises(HfHubHTTPError, match="403 Forbidden.*namespace 'other'") as create_error:
        api.create_repo("other/new")
    # exist_ok=True, as `Trainer.push_to_hub` calls it, returns the existing repo: the refusal comes with the upload.
    api.create_repo("other/m", exist_ok=True)
    with pytest.raises(HfHubHTTPError, match="403 Forbidden") as upload_error:
        api.upload_folder(folder_path=tmp_path, repo_id="other/m")

    assert create_error.value.response.status_code == 403
    assert upload_error.value.response.status_code == 403
    assert fake_hub.files("other/m") == {"a.txt": b"theirs"}


def test_organization_members_can_write(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(tokens={"hf_alice": "alice"}, organizations={"lab": ["alice"]}) as hub:
        hub.patch(monkeypatch)
        api = HfApi(endpoint=hub.url, token="hf_alice")
        assert api.create_repo("lab/m", token="hf_alice").repo_id == "lab/m"
        assert [org["name"] for org in api.whoami()["orgs"]] == ["lab"]


def test_download_errors_are_the_hubs(fake_hub: FakeHub) -> None:
    fake_hub.add_repo("user/m", {"a.txt": b"a"})
    fake_hub.add_repo("other/secret", {"a.txt": b"a"}, private=True)

    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download("user/m", "missing.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("user/absent", "a.txt")
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=fake_hub.url, token=TOKEN).model_info("other/secret")
    with pytest.raises(OSError, match="not a valid model identifier"):
        CLIPModel.from_pretrained("user/absent")
