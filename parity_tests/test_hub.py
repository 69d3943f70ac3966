"""The Hub side, offline: source resolution from a pre-populated cache, the model card, and pushing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import yaml
from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ResolvedRevision, constants, scan_cache_dir
from huggingface_hub import errors as hf_errors

from convert.base import hub
from convert import push
from convert.base.errors import CheckpointError, HubError
from convert.model_card import CardInfo, CardSource, card_sources, parse_model_card, read_license, render_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_TestSecretToken0123456789abcdef"
SHA_MAIN = "a" * 40
SHA_DEV = "b" * 40

# Runs `python -m convert.push` with every way out to the network replaced by a failure.
_NO_NETWORK_RUNNER = """\
import runpy, socket, sys
def refuse(*args, **kwargs):
    raise SystemExit("test: a network connection was attempted")
socket.socket.connect = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
sys.argv = ["convert.push", *sys.argv[1:]]
runpy.run_module("convert.push", run_name="__main__", alter_sys=True)
"""


# ----------------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(autouse=True)
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HF_HUB_OFFLINE=1, a fresh HF_HOME, no token, and any socket connection fails the test."""
    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HUGGINGFACE_HUB_CACHE",
                 "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub read these at import time.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return home / "hub"


def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lifts HF_HUB_OFFLINE (the socket guard stays: the Hub is faked where a test goes 'online')."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def tiny_safetensors() -> bytes:
    """A valid one-tensor safetensors file (F32 [2, 2])."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes(range(16))


def card_info(**changes) -> CardInfo:
    fields = dict(
        encoder=CardSource("facebook/wav2vec2-base", repo_id="facebook/wav2vec2-base", revision=SHA_MAIN,
                           license="apache-2.0", model_type="wav2vec2"),
        decoder=CardSource("facebook/bart-base", repo_id="facebook/bart-base", revision=SHA_DEV,
                           license="apache-2.0", model_type="bart"),
        initialised=("decoder/model/decoder/layers/*/encoder_attn", "enc_to_dec_proj"),
        seed=0,
        init_std=0.02,
        dtype="float32",
        params_loaded=1000,
        params_initialised=200,
        params_dropped=30,
        parity={"max_abs_logits_diff_flax_vs_torch": 3e-7},
        command="python -m convert.compose --encoder facebook/wav2vec2-base --decoder facebook/bart-base --output out",
    )
    fields.update(changes)
    return CardInfo(**fields)


def composed_files() -> dict[str, bytes]:
    config = {"model_type": "speech-encoder-decoder", "encoder": {"model_type": "wav2vec2"},
              "decoder": {"model_type": "bart"}}
    return {
        "README.md": render_model_card(card_info()).encode(),
        "config.json": json.dumps(config, indent=2).encode(),
        "flax_model.msgpack": b"\x81\xa6params\x80",
        "model.safetensors": tiny_safetensors(),
        "tokenizer/vocab.json": b'{"a": 0}',
    }


@pytest.fixture
def composed_dir(tmp_path: Path) -> Path:
    """A fake composed output directory, plus hidden files a push must leave out."""
    directory = tmp_path / "composed"
    for name, data in composed_files().items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    (directory / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (directory / ".cache" / "huggingface").mkdir(parents=True)
    (directory / ".cache" / "huggingface" / "download.lock").write_text("x")
    return directory


def populate_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], refs: tuple[str, ...] = ()) -> Path:
    """Writes huggingface_hub's documented cache layout: blobs by content, snapshot symlinks, refs.

    huggingface_hub offers no public function that writes into the cache without downloading, so the layout
    is written here (models--OWNER--NAME/{blobs,snapshots/<commit>,refs/<ref>}), and the tests check that
    the library's own scan_cache_dir reads it back.
    """
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    for name, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return snapshot


def source_files(weights: dict[str, bytes] | None = None, **extra: bytes) -> dict[str, bytes]:
    files = {"config.json": b'{"model_type": "wav2vec2"}', "preprocessor_config.json": b"{}",
             "README.md": b"---\nlicense: mit\n---\n# w2v2\n"}
    files.update({"model.safetensors": tiny_safetensors()} if weights is None else weights)
    files.update(extra)
    return files


def shard_index(*shards: str) -> bytes:
    return json.dumps({"weight_map": {f"tensor{i}": shard for i, shard in enumerate(shards)}}).encode()


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, answers like the Hub, or raises a given error."""

    instances: list[FakeHfApi] = []

    def __init__(self, token=None, **kwargs):
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        FakeHfApi.instances.append(self)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", (repo_id,), kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", (repo_id, list(operations)), kwargs))
        url = f"https://huggingface.co/{repo_id}/commit/{'c' * 40}"
        return type("CommitInfo", (), {"oid": "c" * 40, "commit_url": url})()


