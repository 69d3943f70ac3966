"""The Hugging Face Hub side: resolving `--encoder`/`--decoder` sources (with the offline cache) and pushing.

Pulling. `resolve_source` takes a local directory as it is, or a Hub repo id, which it resolves to one commit
and downloads into the standard cache (`HF_HOME` / `HF_HUB_CACHE`) with `snapshot_download`, limited to the
config, tokenizer and card files and to weights in ONE format (safetensors, else PyTorch `.bin`, else Flax
msgpack). The format is chosen from the repo's file list, so other formats are never downloaded. Offline
(`HF_HUB_OFFLINE=1`, or the Hub cannot be reached) the same choice is made from what the cache holds.

Pushing. `push_to_hub` uploads every file of a composed directory in one commit (`create_repo` with
`exist_ok=True`, then `create_commit`). `dry_run=True` prints what would be sent and touches no network.
The token comes from `HF_TOKEN` or the cached login (`huggingface_hub.get_token`); it is passed to
`HfApi` and never printed, logged or written by us.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import TextIO

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token, snapshot_download, try_to_load_from_cache
from huggingface_hub import errors as hf_errors

from convert import checkpoint as ckpt
from convert.errors import CheckpointError, ConvertError, HubError
from convert.model_card import HUB_URL, LIBRARY_NAME, card_sources

COMPOSED_MODEL_TYPE = "speech-encoder-decoder"
DEFAULT_COMMIT_MESSAGE = "Upload composed speech encoder-decoder"
LOGIN_HINT = "run `hf auth login` or set HF_TOKEN"

# What a source checkpoint needs besides its weights. Exact names: snapshot_download matches them with fnmatch
# against the full path, so none of them picks up a file in a subfolder.
SOURCE_FILES: tuple[str, ...] = (
    ckpt.CONFIG,
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "sentencepiece.bpe.model",
    "added_tokens.json",
    "README.md",
)

# Hub repo ids: NAME or OWNER/NAME, [A-Za-z0-9._-], no "--" or "..", not starting or ending with "-" or ".",
# at most 96 characters (huggingface_hub's validate_repo_id, which also refuses a trailing ".git").
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"(?:{_REPO_PART}/)?{_REPO_PART}")
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """One way of storing weights: a single file, or an index JSON naming shards."""

    name: str
    single: str
    index: str
    shard_pattern: str

    @property
    def patterns(self) -> list[str]:
        return [self.single, self.index, self.shard_pattern]


# In order of preference (the same order `Checkpoint` reads them in).
WEIGHT_FORMATS: tuple[WeightFormat, ...] = (
    WeightFormat("safetensors", ckpt.SAFETENSORS, ckpt.SAFETENSORS_INDEX, "model-*.safetensors"),
    WeightFormat("pytorch", ckpt.PYTORCH_BIN, ckpt.PYTORCH_BIN_INDEX, "pytorch_model-*.bin"),
    WeightFormat("flax", ckpt.FLAX_MSGPACK, ckpt.FLAX_MSGPACK_INDEX, "flax_model-*.msgpack"),
)
_FORMAT_NAMES = "model.safetensors, pytorch_model.bin or flax_model.msgpack (single or sharded)"


@dataclasses.dataclass(frozen=True)
class ResolvedSource:
    """A checkpoint directory on disk and where it came from.

    Attributes:
        path: the directory holding `config.json` and the weights (a cache snapshot folder for Hub sources).
        repo_id: the Hub repo id, or None for a local directory.
        revision: the commit sha the Hub source resolved to, or None for a local directory.
        source: what the user passed (the directory path or the repo id), for messages and the model card.
    """

    path: Path
    repo_id: str | None
    revision: str | None
    source: str

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None


@dataclasses.dataclass(frozen=True)
class PushResult:
    """What `push_to_hub` sent (or would send, for a dry run).

    Attributes:
        repo_id: the target repo, OWNER/NAME.
        revision: the target branch, or None for the default branch.
        files: (path in the repo, size in bytes) for every file, in upload order.
        commit_message: the commit message.
        private: whether the repo was asked to be private when created.
        dry_run: True when nothing was uploaded.
        commit_url: the commit's URL on the Hub (None for a dry run).
        commit_sha: the commit's sha (None for a dry run).
    """

    repo_id: str
    revision: str | None
    files: tuple[tuple[str, int], ...]
    commit_message: str
    private: bool
    dry_run: bool
    commit_url: str | None = None
    commit_sha: str | None = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)


# ----------------------------------------------------------------------------------------------------------
# Environment, read at call time


def is_offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) is set, now or when huggingface_hub was imported."""
    # huggingface_hub reads the variable once, at import; reading it again honours a value set afterwards.
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return constants.is_offline_mode() or env.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path:
    """The standard Hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else huggingface_hub's default."""
    # huggingface_hub fixes constants.HF_HUB_CACHE at import; a variable set later is honoured here, with the
    # library's precedence. When none is set, the library's value stands (it may have been changed in code).
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return Path(os.path.expandvars(os.environ[name])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_repo_id(text: str) -> bool:
    """Whether `text` is a valid Hub model repo id: `NAME` or `OWNER/NAME`."""
    return (
        len(text) <= 96
        and _REPO_ID.fullmatch(text) is not None
        and "--" not in text
        and ".." not in text
        and not text.endswith(".git")
    )


def validate_repo_id(repo_id: str, *, flag: str | None = None) -> None:
    """Refuses anything but OWNER/NAME as a push target, before any work is done.

    Args:
        repo_id: the target repo id.
        flag: the command-line flag it came from, to name in the message (e.g. "--push-to-hub").

    Raises:
        HubError: `[FLAG ]REPO_ID: not a valid Hub repo id (expected OWNER/NAME)`.
    """
    if not (is_repo_id(repo_id) and "/" in repo_id):
        where = f"{flag} {repo_id}" if flag else repo_id
        raise HubError(f"{where}: not a valid Hub repo id (expected OWNER/NAME)")


def _library_version() -> str:
    try:
        return importlib_metadata.version(LIBRARY_NAME)
    except importlib_metadata.PackageNotFoundError:
        return "0"


def _api(token: str | None = None) -> HfApi:
    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=_library_version())


