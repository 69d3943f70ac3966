"""What a fine-tuning run writes into its output: the model in its stored dtype (or a PEFT adapter beside the base
weights), the copied tokenizer and preprocessor files, `training_report.json`, `train_log.jsonl`, the loss curve
and the model card. The functions' `run` is a `convert.finetune_run.Run` (not imported: that module reads
REPORT_FILE from this one)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from convert.base.errors import ConvertError
from convert.finetune_settings import PRODUCT_FORMS

ADAPTER_DIR = "adapter"  # where --lora-export adapter puts the PEFT adapter, inside the output
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "sentencepiece.bpe.model", "preprocessor_config.json", "generation_config.json",
                "ctc_vocab.json")
REPORT_FILE = "training_report.json"
LOG_FILE = "train_log.jsonl"
CURVE_FILE = "loss_curve.png"


def run_report(run: Any, history: dict[str, Any], model_dir: Path, train: Any, eval_manifest: Any,
            command: str | None, wall: float) -> dict[str, Any]:
    s = run.settings
    losses = [loss for _, loss in history["loss"]]
    return {
        "base_model": str(model_dir),
        "prefix": run.prefix,
        "train_manifest": str(train),
        "eval_manifest": str(eval_manifest),
        "train_examples": len(run.train),
        "train_audio_hours": round(sum(run.train_lengths) / run.features.sampling_rate / 3600, 4),
        "eval_examples": len(run.eval),
        "settings": dataclasses.asdict(s),
        "bfloat16_products": None if run.products is None else run.products.form,
        "mesh": None if run.mesh is None else {str(k): int(v) for k, v in run.mesh.shape.items()},
        "steps": run.total_steps,
        "optimizer": dataclasses.asdict(run.optimizer_settings),
        "padded_audio_lengths": list(run.boundaries),
        "label_length": run.label_length,
        "unknown_words": _unknown_words(run.tokenizer.unknown),
        "first_loss": losses[0] if losses else None,
        "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "eval": [{k: v for k, v in e.items() if k != "examples"} for e in history["eval"]],
        "final_examples": history["eval"][-1].get("examples", []),
        "audio_seconds_per_second": round(history["audio_seconds"] / max(history["train_seconds"], 1e-9), 2),
        "train_seconds": round(history["train_seconds"], 1),
        "wall_seconds": round(wall, 1),
        "command": command,
        "train_only": list(s.train_only) if s.train_only else None,
        "lora": None if run.lora is None else {**dataclasses.asdict(run.lora), "layers": len(run.lora_layers),
                                               "export": s.lora_export},
    }


def _unknown_words(unknown: dict[str, Any]) -> dict[str, Any]:
    """How many training transcripts held words the tokenizer does not know (trained as its unknown token with
    allow_unk=True), and the most frequent such words."""
    words = sorted(unknown["words"].items(), key=lambda item: (-item[1], item[0]))
    return {"utterances": unknown["utterances"], "tokens": unknown["tokens"], "distinct_words": len(words),
            "most_frequent": [{"word": w, "utterances": n} for w, n in words[:20]]}


def training_memory(state: Any, frozen: Callable[[str], bool]) -> dict[str, int]:
    """Parameter counts and the bytes training holds besides the model: the gradients (of the trainable leaves
    only) and the optimiser state (AdamW's two moments of each trainable leaf)."""
    import jax
    from flax import traverse_util

    flat = traverse_util.flatten_dict(state.params, sep="/")
    trainable = [v for k, v in flat.items() if not frozen(k)]
    return {
        "parameters": int(sum(v.size for v in flat.values())),
        "trainable_parameters": int(sum(v.size for v in trainable)),
        "parameter_bytes": int(sum(v.nbytes for v in flat.values())),
        "gradient_bytes": int(sum(v.nbytes for v in trainable)),
        "optimizer_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state))),
    }


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def export_leaves(run: Any, params: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the model's leaves to write, the LoRA factors to write as a PEFT adapter) by `/`-joined Flax path. Without
    LoRA: the params and nothing; with `lora_export="merged"` the adapted kernels plus the LoRA update and
    nothing; with `"adapter"` the base leaves as they are and the factors."""
    from flax import traverse_util

    from convert.base.lora import merge_lora, split_lora
    from convert.base.stacking import unstack_params

    flat = traverse_util.flatten_dict(params, sep="/")
    if run.settings.scan_layers:  # HF's per-layer layout; on one device each layer's leaf is a view of the host copy
        flat = unstack_params(flat if run.mesh is not None else {k: np.asarray(v) for k, v in flat.items()},
                              run.stacks)
    if run.lora is None:
        return run.as_stored(flat), {}
    if run.settings.lora_export == "merged":
        return run.as_stored(merge_lora(flat, run.lora_layers, run.lora.scaling)), {}
    base, factors = split_lora(flat)
    return run.as_stored(base), factors


def write_output(tmp: Path, run: Any, flat: dict[str, Any], factors: dict[str, Any], history: dict[str, Any],
                  report: dict[str, Any]) -> None:
    from convert.base.params import save_params
    from convert.base.writing import TensorSpec
    from flax_model.sharding import gathered_leaves

    if factors:
        _write_adapter(tmp / ADAPTER_DIR, run, dict(gathered_leaves(factors, sorted(factors))))
    if run.prefix:  # each part in its own directory, with its own files; the projector beside them
        from convert.base.prefix_io import save_prefix_params

        save_prefix_params(tmp, run.config, dict(gathered_leaves(flat, sorted(flat))))
        for part in ("encoder", "decoder"):
            for name in COPIED_FILES:
                if (run.model_dir / part / name).is_file():
                    shutil.copyfile(run.model_dir / part / name, tmp / part / name)
    else:  # leaf by leaf: a sharded state is gathered one leaf at a time, never whole on the host
        order = sorted(flat)
        specs = [TensorSpec(k, np.dtype(flat[k].dtype), tuple(flat[k].shape)) for k in order]
        save_params(tmp, run.config, lambda: gathered_leaves(flat, order), specs=specs)
        for name in COPIED_FILES:
            if (run.model_dir / name).is_file():
                shutil.copyfile(run.model_dir / name, tmp / name)
    if not run.prefix and not (tmp / "generation_config.json").is_file():
        c = run.config
        generation = {"decoder_start_token_id": c.decoder_start_token_id, "eos_token_id": c.eos_token_id,
                      "pad_token_id": c.pad_token_id, "max_length": c.decoder.max_positions}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    with (tmp / LOG_FILE).open("w") as f:
        for step, loss in history["loss"]:
            f.write(json.dumps({"step": step, "loss": loss}) + "\n")
        for e in history["eval"]:
            f.write(json.dumps({"step": e["step"], "wer": e["wer"], "cer": e["cer"]}) + "\n")
    plot_loss_curve(history, tmp / CURVE_FILE)
    (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "README.md").write_text(render_card(run.model_dir, report))


def _write_adapter(directory: Path, run: Any, factors: dict[str, np.ndarray]) -> None:
    """The LoRA factors as a PEFT adapter: of the composed model (`SpeechEncoderDecoderModel`'s module names) in
    the cross-attention mode; of each adapted part on its own (`adapter/decoder`: the LM's `...ForCausalLM` names,
    `adapter/encoder`) in the prefix mode, whose parts are models of their own."""
    from convert.base.composed import keymap_for, stores_in_out
    from convert.base.lora import linear_modules, write_part_adapters, write_peft_adapter

    candidates = linear_modules(keymap_for(run.config), run.param_shapes(), stores_in_out(run.config))
    if run.prefix:
        write_part_adapters(directory, run.lora, run.lora_layers, factors, candidates)
    else:
        directory.mkdir()
        write_peft_adapter(directory, run.lora, run.lora_layers, factors, candidates)


def plot_loss_curve(history: dict[str, Any], path: Path) -> None:
    """Training loss per step, and the held-out WER at each evaluation (matplotlib, PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = [s for s, _ in history["loss"]]
    ax.plot(steps, [v for _, v in history["loss"]], lw=0.8, color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy)")
    if history["eval"]:
        wer = ax.twinx()
        wer.plot([e["step"] for e in history["eval"]], [100 * e["wer"] for e in history["eval"]], "o-",
                 color="tab:red", label="held-out WER")
        wer.set_ylabel("WER (%)")
        wer.legend(loc="upper right")
    ax.legend(loc="upper center")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_card(model_dir: Path, report: dict[str, Any]) -> str:
    """The fine-tuned model's card: the composed model's metadata (when it has a compose report) and the run."""
    import yaml

    meta: dict[str, Any] = {"library_name": "transformers", "pipeline_tag": "automatic-speech-recognition",
                            "tags": ["speech-encoder-decoder", "automatic-speech-recognition", "jax", "flax",
                                     "fine-tuned"]}
    compose_report = model_dir / "compose_report.json"
    if compose_report.is_file():
        try:
            from convert.model_card import card_info_from_report, card_metadata

            base = card_metadata(card_info_from_report(json.loads(compose_report.read_text())))
            meta = {**base, "tags": list(dict.fromkeys([*base.get("tags", []), "fine-tuned"]))}
        except (ValueError, KeyError, TypeError, ConvertError):
            pass  # an old or foreign report: the card goes without the sources' metadata
    s, first, last = report["settings"], report["eval"][0], report["eval"][-1]
    rows = [("base model", f"`{report['base_model']}`"),
            ("training data", (f"`{report['train_manifest']}`: {report['train_examples']} utterances, "
                               f"{report['train_audio_hours'] * 60:.1f} min")),
            ("held-out data", f"`{report['eval_manifest']}`: {report['eval_examples']} utterances"),
            ("steps", f"{report['steps']} (batch {s['batch_size']} x {s['grad_accum']} accumulated)"),
            ("optimiser", (f"AdamW, peak lr {s['learning_rate']:g}"
                           + (f" (encoder {s['encoder_learning_rate']:g})" if s.get("encoder_learning_rate") else "")
                           + f", warmup {s['warmup_steps']}, linear decay, "
                           f"weight decay {s['weight_decay']:g}, clip {s['max_grad_norm']:g}")),
            ("label smoothing", f"{s['label_smoothing']:g}"),
            *([("hybrid CTC/attention", f"loss {s['ctc_weight']:g} CTC + {1 - s['ctc_weight']:g} cross-entropy"
                + (f"; evaluated with joint decoding, CTC weight {s['eval_ctc_weight']:g}"
                   if s.get("eval_ctc_weight") is not None else ""))] if s.get("ctc_weight") else []),
            ("compute dtype", s["dtype"] + (" (float32 master weights)" if s["dtype"] != "float32" else "")
             + (f"; products: {PRODUCT_FORMS[report['bfloat16_products']]}"
                if report.get("bfloat16_products") in PRODUCT_FORMS else "")),
            ("train mode", ("dropout and LayerDrop" if s["dropout"] else "deterministic")
             + (", SpecAugment" if s["spec_augment"] and s["dropout"] else "")
             + (", frozen feature encoder" if s["freeze_feature_encoder"] else "")
             + (", frozen encoder" if s.get("freeze_encoder") else "")
             + (", rematerialised layers" if s["remat"] else "")
             + (", scanned layers" if s.get("scan_layers") else "")),
            ("loss", f"{report['first_loss']:.3f} -> {report['final_loss']:.3f}"),
            ("held-out WER", f"{100 * first['wer']:.1f}% -> {100 * last['wer']:.1f}%"),
            ("held-out CER", f"{100 * first['cer']:.1f}% -> {100 * last['cer']:.1f}%"),
            ("time", f"{report['wall_seconds']:.0f} s wall, {report['audio_seconds_per_second']} audio-s/s")]
    layout = ("each part in its own transformers format (the encoder in `encoder/`, the decoder-only LM in "
              "`decoder/`), the projector in `projector.safetensors`" if report.get("prefix") else
              "transformers' format (`SpeechEncoderDecoderModel`) and this toolkit's Flax layout")
    body = ["# Fine-tuned speech " + ("encoder + projector + LM (prefix composition)" if report.get("prefix")
                                      else "encoder-decoder") + "\n",
            f"Fine-tuned with `convert.finetune` (JAX/Flax) from the composed model below; the weights are in "
            f"{layout}.\n",
            "## Training run\n", "| | |\n| --- | --- |", *[f"| {k} | {v} |" for k, v in rows], "",
            f"![loss curve]({CURVE_FILE})\n", "## How to load\n", *_loading(report),
            "## How it was made\n",
            f"```bash\n{report['command'] or 'python -m convert.finetune ...'}\n```\n"]
    header = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    return f"---\n{header}---\n\n" + "\n".join(body)


def _loading(report: dict[str, Any]) -> list[str]:
    """The card's "How to load": the classes of the composition's kind, and with a LoRA adapter (written beside
    the base weights) how PEFT applies it; the held-out figures above are the adapted model's."""
    lora = report.get("lora") or {}
    adapter = lora.get("export") == "adapter"
    if report.get("prefix"):
        flax = ("```python\nfrom flax_model.prefix import FlaxSpeechPrefixModel\n\n"
                'model = FlaxSpeechPrefixModel.from_pretrained("path/to/this/directory")\n```\n')
        torch = ("```python\nfrom transformers import AutoModel, AutoModelForCausalLM\n\n"
                 'encoder = AutoModel.from_pretrained("path/to/this/directory/encoder")\n'
                 'llm = AutoModelForCausalLM.from_pretrained("path/to/this/directory/decoder")\n'
                 '# projector weights: safetensors.torch.load_file("path/to/this/directory/projector.safetensors")\n'
                 + ("from peft import PeftModel\n\n"
                    f'llm = PeftModel.from_pretrained(llm, "path/to/this/directory/{ADAPTER_DIR}/decoder")\n'
                    if adapter else "") + "```\n")
    else:
        flax = ("```python\nfrom flax_model.speech_encoder_decoder import FlaxSpeechEncoderDecoderModel\n\n"
                'model = FlaxSpeechEncoderDecoderModel.from_pretrained("path/to/this/directory")\n```\n')
        torch = ("```python\nfrom transformers import SpeechEncoderDecoderModel\n\n"
                 'model = SpeechEncoderDecoderModel.from_pretrained("path/to/this/directory")\n'
                 + ("from peft import PeftModel\n\n"
                    f'model = PeftModel.from_pretrained(model, "path/to/this/directory/{ADAPTER_DIR}")\n'
                    if adapter else "") + "```\n")
    if not adapter:
        return [flax, torch]
    return [f"The weights in this directory are the base model's; the LoRA factors trained in this run are a PEFT "
            f"adapter in `{ADAPTER_DIR}/` (rank {lora['rank']}, alpha {lora['alpha']:g}), and the held-out figures "
            "above are those of the base model with the adapter applied. With transformers and PEFT:\n", torch,
            "This toolkit's Flax model loads the base weights alone (the adapter is not applied): for a model with "
            "the adapter folded into its weights, fine-tune with `--lora-export merged`.\n", flax]
