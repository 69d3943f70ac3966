"""The README.md model card of a composed checkpoint: a YAML header the Hub reads, and a body for people.

`library_name: transformers`: the files are Hugging Face's format (a `speech-encoder-decoder` config.json with
safetensors / Flax msgpack weights) and load in transformers' `SpeechEncoderDecoderModel` as well as in our
Flax class. The Hub keys its "Use this model" snippet, download counting and inference widget on
`library_name`, and knows nothing of this toolkit's name, so `transformers` is the value that makes the repo
work on the Hub; the toolkit is named in the tags and in the body instead.

`base_model` lists the sources that are Hub repo ids (a local path is not a valid value; the body names it).
`base_model_relation` is left unset: none of the Hub's values (adapter, merge, quantized, finetune) describes
a composition of two different models, and the Hub infers one itself when it is absent.

`license` is set when both sources declare the same one; when they declare different ones it is `other`
and the body names both; when either is undeclared it is left out (the Hub then shows none) and the body
says which source declares what.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from convert.base.errors import ConvertError
from convert.base.hub import HUB_URL, LIBRARY_NAME, ResolvedSource

PIPELINE_TAG = "automatic-speech-recognition"
BASE_TAGS = ("speech-encoder-decoder", "automatic-speech-recognition", "jax", "flax")
_FORMAT_LABELS = {"safetensors": "safetensors", "pytorch": "PyTorch .bin", "flax": "Flax msgpack"}
_LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")

# How to load the model with our Flax class; {ref} is the repo id or the directory.
FLAX_USAGE = """\
from flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel

