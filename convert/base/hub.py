"""The Hugging Face Hub, read side: resolving sources and models (with the offline cache). Pushing is in
`convert.push`, above the models.

Pulling. `resolve_source` takes a local directory as it is, or a Hub repo id, which it resolves to one commit
and downloads into the standard cache (`HF_HOME` / `HF_HUB_CACHE`) with `snapshot_download`, limited to the
config, tokenizer and card files and to weights in ONE format (safetensors, else PyTorch `.bin`, else Flax
msgpack). The format is chosen from the repo's file list, so other formats are never downloaded. Offline
(`HF_HUB_OFFLINE=1`, or the Hub cannot be reached) the same choice is made from what the cache holds.

"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from importlib import metadata as importlib_metadata
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, snapshot_download, try_to_load_from_cache
from huggingface_hub import errors as hf_errors

from convert.base import checkpoint as ckpt
from convert.base.errors import HubError

HUB_URL = "https://huggingface.co"
LIBRARY_NAME = "speech-encdec-flax"
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


# What git refuses anywhere in a ref name (`git check-ref-format`): space, ~ ^ : ? * [ and backslash; plus control
# characters, checked apart.
_REF_FORBIDDEN = " ~^:?*[\\"


def branch_name_problem(name: str) -> str | None:
    """Why git would refuse `name` as a branch (`git check-ref-format --branch`'s rules), or None if it accepts it.

    No `..`, `@{`, `//`, control character or any of ` ~^:?*[\\`; not `@` alone; no leading `-` or `/`, no trailing
    `/` or `.`; no component starting with `.` or ending with `.lock`.
    """
    if not name:
        return "is empty"
    if name == "@":
        return "is '@' alone"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds a control character"
    bad = [c for c in dict.fromkeys(name) if c in _REF_FORBIDDEN]
    if bad:
        return f"holds {', '.join(repr(c) for c in bad)}"
    for sequence in ("..", "@{", "//"):
        if sequence in name:
            return f"holds {sequence!r}"
    if name[0] in "-/":
        return f"starts with {name[0]!r}"
    if name[-1] in "/.":
        return f"ends with {name[-1]!r}"
    for component in name.split("/"):
        if component.startswith("."):
            return f"has a part starting with '.' ({component!r})"
        if component.endswith(".lock"):
            return f"has a part ending with '.lock' ({component!r})"
    return None


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
