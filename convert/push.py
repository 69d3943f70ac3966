"""Uploading a composed directory to the Hugging Face Hub: `push_to_hub`, and the command

    python -m convert.push DIR OWNER/NAME [--private] [--commit-message MSG] [--revision BRANCH] [--dry-run]

`push_to_hub` uploads every file of a composed directory in one commit (`create_repo` with `exist_ok=True`,
then `create_commit`). `dry_run=True` prints what would be sent and touches no network. The token comes from
`HF_TOKEN` or the cached login (`huggingface_hub.get_token`); it is passed to `HfApi` and never printed,
logged or written by us.
"""

from __future__ import annotations  # noqa: I001 - convert.cli is imported first, on purpose

from convert import cli  # first: run as `python -m`, a Ctrl-C during the imports below exits 130 too

import dataclasses
import json
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from huggingface_hub import CommitOperationAdd, get_token
from huggingface_hub import errors as hf_errors

from convert.base import checkpoint as ckpt
from convert.base import hub
from convert.base.checkpoint.safetensors_reader import SafetensorsFile
from convert.base.composed import COMPOSE_REPORT, COMPOSED_MODEL_TYPE
from convert.base.errors import CheckpointError, ConvertError, HubError, UsageError, bad_argument, with_param
from convert.base.hub import HUB_URL, LOGIN_HINT
from convert.base.prefix import PREFIX_MODEL_TYPE, PROJECTOR_FILE, part_directories, read_prefix_config
from convert.model_card import card_sources

DEFAULT_COMMIT_MESSAGE = "Upload composed speech encoder-decoder"


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
# Pushing


def check_composed_directory(directory: str | Path) -> dict:
    """Refuses anything but a complete composed output directory; returns its parsed config.json.

    A composed directory has a `config.json` with `model_type: speech-encoder-decoder` and weights: at least
    one of the weight files `Checkpoint` reads, every shard named by an index present, no empty weight file,
    safetensors headers that fit their files and msgpack files whose structure reads to their end (a truncated copy
    is refused). A prefix composition (`speech-prefix-lm`) has its parts' configs agreeing with the top one and such
    weights in each part's directory (`encoder/`, `decoder/`), and `projector.safetensors`.

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
    if config.get("model_type") == PREFIX_MODEL_TYPE:
        read_prefix_config(directory)  # the parts' config.json files agree with the copies in this one
        for part in part_directories(directory).values():
            _check_weights(part)
        projector = directory / PROJECTOR_FILE
        if not projector.is_file():
            raise CheckpointError(f"{directory}: no {PROJECTOR_FILE} (the prefix composition's projector)")
        if projector.stat().st_size == 0:
            raise CheckpointError(f"{projector}: empty weight file")
        SafetensorsFile(projector)  # its header fits the file
        return config
    if config.get("model_type") != COMPOSED_MODEL_TYPE:
        raise CheckpointError(f"{config_path}: model_type={config.get('model_type')!r} is not a composed speech "
                              f"encoder-decoder (expected {COMPOSED_MODEL_TYPE!r} or {PREFIX_MODEL_TYPE!r})")
    _check_weights(directory)
    return config


def _check_weights(directory: Path) -> None:
    """At least one weight file, every shard an index names present, none empty, safetensors headers that fit,
    msgpack files whose structure reads to their end."""
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
    if ckpt.FLAX_MSGPACK in present or ckpt.FLAX_MSGPACK_INDEX in present:
        # The msgpack structure walked whole, array data skipped: a truncated or corrupt file does not end there.
        ckpt.Checkpoint(directory, prefer=(ckpt.FLAX_MSGPACK, ckpt.FLAX_MSGPACK_INDEX))


def upload_files(directory: str | Path) -> list[tuple[str, Path, int]]:
    """(path in the repo, local path, size in bytes) of every file a push sends, sorted by path in the repo.

    Files and folders whose name starts with "." are left out: `.git`, `.gitattributes` (the Hub keeps its
    own), `.cache/huggingface` (a `snapshot_download(local_dir=...)` marker), editor and OS droppings. A symbolic
    link is sent as the file it points to only when that file lies inside the directory and is not hidden; the
    local path returned is then that file's. Nothing outside the directory is ever read.

    Raises:
        CheckpointError: naming the entry: a symbolic link that points out of the directory, to a hidden file, to a
            directory or to nothing, or an entry that is not a regular file (a pipe, a socket, a device).
    """
    directory = Path(directory)
    root = Path(os.path.realpath(directory))
    out = []
    for dirpath, dirnames, filenames in os.walk(directory):  # links to directories are listed, never entered
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in dirnames:
            if (here / name).is_symlink():
                raise CheckpointError(f"{here / name}: is a symbolic link to a directory ({os.readlink(here / name)});"
                                      " push sends files only: copy what it should hold into the directory")
        for name in filenames:
            if name.startswith("."):
                continue
            path = here / name
            local = _upload_source(path, root)
            out.append((path.relative_to(directory).as_posix(), local, local.stat().st_size))
    return sorted(out, key=lambda item: item[0])


def _upload_source(path: Path, root: Path) -> Path:
    """The regular file inside `root` that `path` is or links to; else a CheckpointError naming `path`."""
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        target = os.readlink(path)
        real = Path(os.path.realpath(path))
        if root not in real.parents:
            raise CheckpointError(f"{path}: is a symbolic link to {target}, outside {root}; push never sends a file "
                                  "from outside the directory (copy it in, or remove the link)")
        if any(part.startswith(".") for part in real.relative_to(root).parts):
            raise CheckpointError(f"{path}: is a symbolic link to the hidden file {real}, which push never sends")
        if not real.exists():
            raise CheckpointError(f"{path}: is a symbolic link to {target}, which does not exist")
        if not real.is_file():
            raise CheckpointError(f"{path}: is a symbolic link to {target}, which is not a regular file")
        return real
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: is not a regular file (a pipe, a socket or a device); push sends files only")
    return path


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
    directory = Path(directory)
    sources = None
    try:
        report = json.loads((directory / COMPOSE_REPORT).read_text(encoding="utf-8"))
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
    try:
        hub.validate_repo_id(repo_id)
    except ConvertError as e:
        raise UsageError(str(with_param(e, "repo_id", repo_id)), param="repo_id") from None
    for name, value in (("private", private), ("dry_run", dry_run)):
        if not isinstance(value, bool):
            raise bad_argument(name, value, "is not True or False")
    for name, value in (("commit_message", commit_message), ("revision", revision)):
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise bad_argument(name, repr(value), "is empty" if isinstance(value, str) else "is not a string")
    if revision is not None and (problem := hub.branch_name_problem(revision)) is not None:
        raise bad_argument("revision", repr(revision), f"is not a branch name git accepts (it {problem})")
    try:
        listing = upload_files(directory)  # first: a link out of the directory is refused before anything is read
        check_composed_directory(directory)
    except ConvertError as e:
        raise with_param(e, "directory", directory) from None
    cli.set_interrupt_note(f"nothing was uploaded to {repo_id}")
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
    if hub.is_offline():
        raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub (offline: HF_HUB_OFFLINE=1); "
                       "nothing was uploaded")

    operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path, _ in listing]
    api = hub._api(token)
    cli.set_interrupt_note(f"the upload to {repo_id} may or may not have completed (a commit is all or nothing)")
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        print(format_plan(repo_id, files, message, private=private, revision=revision), file=out)
        print(f"Uploading {len(files)} files ({human_size(result.total_bytes)}) to {HUB_URL}/{repo_id} ...", file=out)
        info = api.create_commit(repo_id, operations=operations, commit_message=message, revision=revision,
                                 repo_type="model")
    except hub._UNREACHABLE as e:
        raise HubError(f"{repo_id}: cannot reach the Hugging Face Hub ({hub._unreachable_reason(e)}); "
                       "nothing was uploaded") from None
    except hf_errors.HfHubHTTPError as e:
        status = e.response.status_code
        if status in (401, 403):
            raise HubError(f"{repo_id}: the Hub refused the token (HTTP {status}): it is invalid or cannot write to "
                           f"this repo ({LOGIN_HINT})") from None
        raise HubError(f"{repo_id}: the Hugging Face Hub answered HTTP {status}: {hub._first_line(e, token)}") from None
    result = dataclasses.replace(result, commit_url=info.commit_url, commit_sha=info.oid)
    print(f"Committed {info.oid[:12] if info.oid else ''} to {HUB_URL}/{repo_id}: {info.commit_url}", file=out)
    return result


# ----------------------------------------------------------------------------------------------------------
# CLI

DESCRIPTION = """\
Upload a composed speech encoder-decoder directory (the output of `python -m convert.compose`) to a model
repo on the Hugging Face Hub, in one commit. The repo is created when missing. Every file of the directory
is sent, except hidden ones (names starting with "."), and listed before the upload. A symbolic link is
sent as the file it points to only when that file lies inside the directory; a link out of it is refused.