def _first_line(e: BaseException, secret: str | None = None) -> str:
    text = str(e).strip()
    line = text.splitlines()[0].strip() if text else type(e).__name__
    if secret:
        line = line.replace(secret, "***")
    return line


def _unreachable_reason(error: BaseException | None) -> str:
    if isinstance(error, hf_errors.RevisionResolutionError) and error.__cause__ is not None:
        error = error.__cause__
    if error is None or isinstance(error, hf_errors.OfflineModeIsEnabled):
        return "offline: HF_HUB_OFFLINE=1"
    if isinstance(error, hf_errors.HfHubHTTPError):
        return f"the Hub answered HTTP {error.response.status_code}"
    return f"no network: {type(error).__name__}"


# Errors that mean "the Hub could not be reached" (the caller falls back to the cache or reports it).
_UNREACHABLE = (httpx2.TransportError, hf_errors.OfflineModeIsEnabled, hf_errors.RevisionResolutionError)


# ----------------------------------------------------------------------------------------------------------
# Pulling


def resolve_source(src: str, revision: str | None = None, *, what: str = "checkpoint") -> ResolvedSource:
    """Finds a checkpoint directory on disk for a local path or a Hub repo id, downloading it when needed.

    A path to an existing directory is used as it is. Anything else must be a Hub repo id (`NAME` or
    `OWNER/NAME`): its revision is resolved to a commit, the repo's file list decides the weight format
    (safetensors, else `pytorch_model.bin`, else `flax_model.msgpack`, each single or sharded), and
    `snapshot_download` fetches config, tokenizer, card and those weights into the standard cache. When
    offline (`HF_HUB_OFFLINE=1`) or when the Hub cannot be reached, the cache alone is used: the revision is
    resolved through its `refs/`, and the format is the first one the cache holds completely.

    Args:
        src: a local checkpoint directory, or a Hub repo id.
        revision: for a repo id, a branch, tag or commit sha (default: the default branch). Refused for a
            local directory.
        what: what the source is, for error messages ("encoder", "decoder", "checkpoint").

    Returns:
        The directory, with the repo id and resolved commit sha when it came from the Hub.

    Raises:
        HubError: one line naming the source: not a directory nor a repo id, repo or revision not found, gated,
            unreachable Hub with nothing cached, or no weights in a supported format.
    """
    path = Path(src).expanduser()
    if path.is_dir():
        if revision is not None:
            raise HubError(f"{src}: a revision ({revision}) applies to a Hub repo id, but this is a local directory")
        return ResolvedSource(path=path, repo_id=None, revision=None, source=src)
    if path.exists():
        raise HubError(f"{src}: not a directory (a {what} is a directory holding config.json and weights)")
    if not is_repo_id(src):
        raise HubError(f"{src}: no such {what} directory, and not a valid Hub repo id (expected NAME or OWNER/NAME)")
    label = src if revision is None else f"{src}@{revision}"
    cache_dir = hub_cache_dir()
    if is_offline():
        return _resolve_from_cache(src, revision, label, cache_dir, error=None)
    api = _api()
    try:
        resolved = api.resolve_revision(src, revision=revision, cache_dir=cache_dir)
        files = api.list_repo_files(src, revision=resolved.resolved)
    except _UNREACHABLE as e:
        return _resolve_from_cache(src, revision, label, cache_dir, error=e)
    except hf_errors.HfHubHTTPError as e:
        if e.response.status_code >= 500:  # the Hub is down: the cache may still serve
            return _resolve_from_cache(src, revision, label, cache_dir, error=e)
        raise _hub_http_error(label, src, revision, e) from None

    fmt = next((f for f in WEIGHT_FORMATS if f.single in files or f.index in files), None)
    if ckpt.CONFIG not in files:
        raise HubError(f"{label}: the repository has no config.json at the top level (not a {what} checkpoint)")
    if fmt is None:
        raise HubError(f"{label}: the repository has no weights in a supported format ({_FORMAT_NAMES})")
    try:
        snapshot = snapshot_download(
            src,
            revision=resolved,
            cache_dir=cache_dir,
            allow_patterns=[*SOURCE_FILES, *fmt.patterns],
            library_name=LIBRARY_NAME,
            library_version=_library_version(),
        )
    except _UNREACHABLE as e:
        raise HubError(f"{label}: lost the connection to the Hugging Face Hub while downloading "
                       f"({type(e).__name__}); run again to resume") from None
    except hf_errors.HfHubHTTPError as e:
        raise _hub_http_error(label, src, revision, e) from None
    return ResolvedSource(path=Path(snapshot), repo_id=src, revision=resolved.resolved, source=src)