model = FlaxSpeechEncoderDecoderModel.from_pretrained("{ref}")"""


@dataclasses.dataclass(frozen=True)
class CardSource:
    """One source of the composed model, as the card names it.

    Attributes:
        source: the repo id or local path the user gave.
        repo_id: the Hub repo id, or None for a local directory.
        revision: the commit sha it resolved to, when known.
        license: the license its own card declares (`license:` in its README.md header), or None.
        model_type: its config's model_type ("wav2vec2", "bart", "mbart", "gpt2"), when known.
        builtin: the source is one of the tiny random checkpoints shipped with the toolkit.
    """

    source: str
    repo_id: str | None = None
    revision: str | None = None
    license: str | None = None
    model_type: str | None = None
    builtin: bool = False

    @classmethod
    def from_resolved(cls, resolved: ResolvedSource, model_type: str | None = None) -> CardSource:
        """Builds the card's view of a `resolve_source` result, reading the license from its README.md.

        Args:
            resolved: the resolved source.
            model_type: its model_type, when the caller knows it.

        Returns:
            The source with its repo id, commit and declared license.
        """
        return cls(source=resolved.source, repo_id=resolved.repo_id, revision=resolved.revision,
                   license=read_license(resolved.path), model_type=model_type)

    @property
    def name(self) -> str:
        return self.repo_id or self.source


@dataclasses.dataclass(frozen=True)
class CardInfo:
    """Everything the model card of a composed checkpoint states.

    Attributes:
        encoder: the speech encoder's source.
        decoder: the text decoder's source.
        initialised: Flax path prefixes (or key groups) of the parameters in neither source, initialised anew
            (cross-attention, `enc_to_dec_proj`).
        seed: the PRNG seed of that initialisation.
        init_std: the initialiser scale (standard deviation of the normal initialiser), when known.
        dtype: the dtype the weights were saved in.
        params_loaded: number of parameters (scalars) taken from the sources.
        params_initialised: number of parameters initialised anew.
        params_dropped: number of source parameters left out (e.g. BART's encoder, a CTC head).
        dropped: what was dropped and why, one entry per group (optional).
        parity: figures from the parity check, name -> value (e.g. {"max_abs_logits_diff_flax_vs_torch": 3e-7}),
            or None when not verified.
        command: the command that produced the directory (e.g. `shlex.join(sys.argv)`).
        repo_id: where the model is published, for the title and the loading snippets; None for a directory.
        formats: the weight formats saved ("safetensors", "flax").
        transformers_problem: why transformers' `SpeechEncoderDecoderModel` cannot load the files, or None
            when it can.
        ctc_head: what the CTC head is (hybrid CTC/attention), or None when the model has none.
    """

    encoder: CardSource
    decoder: CardSource
    initialised: tuple[str, ...] = ()
    seed: int | None = None
    init_std: float | None = None
    dtype: str = "float32"
    params_loaded: int = 0
    params_initialised: int = 0
    params_dropped: int = 0
    dropped: tuple[str, ...] = ()
    parity: Mapping[str, float] | None = None
    command: str | None = None
    repo_id: str | None = None
    formats: tuple[str, ...] = ("safetensors",)
    transformers_problem: str | None = None
    ctc_head: str | None = None


def card_info_from_report(report: Mapping[str, Any], *, repo_id: str | None = None,
                          directory: str | Path | None = None) -> CardInfo:
    """The card's facts from `convert.compose`'s report (the dict it writes to `compose_report.json`).

    Initialised leaves are grouped into module prefixes with layer numbers as `*`
    (`decoder/transformer/h/*/crossattention/c_attn`); dropped tensors are grouped by the reason given.
    A source's license is the report's, else the one its own README.md declares.

    Args:
        report: the compose report.
        repo_id: where the model will be published (for the title and loading snippets), when known.
        directory: the output directory, to name the weight formats actually written; without it they come
            from the report's `files`, else compose's default (Flax msgpack and safetensors).

    Returns:
        The card's facts.
    """
    sources = {}
    for part in ("encoder", "decoder"):
        src = report[part]
        license_ = src.get("license") or (read_license(src["path"]) if src.get("path") else None)
        sources[part] = CardSource(source=str(src["source"]), repo_id=src.get("repo_id"),
                                   revision=src.get("revision"), license=license_, model_type=src.get("model_type"),
                                   builtin=bool(src.get("builtin")))
    dropped = []
    for part in ("encoder", "decoder"):
        reasons: dict[str, int] = {}
        for _key, why in report[part].get("dropped", ()):
            reasons[why] = reasons.get(why, 0) + 1
        dropped.extend(f"{part}: {n} tensor{'s' * (n != 1)}: {why}" for why, n in reasons.items())
    verification = report.get("verification")
    parity = None
    if verification and "flax_error" in verification:
        parity = {"max |Δlogits| Flax vs float64 reference": float(verification["flax_error"]),
                  "max |Δlogits| float32 reference vs float64 reference": float(verification["reference_error"]),
                  "largest Flax error accepted": float(verification["bound"]),
                  "max |Δlogits| Flax vs float32 reference": float(verification["max_abs_logits_diff"])}
    elif verification:  # a report written before the float64 judgement
        parity = {"max_abs_logits_diff_flax_vs_torch": float(verification["max_abs_logits_diff"]),
                  "tolerance": float(verification["tolerance"])}
    transformers = report.get("transformers") or {}
    transformers_problem = transformers.get("reason") if transformers.get("loads") is False else None
    if directory is not None:
        names = [p.name for p in Path(directory).iterdir()]
    else:
        names = list(report.get("files") or ("model.safetensors", "flax_model.msgpack"))
    formats = tuple(fmt for fmt, stem in (("safetensors", ".safetensors"), ("pytorch", ".bin"), ("flax", ".msgpack"))
                    if any(n.endswith(stem) or n.endswith(stem + ".index.json") for n in names))
    init = report.get("init") or {}
    params = report.get("parameters") or {}
    return CardInfo(
        encoder=sources["encoder"],
        decoder=sources["decoder"],
        initialised=group_paths(report.get("initialised", ())),
        seed=init.get("seed"),
        init_std=init.get("std"),
        dtype=report.get("dtype", "float32"),
        params_loaded=int(params.get("loaded", 0)),
        params_initialised=int(params.get("initialised", 0)),
        params_dropped=int(params.get("dropped", 0)),
        dropped=tuple(dropped),
        parity=parity,
        command=report.get("command"),
        repo_id=repo_id,
        formats=formats or ("safetensors",),
        transformers_problem=transformers_problem,
        ctc_head=(report.get("ctc") or {}).get("note") if (report.get("ctc") or {}).get("head") else None,
    )


def group_paths(paths: Sequence[str]) -> tuple[str, ...]:
    """Flax leaf paths -> their modules, layer numbers as `*`, in first-seen order.

    `decoder/transformer/h/3/crossattention/q_attn/kernel` -> `decoder/transformer/h/*/crossattention/q_attn`.
    """
    groups = (re.sub(r"/\d+(?=/|$)", "/*", path).rsplit("/", 1)[0] if "/" in path else path for path in paths)
    return tuple(dict.fromkeys(groups))


def combined_license(encoder: str | None, decoder: str | None) -> str | None:
    """The card's `license`: the shared one, `other` when they differ, None when either is undeclared."""
    if encoder is None or decoder is None:
        return None
    if encoder == decoder and _LICENSE_ID.fullmatch(encoder):
        return encoder
    return "other"


def card_metadata(info: CardInfo) -> dict[str, Any]:
    """The YAML header of the card, as a dict (see the module docstring for the choices)."""
    tags = list(dict.fromkeys([*BASE_TAGS, *(s.model_type for s in (info.encoder, info.decoder) if s.model_type),
                               LIBRARY_NAME]))
    meta: dict[str, Any] = {"library_name": "transformers"}
    license_ = combined_license(info.encoder.license, info.decoder.license)
    if license_ is not None:
        meta["license"] = license_
    meta["pipeline_tag"] = PIPELINE_TAG
    meta["tags"] = tags
    base_models = [s.repo_id for s in (info.encoder, info.decoder) if s.repo_id is not None]
    if base_models:
        meta["base_model"] = list(dict.fromkeys(base_models))
    return meta


def render_model_card(info: CardInfo) -> str:
    """The README.md of a composed checkpoint: a YAML header (yaml.safe_dump) and a Markdown body.

    The body states the sources (with revision, model type, license), what was initialised with which seed
    and initialiser scale, the parameter counts, the saved dtype, the parity figures, how to load the model
    (our Flax code and transformers' `SpeechEncoderDecoderModel`) and the command that produced it.

    Args:
        info: what to state.

    Returns:
        The card's text, ending with a newline.
    """
    header = yaml.safe_dump(card_metadata(info), sort_keys=False, allow_unicode=True, default_flow_style=False)
    enc, dec = info.encoder, info.decoder
    ref = info.repo_id or "path/to/this/directory"
    if info.repo_id:
        title = info.repo_id.split("/")[-1]
    else:
        title = f"{enc.model_type or 'speech encoder'} + {dec.model_type or 'text decoder'}: a speech encoder-decoder"
    out = [f"---\n{header}---\n", f"# {title}\n"]
    out.append(
        f"A speech encoder-decoder composed with [{LIBRARY_NAME}](#how-it-was-made) from the speech encoder "
        f"{_md_name(enc)} and the text decoder {_md_name(dec)}. "
        + ("The parameters listed under *Initialised* are new and untrained: fine-tune the model (on paired speech "
           "and text) before using it for speech recognition.\n" if info.initialised or info.params_initialised
           else "Every parameter comes from a source.\n")
    )
    if info.transformers_problem:
        out.append("transformers cannot load this model (see [How to load](#how-to-load)); this toolkit can.\n")

    out.append("## Sources\n")
    out.append("| part | source | revision | model type | license |\n| --- | --- | --- | --- | --- |")
    for part, s in (("encoder", enc), ("decoder", dec)):
        out.append(f"| {part} | {_md_source(s)} | {_md_revision(s)} | {s.model_type or 'unknown'} | "
                   f"{_cell(s.license) if s.license else 'not declared'} |")
    out.append("")
    license_ = combined_license(enc.license, dec.license)
    if license_ == "other":
        out.append(f"The sources declare different licenses (encoder: {enc.license}, decoder: {dec.license}); "
                   "the composed weights are subject to both.\n")
    elif license_ is None:
        missing = [part for part, s in (("encoder", enc), ("decoder", dec)) if s.license is None]
        out.append(f"No license is set: the {' and '.join(missing)} source{'s' * (len(missing) > 1)} "
                   f"declare{'s' * (len(missing) == 1)} none. Check the sources' terms before redistributing.\n")

    out.append("## Initialised\n")
    if info.initialised:
        how = f"seed {info.seed}" if info.seed is not None else "an unrecorded seed"
        scale = f", initialiser scale (std) {info.init_std:g}" if info.init_std is not None else ""
        out.append(f"In neither source, initialised with {how}{scale}:\n")
        out.extend(f"- `{prefix}`" for prefix in info.initialised)
        out.append("")
    else:
        out.append("Nothing: every parameter was loaded from a source.\n")

    out.append("## Parameters\n")
    out.append("| loaded | initialised | dropped from the sources |\n| ---: | ---: | ---: |")
    out.append(f"| {info.params_loaded:,} | {info.params_initialised:,} | {info.params_dropped:,} |\n")
    if info.dropped:
        out.append("Dropped:\n")
        out.extend(f"- {item}" for item in info.dropped)
        out.append("")
    formats = ", ".join(_FORMAT_LABELS.get(f, f) for f in info.formats)
    out.append(f"Weights saved as `{info.dtype}` ({formats}).\n")

    if info.ctc_head:
        out.append("## CTC head\n")
        out.append(f"{info.ctc_head[0].upper()}{info.ctc_head[1:]}: `ctc_head.weight` / `ctc_head.bias` "
                   "(Flax `ctc_head/kernel` / `bias`) over the encoder output, its settings in `config.json`'s "
                   "`ctc` section, for hybrid CTC/attention training and decoding with this toolkit. transformers' "
                   "`SpeechEncoderDecoderModel` has no CTC head: it loads the model without it (reporting the two "
                   "tensors as unexpected) and ignores the `ctc` section.\n")

    out.append("## Parity\n")
    if info.parity:
        out.append("| figure | value |\n| --- | ---: |")
        out.extend(f"| {_cell(name)} | {value:.2e} |" for name, value in info.parity.items())
        out.append("")
    else:
        out.append("Not verified: the composed model was not compared against the PyTorch reference.\n")

    out.append("## How to load\n")
    out.append(f"With this toolkit (JAX/Flax; a repo id downloads into the Hugging Face cache):\n\n"
               f"```python\n{FLAX_USAGE.format(ref=ref)}\n```\n")
    if info.transformers_problem:
        out.append(f"**transformers cannot load this model**: {info.transformers_problem}. This toolkit's Flax "
                   "model and its PyTorch reference (`torch_reference.speech_encoder_decoder`) load and run it.\n")
    else:
        if any(f in info.formats for f in ("safetensors", "pytorch")):
            torch_load = f'model = SpeechEncoderDecoderModel.from_pretrained("{ref}")'
            note = ""
        else:
            torch_load = f'model = SpeechEncoderDecoderModel.from_pretrained("{ref}", from_flax=True)'
            note = " (Flax weights only: needs transformers 4.x, which still reads them)"
        out.append(f"With transformers (PyTorch){note}:\n\n"
                   f"```python\nfrom transformers import SpeechEncoderDecoderModel\n\n{torch_load}\n```\n")

    out.append("## How it was made\n")
    command = info.command or shlex.join(["python", "-m", "convert.compose", "--encoder", enc.source,
                                          "--decoder", dec.source, "--output", "OUTPUT"])
    out.append(f"With {LIBRARY_NAME}:\n\n```bash\n{command}\n```")
    return "\n".join(out) + "\n"


def parse_model_card(text: str) -> tuple[dict[str, Any], str]:
    """Splits a model card into its YAML header (parsed) and its Markdown body.

    Args:
        text: the README.md text.

    Returns:
        (metadata, body): the header as a dict ({} when the card has none) and the text after it.

    Raises:
        ConvertError: the header is not closed, not valid YAML, or not a mapping.
    """
    text = text.removeprefix("\ufeff")
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return {}, text
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
    if end is None:
        raise ConvertError("model card: the YAML header opened by '---' is never closed")
    try:
        metadata = yaml.safe_load("".join(lines[1:end]))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise ConvertError(f"model card: the YAML header is not valid YAML"
                           f"{f' (line {where.line + 2})' if where else ''}") from None
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise ConvertError(f"model card: the YAML header is a {type(metadata).__name__}, not a mapping")
    return metadata, "".join(lines[end + 1:])


def read_license(directory: str | Path) -> str | None:
    """The `license` a checkpoint's README.md declares; None when there is no card, no license or a bad header.

    `license: other` with a `license_name` gives "other (NAME)", so that two different "other" licenses differ.
    """
    readme = Path(directory) / "README.md"
    try:
        metadata, _ = parse_model_card(readme.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ConvertError):
        # A source's card is informational: an unreadable one must not stop a composition.
        return None
    value = metadata.get("license")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        return None
    if value == "other" and isinstance(metadata.get("license_name"), str):
        return f"other ({metadata['license_name']})"
    return value.strip()


_SOURCE_ROW = re.compile(r"^\| (encoder|decoder) \| (?:\[([^\]]+)\]\([^)]*\)|local directory `((?:[^`\\]|\\.)*)`) \|",
                         re.M)


def card_sources(text: str) -> tuple[str, str] | None:
    """(encoder, decoder) as named by a card: our Sources table, else a two-entry `base_model`; else None."""
    metadata, body = parse_model_card(text)
    rows = {part: (hub or local.replace("\\|", "|")) for part, hub, local in _SOURCE_ROW.findall(body)}
    if "encoder" in rows and "decoder" in rows:
        return rows["encoder"], rows["decoder"]
    base = metadata.get("base_model")
    if isinstance(base, list) and len(base) == 2 and all(isinstance(b, str) for b in base):
        return base[0], base[1]
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _md_name(s: CardSource) -> str:
    if s.builtin:
        return f"`{s.source}` (the toolkit's built-in tiny random checkpoint)"
    return f"[{s.repo_id}]({HUB_URL}/{s.repo_id})" if s.repo_id else f"`{s.source}` (a local directory)"


def _md_source(s: CardSource) -> str:
    if s.builtin:
        return f"built-in `{_cell(s.source)}` (tiny, random)"
    return f"[{s.repo_id}]({HUB_URL}/{s.repo_id})" if s.repo_id else f"local directory `{_cell(s.source)}`"


def _md_revision(s: CardSource) -> str:
    if s.revision is None:
        return "—"
    if s.repo_id:
        return f"[`{s.revision}`]({HUB_URL}/{s.repo_id}/tree/{s.revision})"
    return f"`{s.revision}`"