@pytest.fixture
def fake_api(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    FakeHfApi.instances = []
    monkeypatch.setattr(hub, "HfApi", FakeHfApi)
    return FakeHfApi


def http_error(cls: type[hf_errors.HfHubHTTPError], status: int) -> hf_errors.HfHubHTTPError:
    request = httpx2.Request("GET", "https://huggingface.co/api/models/owner/name")
    return cls(f"{status} error", response=httpx2.Response(status, request=request))


# ----------------------------------------------------------------------------------------------------------
# What a push sends


def test_dry_run_cli_lists_exact_files_and_sizes_without_network(composed_dir: Path, tmp_path: Path) -> None:
    before = sorted(p.relative_to(composed_dir).as_posix() for p in composed_dir.rglob("*"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    env.pop("HF_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", _NO_NETWORK_RUNNER, str(composed_dir), "me/composed", "--dry-run",
                           "--private", "--revision", "exp"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    listed = re.findall(r"^  (\S+)\s+.*\(([\d,]+) bytes\)$", proc.stdout, flags=re.M)
    expected = sorted((name, len(data)) for name, data in composed_files().items())
    assert [(name, int(size.replace(",", ""))) for name, size in listed] == expected, proc.stdout
    total = sum(size for _, size in expected)
    assert f"({total:,} bytes) in {len(expected)} files" in proc.stdout
    assert "https://huggingface.co/me/composed (private if created)" in proc.stdout
    assert "branch:   exp" in proc.stdout
    assert "message:  Add speech encoder-decoder composed from facebook/wav2vec2-base and facebook/bart-base" \
        in proc.stdout
    assert "Dry run: nothing will be uploaded." in proc.stdout
    assert sorted(p.relative_to(composed_dir).as_posix() for p in composed_dir.rglob("*")) == before


def test_commit_operations_are_every_file_in_stable_order(composed_dir: Path) -> None:
    ops = push.commit_operations(composed_dir)
    expected = sorted((name, len(data)) for name, data in composed_files().items())
    assert all(isinstance(op, CommitOperationAdd) for op in ops)
    assert [(op.path_in_repo, op.upload_info.size) for op in ops] == expected
    assert [Path(op.path_or_fileobj) for op in ops] == [composed_dir / name for name, _ in expected]
    assert [op.path_in_repo for op in push.commit_operations(composed_dir)] == [op.path_in_repo for op in ops]


def test_dry_run_reads_no_token_and_builds_no_api(composed_dir: Path, fake_api, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    result = push.push_to_hub(composed_dir, "me/composed", dry_run=True, commit_message="msg")
    assert fake_api.instances == []
    assert result.dry_run and result.commit_url is None and result.commit_message == "msg"
    assert result.files == tuple(sorted((n, len(d)) for n, d in composed_files().items()))
    assert TOKEN not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# The model card


def test_model_card_yaml_header_has_the_hub_fields() -> None:
    text = render_model_card(card_info())
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header == {
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "automatic-speech-recognition",
        "tags": ["speech-encoder-decoder", "automatic-speech-recognition", "jax", "flax", "wav2vec2", "bart",
                 "speech-encdec-flax"],
        "base_model": ["facebook/wav2vec2-base", "facebook/bart-base"],
    }
    metadata, body = parse_model_card(text)
    assert metadata == header
    # The Hub's own parser reads the same header (offline: no validation call).
    data = ModelCard(text).data
    assert data.library_name == "transformers" and data.base_model == header["base_model"]
    assert data.license == "apache-2.0" and data.pipeline_tag == "automatic-speech-recognition"
    for needle in ("seed 0", "initialiser scale (std) 0.02", "`enc_to_dec_proj`", "`float32`", "3.00e-07",
                   "max_abs_logits_diff_flax_vs_torch", "SpeechEncoderDecoderModel.from_pretrained",
                   "flax_model.speech_encoder_decoder", "python -m convert.compose --encoder facebook/wav2vec2-base",
                   f"/tree/{SHA_MAIN}", "| 1,000 | 200 | 30 |"):
        assert needle in body, needle


def test_model_card_leaves_local_sources_out_of_base_model() -> None:
    local = CardSource("../my bart|v2", model_type="bart", license="apache-2.0")
    text = render_model_card(card_info(decoder=local))
    metadata, body = parse_model_card(text)
    assert metadata["base_model"] == ["facebook/wav2vec2-base"]
    assert "local directory `../my bart\\|v2`" in body
    assert card_sources(text) == ("facebook/wav2vec2-base", "../my bart|v2")


@pytest.mark.parametrize(
    ("encoder_license", "decoder_license", "expected"),
    [("mit", "mit", "mit"), ("apache-2.0", "mit", "other"), ("mit", None, None), (None, None, None)],
)
def test_model_card_license_is_shared_other_or_absent(encoder_license, decoder_license, expected) -> None:
    info = card_info()
    info = card_info(encoder=CardSource(**{**vars(info.encoder), "license": encoder_license}),
                     decoder=CardSource(**{**vars(info.decoder), "license": decoder_license}))
    metadata, body = parse_model_card(render_model_card(info))
    assert metadata.get("license") == expected
    if expected == "other":
        assert "encoder: apache-2.0, decoder: mit" in body
    if expected is None:
        assert "No license is set" in body


def test_model_card_without_parity_says_not_verified() -> None:
    metadata, body = parse_model_card(render_model_card(card_info(parity=None, initialised=(), params_initialised=0)))
    assert "Not verified" in body and "Nothing: every parameter was loaded from a source." in body
    assert yaml.safe_load(yaml.safe_dump(metadata)) == metadata


@pytest.mark.parametrize(
    ("text", "message"),
    [("---\nlicense: mit\n# no end\n", "never closed"), ("---\nlicense: [mit\n---\nbody\n", "not valid YAML"),
     ("---\n- a\n- b\n---\n", "not a mapping")],
)
def test_malformed_card_header_is_one_line_error(text: str, message: str) -> None:
    with pytest.raises(Exception, match=message) as info:
        parse_model_card(text)
    assert "\n" not in str(info.value)


def test_card_without_header_parses_to_empty_metadata(tmp_path: Path) -> None:
    assert parse_model_card("# Title\ntext\n") == ({}, "# Title\ntext\n")
    (tmp_path / "README.md").write_text("---\r\nlicense: other\r\nlicense_name: llama2\r\n---\r\n# x\r\n")
    assert read_license(tmp_path) == "other (llama2)"
    assert read_license(tmp_path / "missing") is None


# ----------------------------------------------------------------------------------------------------------
# Resolving sources


def test_resolve_repo_id_from_prepopulated_offline_cache(offline_hub: Path) -> None:
    files = source_files(**{"tokenizer_config.json": b"{}"})
    populate_cache(offline_hub, "owner/w2v2", SHA_MAIN, files, refs=("main",))
    scanned = {repo.repo_id: repo for repo in scan_cache_dir(offline_hub).repos}
    assert {rev.commit_hash for rev in scanned["owner/w2v2"].revisions} == {SHA_MAIN}
    resolved = hub.resolve_source("owner/w2v2", what="encoder")
    assert (resolved.repo_id, resolved.revision, resolved.source) == ("owner/w2v2", SHA_MAIN, "owner/w2v2")
    assert resolved.path.resolve() == (offline_hub / "models--owner--w2v2" / "snapshots" / SHA_MAIN).resolve()
    assert (resolved.path / "model.safetensors").read_bytes() == files["model.safetensors"]
    assert read_license(resolved.path) == "mit"


def test_resolve_with_commit_sha_and_branch(offline_hub: Path) -> None:
    populate_cache(offline_hub, "owner/w2v2", SHA_MAIN, source_files(), refs=("main",))
    populate_cache(offline_hub, "owner/w2v2", SHA_DEV, source_files(**{"generation_config.json": b"{}"}),
                   refs=("dev",))
    for revision, commit in ((None, SHA_MAIN), ("main", SHA_MAIN), ("dev", SHA_DEV), (SHA_DEV, SHA_DEV),
                             (SHA_MAIN, SHA_MAIN)):
        resolved = hub.resolve_source("owner/w2v2", revision)
        assert resolved.revision == commit and resolved.path.name == commit, revision
    with pytest.raises(HubError) as info:
        hub.resolve_source("owner/w2v2", "v9")
    assert str(info.value) == ("owner/w2v2@v9: cannot reach the Hugging Face Hub and no cached copy was found "
                               "(offline: HF_HUB_OFFLINE=1)")


@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        ({"model.safetensors": b"s", "pytorch_model.bin": b"b", "flax_model.msgpack": b"f"}, ["model.safetensors"]),
        ({"pytorch_model.bin": b"b", "flax_model.msgpack": b"f"}, ["pytorch_model.bin"]),
        # A sharded safetensors copy with a shard missing is passed over for a complete msgpack.
        ({"model.safetensors.index.json": shard_index("model-00001-of-00002.safetensors",
                                                      "model-00002-of-00002.safetensors"),
          "model-00001-of-00002.safetensors": b"1", "flax_model.msgpack": b"f"}, ["flax_model.msgpack"]),
        ({"pytorch_model.bin.index.json": shard_index("pytorch_model-00001-of-00001.bin"),
          "pytorch_model-00001-of-00001.bin": b"1"},
         ["pytorch_model-00001-of-00001.bin", "pytorch_model.bin.index.json"]),
    ],
    ids=["safetensors-first", "bin-before-msgpack", "incomplete-shards-skipped", "sharded-bin"],
)
def test_offline_resolution_picks_the_first_complete_weight_format(offline_hub, monkeypatch, weights, expected):
    populate_cache(offline_hub, "owner/multi", SHA_MAIN, source_files(weights), refs=("main",))
    seen = {}
    real = hub.snapshot_download
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: seen.update(k) or real(*a, **k))
    hub.resolve_source("owner/multi")
    assert seen["local_files_only"] is True
    weight_names = {"model.safetensors", "pytorch_model.bin", "flax_model.msgpack"} | set(weights)
    assert sorted(n for n in seen["allow_patterns"] if n in weight_names) == expected


def test_offline_resolution_ignores_optional_files_an_earlier_download_left_out(offline_hub: Path) -> None:
    # snapshot_download records the repo's full listing in trees/<commit>.json (the documented format of
    # huggingface_hub's tree cache); offline it refuses a snapshot that lacks a listed file it was asked for.
    populate_cache(offline_hub, "owner/partial", SHA_MAIN, source_files(), refs=("main",))
    listing = {name: {"size": 1, "blob_id": "0" * 40}
               for name in [*source_files(), "tokenizer.json", "pytorch_model.bin", "flax_model.msgpack"]}
    trees = offline_hub / "models--owner--partial" / "trees"
    trees.mkdir()
    (trees / f"{SHA_MAIN}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    with pytest.raises(hf_errors.IncompleteSnapshotError):  # what a plain pattern list would run into
        hub.snapshot_download("owner/partial", cache_dir=offline_hub, local_files_only=True,
                              allow_patterns=[*hub.SOURCE_FILES, "model.safetensors"])
    resolved = hub.resolve_source("owner/partial")
    assert resolved.revision == SHA_MAIN and (resolved.path / "model.safetensors").is_file()


def test_resolve_when_nothing_is_cached_names_the_source(offline_hub: Path) -> None:
    with pytest.raises(HubError) as info:
        hub.resolve_source("facebook/wav2vec2-base")
    assert str(info.value) == ("facebook/wav2vec2-base: cannot reach the Hugging Face Hub and no cached copy was "
                               "found (offline: HF_HUB_OFFLINE=1)")


def test_resolve_cached_copy_without_weights_is_refused(offline_hub: Path) -> None:
    populate_cache(offline_hub, "owner/noweights", SHA_MAIN, source_files({}), refs=("main",))
    with pytest.raises(HubError, match=r"^owner/noweights: the cached copy \(commit aaaaaaaaaaaa\) has no complete "
                                       r"weights .*\(offline: HF_HUB_OFFLINE=1\)$"):
        hub.resolve_source("owner/noweights")


@pytest.mark.parametrize("src", ["a/b/c", "./not-here", "bad--name", "-x", "a b", "owner/.hidden", "x" * 97])
def test_invalid_repo_id_is_one_line_error(src: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(HubError) as info:
        hub.resolve_source(src, what="encoder")
    assert str(info.value) == (f"{src}: no such encoder directory, and not a valid Hub repo id "
                               "(expected NAME or OWNER/NAME)")


def test_local_directory_is_used_as_is(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "owner" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    # A local directory wins over a repo id of the same spelling, and nothing is looked up.
    assert hub.resolve_source("owner/name") == hub.ResolvedSource(Path("owner/name"), None, None, "owner/name")
    with pytest.raises(HubError, match="applies to a Hub repo id, but this is a local directory"):
        hub.resolve_source("owner/name", revision="main")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(HubError, match="^file.txt: not a directory"):
        hub.resolve_source("file.txt")


class FakeResolvingApi:
    """The two Hub calls resolve_source makes before downloading, answered from a fixed file list."""

    files = ["config.json", "README.md", "model.safetensors", "pytorch_model.bin", "flax_model.msgpack",
             "tokenizer.json", "onnx/model.onnx"]
    error: Exception | None = None

    def __init__(self, **kwargs):
        pass

    def resolve_revision(self, repo_id, *, revision=None, cache_dir=None, local_files_only=False):
        if local_files_only:  # the cache lookup makes no request: the real one answers
            return HfApi().resolve_revision(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        if self.error is not None:
            raise self.error
        return ResolvedRevision(resolved=SHA_MAIN, initial=revision, repo_id=repo_id, repo_type="model")

    def list_repo_files(self, repo_id, *, revision=None):
        assert revision == SHA_MAIN  # the listing is of the resolved commit
        return list(self.files)


def test_online_resolution_downloads_one_weight_format(offline_hub: Path, monkeypatch) -> None:
    online(monkeypatch)
    monkeypatch.setattr(hub, "HfApi", FakeResolvingApi)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(kwargs)
        return str(populate_cache(offline_hub, repo_id, SHA_MAIN, source_files()))

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    resolved = hub.resolve_source("owner/online", "main")
    assert resolved.revision == SHA_MAIN and resolved.repo_id == "owner/online"
    (kwargs,) = calls
    assert kwargs["revision"].resolved == SHA_MAIN and Path(kwargs["cache_dir"]) == offline_hub
    assert kwargs["allow_patterns"] == [*hub.SOURCE_FILES, "model.safetensors", "model.safetensors.index.json",
                                        "model-*.safetensors"]


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (http_error(hf_errors.RepositoryNotFoundError, 404),
         "owner/name@v1: repository not found on the Hugging Face Hub"),
        (http_error(hf_errors.GatedRepoError, 403), "owner/name@v1: gated repository: request access at "
                                                    "https://huggingface.co/owner/name"),
        (http_error(hf_errors.RevisionNotFoundError, 404), "owner/name@v1: revision 'v1' not found in owner/name"),
        (http_error(hf_errors.HfHubHTTPError, 401), "owner/name@v1: access denied (HTTP 401)"),
        (httpx2.ConnectError("no route"), "owner/name@v1: cannot reach the Hugging Face Hub and no cached copy was "
                                          "found (no network: ConnectError)"),
        (http_error(hf_errors.HfHubHTTPError, 503), "owner/name@v1: cannot reach the Hugging Face Hub and no cached "
                                                    "copy was found (the Hub answered HTTP 503)"),
    ],
    ids=["not-found", "gated", "revision", "unauthorized", "no-network", "hub-down"],
)
def test_online_resolution_errors_say_which(monkeypatch, error, message) -> None:
    online(monkeypatch)
    monkeypatch.setattr(hub, "HfApi", type("Failing", (FakeResolvingApi,), {"error": error}))
    with pytest.raises(HubError) as info:
        hub.resolve_source("owner/name", "v1")
    assert str(info.value).startswith(message) and "\n" not in str(info.value), str(info.value)


def test_online_resolution_refuses_a_repo_without_weights(monkeypatch) -> None:
    online(monkeypatch)
    monkeypatch.setattr(hub, "HfApi", type("NoWeights", (FakeResolvingApi,), {"files": ["config.json", "x.onnx"]}))
    with pytest.raises(HubError, match="^owner/name: the repository has no weights in a supported format"):
        hub.resolve_source("owner/name")


# ----------------------------------------------------------------------------------------------------------
# Pushing


def test_push_without_token_fails_before_any_network(composed_dir: Path, fake_api) -> None:
    with pytest.raises(HubError) as info:
        push.push_to_hub(composed_dir, "me/composed")
    assert str(info.value) == ("me/composed: no Hugging Face token found (HF_TOKEN or a cached login); "
                               "run `hf auth login` or set HF_TOKEN")
    assert fake_api.instances == []


def test_push_through_fake_api_sends_exact_operations_and_hides_the_token(composed_dir, fake_api, monkeypatch,
                                                                         capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    online(monkeypatch)
    result = push.push_to_hub(composed_dir, "me/composed", private=True, revision="exp")
    (api,) = fake_api.instances
    assert api.token == TOKEN
    names = [call[0] for call in api.calls]
    assert names == ["create_repo", "create_branch", "create_commit"]
    assert api.calls[0][2] == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert api.calls[1][2] == {"branch": "exp", "exist_ok": True}
    repo_id, operations = api.calls[2][1]
    expected = sorted((name, len(data)) for name, data in composed_files().items())
    assert repo_id == "me/composed"
    assert [(op.path_in_repo, op.upload_info.size) for op in operations] == expected
    assert api.calls[2][2]["commit_message"] == ("Add speech encoder-decoder composed from facebook/wav2vec2-base "
                                                 "and facebook/bart-base")
    assert api.calls[2][2]["revision"] == "exp"
    assert result.commit_sha == "c" * 40 and not result.dry_run and result.files == tuple(expected)
    captured = capsys.readouterr()
    for text in (captured.out, captured.err, repr(result)):
        assert TOKEN not in text
    assert "https://huggingface.co/me/composed/commit/" in captured.out


def test_push_cli_uses_cached_login_and_default_branch(composed_dir, fake_api, offline_hub, monkeypatch,
                                                       capsys) -> None:
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    online(monkeypatch)
    assert push.main([str(composed_dir), "me/composed", "--commit-message", "hello"]) == 0
    (api,) = fake_api.instances
    assert api.token == TOKEN
    assert [call[0] for call in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[1][2]["commit_message"] == "hello" and api.calls[1][2]["revision"] is None
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err


@pytest.mark.parametrize(
    ("error", "message"),
    [(httpx2.ConnectError("no route"), "me/composed: cannot reach the Hugging Face Hub (no network: ConnectError); "
                                       "nothing was uploaded"),
     (http_error(hf_errors.HfHubHTTPError, 403), "me/composed: the Hub refused the token (HTTP 403)")],
    ids=["no-network", "forbidden"],
)
def test_push_hub_failures_are_one_line(composed_dir, fake_api, monkeypatch, error, message) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    online(monkeypatch)

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(fake_api, "create_repo", fail)
    with pytest.raises(HubError) as info:
        push.push_to_hub(composed_dir, "me/composed")
    assert str(info.value).startswith(message) and "\n" not in str(info.value) and TOKEN not in str(info.value)


def test_push_offline_is_refused_after_the_token_check(composed_dir, fake_api, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    offline = r"^me/composed: cannot reach the Hugging Face Hub \(offline: HF_HUB_OFFLINE=1\)"
    with pytest.raises(HubError, match=offline):
        push.push_to_hub(composed_dir, "me/composed")
    assert fake_api.instances == []


def _break(directory: Path, how: str) -> tuple[Path, str]:
    if how == "missing":
        return directory / "nope", "nope: no such directory"
    if how == "not-composed":
        (directory / "config.json").write_text('{"model_type": "wav2vec2"}')
        return directory, "model_type='wav2vec2' is not a composed speech encoder-decoder"
    if how == "no-weights":
        (directory / "model.safetensors").unlink()
        (directory / "flax_model.msgpack").unlink()
        return directory, "no weights (looked for model.safetensors"
    if how == "missing-shard":
        (directory / "model.safetensors").unlink()
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}))
        return directory, "names shard 'model-00001-of-00001.safetensors', which is missing"
    if how == "truncated":
        data = (directory / "model.safetensors").read_bytes()
        (directory / "model.safetensors").write_bytes(data[:-4])
        return directory, "truncated safetensors file"
    if how == "truncated-msgpack":
        import msgpack

        array = msgpack.ExtType(1, msgpack.packb(((2, 2), "float32", bytes(16)), use_bin_type=True))  # flax's ndarray
        data = msgpack.packb({"params": {"w": array}}, use_bin_type=True)
        (directory / "flax_model.msgpack").write_bytes(data[:-4])
        return directory, "flax_model.msgpack: truncated or corrupt msgpack file"
    if how == "empty-msgpack":
        (directory / "flax_model.msgpack").write_bytes(b"")
        return directory, "flax_model.msgpack: empty weight file"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["missing", "not-composed", "no-weights", "missing-shard", "truncated",
                                 "truncated-msgpack", "empty-msgpack"])
def test_push_cli_refuses_other_and_partial_directories(composed_dir, fake_api, how, capsys) -> None:
    directory, message = _break(composed_dir, how)
    assert push.main([str(directory), "me/composed", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    with pytest.raises(CheckpointError):
        push.check_composed_directory(directory)


@pytest.mark.parametrize("repo_id", ["composed", "a/b/c", "me/bad..name", "me/"])
def test_push_cli_refuses_invalid_repo_id(composed_dir, repo_id, capsys) -> None:
    assert push.main([str(composed_dir), repo_id, "--dry-run"]) == 2  # a usage error
    assert capsys.readouterr().err == f"error: {repo_id}: not a valid Hub repo id (expected OWNER/NAME)\n"


@pytest.mark.parametrize(("revision", "why"), [
    ("../../x", "holds '..'"), ("a b~^:", "holds ' ', '~', '^', ':'"), ("-x", "starts with '-'"),
    ("/x", "starts with '/'"), ("x/", "ends with '/'"), ("x.lock", "has a part ending with '.lock'"),
    ("a@{1}", "holds '@{'"), ("@", "is '@' alone"), ("a\tb", "holds a control character"),
    ("a/.b", "has a part starting with '.'"), ("a?", "holds '?'"), ("a\\b", "holds '\\\\'"), ("x.", "ends with '.'"),
])
def test_push_cli_refuses_a_branch_name_git_refuses(composed_dir, fake_api, revision, why, capsys) -> None:
    assert push.main([str(composed_dir), "me/composed", "--dry-run", f"--revision={revision}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --revision {revision!r}: is not a branch name git accepts (it {why}"), err
    assert err.count("\n") == 1 and fake_api.instances == []


def test_push_dry_run_accepts_branch_names_git_accepts(composed_dir, capsys) -> None:
    for revision in ("experiments", "feature/x-1.2", "refs/pr/1", "v1.0@2"):
        assert push.main([str(composed_dir), "me/composed", "--dry-run", "--revision", revision]) == 0
        assert f"branch:   {revision}" in capsys.readouterr().out


def test_push_cli_bad_flag_is_a_usage_error(composed_dir, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        push.main([str(composed_dir), "me/composed", "--privat"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: unrecognized arguments: --privat") and err.count("\n") == 1


def test_push_cli_help_names_every_flag(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        push.main(["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    for flag in ("DIR", "OWNER/NAME", "--private", "--commit-message", "--dry-run", "--revision", "HF_TOKEN"):
        assert flag in out, flag


def test_human_size_uses_si_units() -> None:
    assert [push.human_size(n) for n in (0, 999, 1000, 1_536_000, 2_300_000_000)] == ["0 B", "999 B", "1.0 kB",
                                                                                     "1.5 MB", "2.3 GB"]


# ----------------------------------------------------------------------------------------------------------
# With convert.compose


def compose_report(tmp_path: Path) -> dict:
    """A report shaped like convert.compose's, for a Hub encoder and a local decoder with a card."""
    decoder_dir = tmp_path / "my-gpt2"
    decoder_dir.mkdir()
    (decoder_dir / "README.md").write_text("---\nlicense: mit\n---\n")
    return {
        "encoder": {"source": "owner/w2v", "path": str(tmp_path / "snap"), "repo_id": "owner/w2v",
                    "revision": SHA_MAIN, "model_type": "wav2vec2", "license": None,
                    "dropped": [["lm_head.weight", "CTC head"], ["lm_head.bias", "CTC head"]]},
        "decoder": {"source": str(decoder_dir), "path": str(decoder_dir), "repo_id": None, "revision": None,
                    "model_type": "gpt2", "license": None, "dropped": []},
        "initialised": ["decoder/transformer/h/0/crossattention/c_attn/kernel",
                        "decoder/transformer/h/0/crossattention/c_attn/bias",
                        "decoder/transformer/h/11/crossattention/c_attn/kernel", "enc_to_dec_proj/kernel"],
        "init": {"seed": 7, "std": 0.02},
        "dtype": "bfloat16",
        "parameters": {"loaded": 10, "initialised": 5, "dropped": 3},
        "verification": {"max_abs_logits_diff": 4e-6, "tolerance": 1e-4, "passed": True},
        "command": "python -m convert.compose --encoder owner/w2v --decoder my-gpt2 --output out --seed 7",
        "files": {"config.json": 1, "flax_model.msgpack": 2},
    }


def test_card_info_from_report_groups_what_was_initialised_and_dropped(tmp_path: Path) -> None:
    from convert.model_card import card_info_from_report

    info = card_info_from_report(compose_report(tmp_path), repo_id="me/w2v-gpt2")
    assert info.initialised == ("decoder/transformer/h/*/crossattention/c_attn", "enc_to_dec_proj")
    assert info.dropped == ("encoder: 2 tensors: CTC head",)
    assert info.decoder.license == "mit" and info.encoder.license is None  # the decoder's own README.md
    assert info.parity == {"max_abs_logits_diff_flax_vs_torch": 4e-6, "tolerance": 1e-4}
    assert info.formats == ("flax",) and info.seed == 7 and info.dtype == "bfloat16"
    metadata, body = parse_model_card(render_model_card(info))
    assert metadata["base_model"] == ["owner/w2v"] and "license" not in metadata
    assert 'FlaxSpeechEncoderDecoderModel.from_pretrained("me/w2v-gpt2")' in body
    assert 'from_pretrained("me/w2v-gpt2", from_flax=True)' in body  # no safetensors were written
    assert "--seed 7" in body and "`bfloat16`" in body and "seed 7" in body


def test_default_commit_message_prefers_the_compose_report(composed_dir: Path, tmp_path: Path) -> None:
    from convert.compose import REPORT_FILE

    (composed_dir / REPORT_FILE).write_text(json.dumps(compose_report(tmp_path)))
    assert push.default_commit_message(composed_dir) == (f"Add speech encoder-decoder composed from owner/w2v and "
                                                        f"{tmp_path / 'my-gpt2'}")
    (composed_dir / REPORT_FILE).unlink()
    (composed_dir / "README.md").write_text("# no card\n")
    assert push.default_commit_message(composed_dir) == "Upload composed speech encoder-decoder"


def test_validate_repo_id_names_the_flag() -> None:
    hub.validate_repo_id("me/model")
    with pytest.raises(HubError) as info:
        hub.validate_repo_id("model", flag="--push-to-hub")
    assert str(info.value) == "--push-to-hub model: not a valid Hub repo id (expected OWNER/NAME)"


def test_compose_from_cached_hub_encoder_then_dry_run_push(fixture_dir, offline_hub, tmp_path, capsys) -> None:
    """The whole path offline: a repo id from the cache -> compose -> card -> dry-run push."""
    import io

    from convert.compose import compose

    encoder_dir = fixture_dir("w2v_group")
    files = {p.name: p.read_bytes() for p in encoder_dir.iterdir() if p.is_file()}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n# tiny wav2vec2\n"
    populate_cache(offline_hub, "owner/tiny-w2v", SHA_MAIN, files, refs=("main",))
    decoder_dir = tmp_path / "gpt2"
    decoder_dir.mkdir()
    for p in fixture_dir("gpt2_lm").iterdir():
        (decoder_dir / p.name).write_bytes(p.read_bytes())
    (decoder_dir / "README.md").write_text("---\nlicense: apache-2.0\n---\n")

    result = compose("owner/tiny-w2v", str(decoder_dir), tmp_path / "out", verify=False, progress=False,
                     log=io.StringIO(), command="python -m convert.compose ...")
    assert result.report["encoder"]["revision"] == SHA_MAIN
    metadata, body = parse_model_card((result.output / "README.md").read_text())
    assert metadata["base_model"] == ["owner/tiny-w2v"] and metadata["license"] == "apache-2.0"
    assert "crossattention" in body and "Not verified" in body

    pushed = push.push_to_hub(result.output, "me/tiny", dry_run=True)
    names = [name for name, _ in pushed.files]
    assert {"README.md", "config.json", "flax_model.msgpack", "model.safetensors"} <= set(names)
    assert names == sorted(names)
    assert pushed.commit_message == f"Add speech encoder-decoder composed from owner/tiny-w2v and {decoder_dir}"
    assert "Dry run: nothing will be uploaded." in capsys.readouterr().out


def _compose_builtin(tmp_path: Path) -> Path:
    import io

    from convert.compose import compose

    return compose("wav2vec2", "bart", tmp_path / "composed", verify=False, progress=False, log=io.StringIO()).output


def test_flax_model_from_pretrained_accepts_a_cached_repo_id(offline_hub, tmp_path) -> None:
    from convert.verify import seeded_inputs
    from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

    local = _compose_builtin(tmp_path)
    files = {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()}
    populate_cache(offline_hub, "me/composed", SHA_MAIN, files, refs=("main",))
    from_hub = FlaxSpeechEncoderDecoderModel.from_pretrained("me/composed", revision="main")
    from_dir = FlaxSpeechEncoderDecoderModel.from_pretrained(local)
    batch = seeded_inputs(from_dir.config, seed=0, seconds=0.1)
    np_equal = __import__("numpy").array_equal
    assert np_equal(from_hub(**batch).logits, from_dir(**batch).logits)


def test_compose_cli_push_dry_run_lists_the_written_files(tmp_path) -> None:
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "-m", "convert.compose", "--encoder", "wav2vec2", "--decoder", "gpt2", "--output", str(out),
         "--no-verify", "--no-progress", "--push-to-hub", "me/tiny-asr", "--dry-run"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 0, result.stderr
    assert "Dry run: nothing will be uploaded." in result.stdout and "me/tiny-asr" in result.stdout
    for name in ("model.safetensors", "flax_model.msgpack", "config.json", "README.md"):
        size = (out / name).stat().st_size
        assert re.search(rf"{re.escape(name)}\s.*\b{size:,}\b|{re.escape(name)}\s.*\b{size}\b", result.stdout), name


def test_compose_cli_failed_push_keeps_the_composed_files(tmp_path) -> None:
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    result = subprocess.run(
        [sys.executable, "-m", "convert.compose", "--encoder", "wav2vec2", "--decoder", "bart", "--output", str(out),
         "--no-verify", "--no-progress", "--push-to-hub", "me/tiny-asr"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300,
        env={**env, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "token" in lines[0].lower() and f"safe in {out}" in lines[0], result.stderr
    assert (out / "model.safetensors").is_file() and (out / "flax_model.msgpack").is_file()
