"""`python -m convert.push DIR OWNER/NAME`: upload a composed output directory to the Hugging Face Hub."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from convert.errors import ConvertError
from convert.hub import push_to_hub

DESCRIPTION = """\
Upload a composed speech encoder-decoder directory (the output of `python -m convert.compose`) to a model
repo on the Hugging Face Hub, in one commit. The repo is created when missing. Every file of the directory
is sent, except hidden ones (names starting with ".").

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
  python -m convert.push out/w2v2-bart me/w2v2-bart --dry-run
  python -m convert.push out/w2v2-bart me/w2v2-bart --private --commit-message "First composition"
  python -m convert.push out/w2v2-bart me/w2v2-bart --revision experiments"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convert.push", description=DESCRIPTION, epilog=EPILOG,
                                     allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    try:
        push_to_hub(args.directory, args.repo_id, private=args.private, commit_message=args.commit_message,
                    revision=args.revision, dry_run=args.dry_run)
    except ConvertError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
