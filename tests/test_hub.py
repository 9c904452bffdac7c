"""`ownllm pull / models / rm / show` without the network: huggingface_hub's download functions are replaced by
fakes, the cache is a real huggingface_hub cache layout in a temporary HF_HOME, and offline runs say so in one line."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest

from ownllm.hub import parse_spec, pick_gguf_files, pull
from tests.checkpoints import build_bert_checkpoint, build_checkpoint
from tests.test_errors import assert_one_line_error, run_cli

GGUF_REPO = ["README.md", "model-Q4_K_M.gguf", "model-Q8_0.gguf", "big/model-Q6_K-00001-of-00002.gguf",
             "big/model-Q6_K-00002-of-00002.gguf"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_spec_and_file_choice():
    assert parse_spec("org/repo:Q8_0") == ("org/repo", "Q8_0") and parse_spec("org/repo") == ("org/repo", None)
    with pytest.raises(ValueError, match="'repo' is not a hub model name; write ORG/REPO or ORG/REPO:QUANT"):
        parse_spec("repo")
    assert pick_gguf_files("org/repo", GGUF_REPO, "q8_0") == ["model-Q8_0.gguf"]
    assert pick_gguf_files("org/repo", GGUF_REPO, None) == ["model-Q4_K_M.gguf"]
    assert pick_gguf_files("org/repo", GGUF_REPO, "Q6_K") == GGUF_REPO[3:]
    with pytest.raises(FileNotFoundError, match="org/repo has no .gguf file for IQ2_XS; its .gguf files: "
                                                "model-Q6_K-00001-of-00002.gguf, model-Q6_K-00002-of-00002.gguf, "
                                                "model-Q4_K_M.gguf, model-Q8_0.gguf"):
        pick_gguf_files("org/repo", GGUF_REPO, "IQ2_XS")


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A hub whose repos are {"org/gguf": GGUF_REPO, "org/checkpoint": [config.json, ...]}; records downloads."""
    calls = []
    repos = {"org/gguf": GGUF_REPO, "org/checkpoint": ["config.json", "model.safetensors", "tokenizer.json"]}
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id: repos[repo_id])

    def hf_hub_download(repo_id, filename):
        calls.append(("file", repo_id, filename))
        return str(tmp_path / filename)

    def snapshot_download(repo_id, allow_patterns):
        calls.append(("snapshot", repo_id, tuple(allow_patterns)))
        return str(tmp_path / "snapshot")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return tmp_path, calls


def test_pull_downloads_one_quant_or_the_checkpoint(fake_hub):
    root, calls = fake_hub
    assert pull("org/gguf:Q6_K") == root / GGUF_REPO[3]
    assert calls == [("file", "org/gguf", GGUF_REPO[3]), ("file", "org/gguf", GGUF_REPO[4])]
    calls.clear()
    assert pull("org/gguf") == root / "model-Q4_K_M.gguf"
    assert pull("org/checkpoint") == root / "snapshot"
    assert calls[1][:2] == ("snapshot", "org/checkpoint") and "*.safetensors" in calls[1][2]


def test_pull_offline_says_so_in_one_line(tmp_path):
    result = run_cli("pull", "org/repo:Q4_K_M", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line_error(result, "cannot pull org/repo:Q4_K_M: offline (HF_HUB_OFFLINE is set)")


def cache_repo(hf_home: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A model in huggingface_hub's cache layout (blobs, refs/main, snapshots/COMMIT with links) -> its snapshot."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        blob = repo / "blobs" / f"blob-{len(content)}-{abs(hash(name))}"
        blob.write_bytes(content)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(blob)
    return snapshot


def test_models_lists_and_rm_removes_a_cached_model(tmp_path):
    cache_repo(tmp_path, "org/tiny", {"model-Q8_0.gguf": b"GGUF" + bytes(2044)})
    env = {"HF_HOME": str(tmp_path), "COLUMNS": "300"}
    assert "org/tiny:model-Q8_0" in run_cli("models", env=env).stdout
    result = run_cli("rm", "org/tiny", env=env)
    assert result.returncode == 0 and "removed org/tiny (2.0 KB freed)" in result.stdout
    assert not (tmp_path / "hub" / "models--org--tiny").exists()
    assert_one_line_error(run_cli("rm", "org/tiny", env=env),
                          "org/tiny is not in the Hugging Face cache; `ownllm models` lists what is")


def test_show_a_chat_model_and_an_embedding_model(tmp_path):
    build_checkpoint(tmp_path / "chat", "LlamaForCausalLM", max_position_embeddings=96)
    build_bert_checkpoint(tmp_path / "embed")
    chat = run_cli("show", "-m", str(tmp_path / "chat"), "--template").stdout
    assert "architecture    LlamaForCausalLM" in chat and "context length  96" in chat
    assert "capabilities    completion\n" in chat and "add_generation_prompt" in chat  # the template itself
    embed = run_cli("show", "-m", str(tmp_path / "embed")).stdout
    assert "architecture    BertModel" in embed and "capabilities    embedding" in embed
    assert "chat template   none" in embed


def test_show_offline_hub_id_not_cached_says_so(tmp_path):
    result = run_cli("show", "-m", "nobody/not-a-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert_one_line_error(result, "nobody/not-a-model", "offline")