The directory must hold a config.json with model_type "speech-encoder-decoder" and its weights; other,
empty or partial directories are refused."""

EPILOG = """\
authentication:
  The token is read from HF_TOKEN, else from the cached login (`hf auth login`). It is never printed.
  There is no --token flag, so that a token does not end up in shell history.

environment:
  HF_HUB_OFFLINE=1   refuse to contact the Hub (--dry-run still works)
  HF_ENDPOINT        another Hub endpoint

examples:
  python -m convert.push out/asr me/asr --dry-run
  python -m convert.push out/asr me/asr --private --commit-message "First composition"
  python -m convert.push out/asr me/asr --revision experiments

exit status:
  0 uploaded (or planned, with --dry-run), 1 error, 2 usage error, 130 interrupted"""


def build_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser(prog="python -m convert.push", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("directory", metavar="DIR", help="the composed output directory to upload")
    parser.add_argument("repo_id", metavar="OWNER/NAME", help="the target model repo on the Hub")
    parser.add_argument("--private", action="store_true",
                        help="create the repo as private (an existing repo keeps its visibility)")
    parser.add_argument("--commit-message", metavar="MSG",
                        help='the commit message (default: "Add speech encoder-decoder composed from ENC and DEC", '
                             "with the sources named by the directory's README.md)")
    parser.add_argument("--revision", metavar="BRANCH",
                        help="the branch to commit to, created from the default branch when missing "
                             "(default: the default branch)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the repo, each file with its size, the total and the commit message; "
                             "upload nothing and do not contact the Hub")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def work() -> None:
        push_to_hub(args.directory, args.repo_id, private=args.private, commit_message=args.commit_message,
                    revision=args.revision, dry_run=args.dry_run)

    return cli.run_command(work, parser)


if __name__ == "__main__":
    cli.run(main)