def _hub_http_error(label: str, repo_id: str, revision: str | None, e: hf_errors.HfHubHTTPError) -> HubError:
    # Order matters: GatedRepoError is a RepositoryNotFoundError.
    if isinstance(e, hf_errors.GatedRepoError):
        return HubError(f"{label}: gated repository: request access at {HUB_URL}/{repo_id} and log in ({LOGIN_HINT})")
    if isinstance(e, hf_errors.RepositoryNotFoundError):
        return HubError(f"{label}: repository not found on the Hugging Face Hub (if it is private, log in: "
                        f"{LOGIN_HINT})")
    if isinstance(e, hf_errors.RevisionNotFoundError):
        return HubError(f"{label}: revision {revision!r} not found in {repo_id} on the Hugging Face Hub")
    if isinstance(e, hf_errors.DisabledRepoError):
        return HubError(f"{label}: the repository is disabled on the Hugging Face Hub")
    status = e.response.status_code
    if status in (401, 403):
        return HubError(f"{label}: access denied (HTTP {status}): the token is missing, invalid or lacks access "
                        f"({LOGIN_HINT})")
    return HubError(f"{label}: the Hugging Face Hub answered HTTP {status}: {_first_line(e)}")


def _resolve_from_cache(repo_id: str, revision: str | None, label: str, cache_dir: Path,
                        error: BaseException | None) -> ResolvedSource:
    """The offline path: the commit from the cache's refs, the first weight format the cache holds whole."""
    not_cached = HubError(f"{label}: cannot reach the Hugging Face Hub and no cached copy was found "
                          f"({_unreachable_reason(error)})")
    if revision is not None and _COMMIT_SHA.fullmatch(revision):
        commit = revision
    else:
        try:
            commit = _api().resolve_revision(repo_id, revision=revision, cache_dir=cache_dir,
                                             local_files_only=True).resolved
        except hf_errors.RevisionResolutionError:
            raise not_cached from None

    def cached(filename: str) -> str | None:
        try:
            found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=commit)
        except ValueError:  # a shard name from an index that climbs out of the snapshot ("../x")
            return None
        return found if isinstance(found, str) else None  # None, or the "known not to exist" sentinel

    if cached(ckpt.CONFIG) is None:
        raise not_cached
    weights = next((w for w in (_cached_weights(f, cached) for f in WEIGHT_FORMATS) if w), None)
    if weights is None:
        raise HubError(f"{label}: the cached copy (commit {commit[:12]}) has no complete weights ({_FORMAT_NAMES}); "
                       f"cannot download them ({_unreachable_reason(error)})")
    # Exact names of files that are there: snapshot_download then returns the snapshot folder, and does not
    # refuse it for optional files (a tokenizer, README.md) that an earlier download left out.
    allow = [name for name in SOURCE_FILES if cached(name)] + weights
    try:
        snapshot = snapshot_download(repo_id, revision=commit, cache_dir=cache_dir, local_files_only=True,
                                     allow_patterns=allow)
    except (hf_errors.LocalEntryNotFoundError, OSError):
        raise not_cached from None
    return ResolvedSource(path=Path(snapshot), repo_id=repo_id, revision=commit, source=repo_id)


def _cached_weights(fmt: WeightFormat, cached) -> list[str] | None:
    """The format's files when the cache holds all of them (an index and every shard it names), else None."""
    if cached(fmt.single):
        return [fmt.single]
    index_path = cached(fmt.index)
    if index_path is None:
        return None
    try:
        weight_map = json.loads(Path(index_path).read_text(encoding="utf-8")).get("weight_map")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(weight_map, dict) or not weight_map:
        return None
    if not all(isinstance(shard, str) for shard in weight_map.values()):
        return None
    shards = sorted(set(weight_map.values()))
    if not all(cached(shard) for shard in shards):
        return None
    return [fmt.index, *shards]


# ----------------------------------------------------------------------------------------------------------
# Pushing


def check_composed_directory(directory: str | Path) -> dict:
    """Refuses anything but a complete composed output directory; returns its parsed config.json.

    A composed directory has a `config.json` with `model_type: speech-encoder-decoder` and weights: at least
    one of the weight files `Checkpoint` reads, every shard named by an index present, no empty weight file,
    and safetensors headers that fit their files (a truncated copy is refused).

    Args:
        directory: the directory to check.

    Returns:
        The parsed `config.json`.

    Raises:
        CheckpointError: one line naming the directory or file and what is wrong.
    """
    directory = Path(directory)
    if not directory.exists():
        raise CheckpointError(f"{directory}: no such directory")
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config_path = directory / ckpt.CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: not a composed model directory (no config.json)")
    config = ckpt.read_json(config_path)
    if config.get("model_type") != COMPOSED_MODEL_TYPE:
        raise CheckpointError(f"{config_path}: model_type={config.get('model_type')!r} is not a composed speech "
                              f"encoder-decoder (expected {COMPOSED_MODEL_TYPE!r})")
    present = [name for name in ckpt.WEIGHT_FILES if (directory / name).is_file()]
    if not present:
        raise CheckpointError(f"{directory}: no weights (looked for {', '.join(ckpt.WEIGHT_FILES)}); "
                              "the directory is empty or partial")
    for name in present:
        files = [directory / name]
        if name.endswith(".index.json"):
            weight_map = ckpt.read_json(directory / name).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{directory / name}: no 'weight_map' in the shard index")
            files = [directory / shard for shard in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{directory / name}: names shard {f.name!r}, which is missing")
        for f in files:
            if f.stat().st_size == 0:
                raise CheckpointError(f"{f}: empty weight file")
    if ckpt.SAFETENSORS in present or ckpt.SAFETENSORS_INDEX in present:
        # Header-only parse: checks every tensor's extent against the file size without reading data.
        ckpt.Checkpoint(directory, prefer=(ckpt.SAFETENSORS, ckpt.SAFETENSORS_INDEX))
    return config


def upload_files(directory: str | Path) -> list[tuple[str, Path, int]]:
    """(path in the repo, local path, size in bytes) of every file a push sends, sorted by path in the repo.

    Files and folders whose name starts with "." are left out: `.git`, `.gitattributes` (the Hub keeps its
    own), `.cache/huggingface` (a `snapshot_download(local_dir=...)` marker), editor and OS droppings.
    """
    directory = Path(directory)
    out = []
    for path in directory.rglob("*"):
        rel = path.relative_to(directory)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file():
            continue
        out.append((rel.as_posix(), path, path.stat().st_size))
    return sorted(out, key=lambda item: item[0])


def commit_operations(directory: str | Path) -> list[CommitOperationAdd]:
    """One `CommitOperationAdd` per file of a composed output directory, sorted by path in the repo.

    Args:
        directory: a composed output directory (see `check_composed_directory`; not checked here).

    Returns:
        The operations for `HfApi.create_commit`; building them hashes every file (sha256), as an upload must.
    """
    return [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path, _ in upload_files(directory)]


def default_commit_message(directory: str | Path) -> str:
    """ "Add speech encoder-decoder composed from ENC and DEC" when the directory names its sources.

    The sources come from `compose_report.json` (written by `convert.compose`), else from the model card
    (our Sources table, or a two-entry `base_model`); otherwise the message is generic.
    """
    from convert.compose import REPORT_FILE  # here: convert.compose imports this module

    directory = Path(directory)
    sources = None
    try:
        report = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
        sources = tuple(report[part].get("repo_id") or report[part]["source"] for part in ("encoder", "decoder"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        readme = directory / "README.md"
        try:
            sources = card_sources(readme.read_text(encoding="utf-8")) if readme.is_file() else None
        except (OSError, UnicodeDecodeError, ConvertError):
            sources = None
    if not sources or not all(isinstance(s, str) and s for s in sources):
        return DEFAULT_COMMIT_MESSAGE
    return f"Add speech encoder-decoder composed from {sources[0]} and {sources[1]}"


def human_size(n: int) -> str:
    """Bytes in SI units, as the Hub shows sizes: 999 B, 1.5 kB, 2.3 GB."""
    if n < 1000:
        return f"{n} B"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        value /= 1000
        if value < 999.95 or unit == "PB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def format_plan(repo_id: str, files: Sequence[tuple[str, int]], commit_message: str, *, private: bool,
                revision: str | None) -> str:
    """The dry-run report: the repo, each file with its size, the total, and the commit message."""
    width = max((len(name) for name, _ in files), default=0)
    lines = [
        f"repo:     {HUB_URL}/{repo_id} ({'private' if private else 'public'} if created)",
        f"branch:   {revision or 'the default branch'}",
        f"files:    {len(files)}",
    ]
    for name, size in files:
        lines.append(f"  {name:<{width}}  {human_size(size):>9}  ({size:,} bytes)")
    total = sum(size for _, size in files)
    lines.append(f"total:    {human_size(total)} ({total:,} bytes) in {len(files)} file{'s' * (len(files) != 1)}")
    lines.append(f"message:  {commit_message}")
    return "\n".join(lines)


def push_to_hub(directory: str | Path, repo_id: str, *, private: bool = False, commit_message: str | None = None,
                revision: str | None = None, dry_run: bool = False, token: str | None = None,
                out: TextIO | None = None) -> PushResult:
    """Uploads a composed output directory to a Hub model repo in one commit.

    Creates the repo when needed (`create_repo(exist_ok=True, private=private)`; an existing repo keeps its
    visibility), creates `revision` as a branch when given and missing, then commits every file of the
    directory (see `upload_files`). With `dry_run=True` it prints the plan and returns without reading a token
    or touching the network.

    Args:
        directory: a composed output directory (`config.json` with `model_type: speech-encoder-decoder`, weights).
        repo_id: the target repo, OWNER/NAME.
        private: create the repo as private (no effect on an existing repo).
        commit_message: the commit message (default: from the directory's model card, see
            `default_commit_message`).
        revision: the target branch (default: the repo's default branch).
        dry_run: print what would be uploaded and upload nothing.
        token: a Hub token; default `HF_TOKEN`, then the cached login. Never printed.
        out: where progress and the dry-run plan are printed (default: sys.stdout at call time).

    Returns:
        What was sent (or would be), with the commit URL and sha after a real push.

    Raises:
        CheckpointError: the directory is not a complete composed model.
        HubError: invalid repo id, no token, the Hub unreachable or refusing the upload (one line, no token).
    """
    out = out if out is not None else sys.stdout
    validate_repo_id(repo_id)
    check_composed_directory(directory)
    listing = upload_files(directory)
    files = tuple((rel, size) for rel, _, size in listing)
    message = commit_message or default_commit_message(directory)
    result = PushResult(repo_id=repo_id, revision=revision, files=files, commit_message=message,
                        private=private, dry_run=dry_run)
    if dry_run:
        print("Dry run: nothing will be uploaded.", file=out)
        print(format_plan(repo_id, files, message, private=private, revision=revision), file=out)
        return result

    try:
        token = token or get_token()
    except Exception as e:  # get_token raises when an explicitly requested OIDC exchange fails
        raise HubError(f"{repo_id}: could not get a Hugging Face token ({type(e).__name__}); {LOGIN_HINT}") from None
    if not token:
        raise HubError(f"{repo_id}: no Hugging Face token found (HF_TOKEN or a cached login); {LOGIN_HINT}")
    if is_offline():
        raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub (offline: HF_HUB_OFFLINE=1); "
                       "nothing was uploaded")

    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path, _ in listing]
    api = _api(token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        print(f"Uploading {len(files)} files ({human_size(result.total_bytes)}) to {HUB_URL}/{repo_id} ...", file=out)
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision,
                                 repo_type="model")
    except _UNREACHABLE as e:
        raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub ({_unreachable_reason(e)}); "
                       "nothing was uploaded") from None
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise HubError(f"{repo_id}: the Hub refused the token (HTTP {status}): it is invalid or cannot write to "
                           f"this repo ({LOGIN_HINT})") from None
        raise HubError(f"{repo_id}: the Hugging Face Hub answered HTTP {status}: {_first_line(e, token)}") from None
    result = dataclasses.replace(result, commit_url=info.commit_url, commit_sha=info.oid)
    print(f"Committed {info.oid[:12] if info.oid else ''} to {HUB_URL}/{repo_id}: {info.commit_url}", file=out)
    return result

