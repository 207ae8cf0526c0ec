"""Edit an image with S2Edit + SPL (SPEC §1, §3–§6, §9).

    python infer.py ckpt=outputs/demo/export target="a photo of a [I] woman with bangs"   # fine-tuned [I]
    python infer.py ckpt=… target="a photo of a [I] woman with [A] makeup"               # compositional
    python infer.py model=tiny image=examples/chelsea.png source="a photo of a cat" \\
        target="a photo of a tiger" target="a photo of a lion"                          # training-free
    python infer.py ... method=virtual            # virtual inversion (SPEC §9): no inversion, 15 steps
    python infer.py ... method=p2p inversion=direct   # inversion + Prompt-to-Prompt, Direct Inversion

`method=auto` (default) edits training-free with the virtual-inversion method and an S2Edit checkpoint
with inversion + Prompt-to-Prompt (the paper's editor); a setting of one method (e.g. `inversion=direct`,
`virtual.steps=4`) picks that method, and a setting of a method the edit does not use is refused. Writes
into `out=` (default outputs/edit): one `edit_<k>.png` per target, `source.png` (the preprocessed input),
`reconstruction.png` (the source branch), `masks/` and `attention/` PNGs and `report.json` (images an
earlier run into the same `out` wrote and this one does not are removed). Inversions are cached in
`<ckpt>/cache/` (training-free: `<out>/cache/`) and reused by later edits of the same image and prompt.
`out` never holds the input image (nor a symlink or hard link to it) where a run writes, and never lies in
the checkpoint folder; one run at a time writes it (`<out>/.output.lock` names the run, a second one is
refused). A full disk or a read-only folder stops the run with one line naming the file, and no file is
left half-written. `python infer.py --help` lists every key.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from editkit.config import explicit_keys, parse_config, run_main
from editkit.errors import InputError
from editkit.files import (
    PICKLE_SUFFIXES,
    OutputLock,
    file_sha256,
    io_errors,
    refuse_overwriting_inputs,
    remove_temporaries,
    resolved,
    slug,
)
from editkit.images import read_image
from s2edit.editing.config import InferConfig
from s2edit.editing.request import EditRequest, choose_method

REPORT = "report.json"


@dataclasses.dataclass
class Inputs:
    """What the checks resolved: the image and source prompt (maybe from the checkpoint), outputs, plan."""

    image: Path
    source: str
    out: Path
    manifest: Any | None
    plan: Any


def output_names(n_targets: int) -> list[str]:
    """The fixed image files of a run (masks/ and attention/ are folders of their own)."""
    return ["source.png", "reconstruction.png", *(f"edit_{k}.png" for k in range(n_targets)), REPORT]


def check_inputs(cfg: InferConfig, given: Iterable[str] | None = None) -> Inputs:
    """Refuse bad inputs in one line before any model is loaded (STYLE habit 5); returns the edit plan
    made with the offline CLIP tokenizer (+ the checkpoint's tokens). `given`: the keys the user set (a
    command line's); None: those that differ from the defaults (see `s2edit.editing.request`)."""
    if not cfg.target:
        raise InputError('no target prompt: pass target="…" (repeat target=… for several edits)')
    manifest = None
    if cfg.ckpt is not None:
        from s2edit.training.export import read_manifest

        ckpt = Path(cfg.ckpt)
        if ckpt.is_file() and ckpt.suffix.lower() in PICKLE_SUFFIXES:
            raise InputError(
                f"checkpoint '{ckpt}' is a pickle file: only export folders of safetensors weights "
                "are loaded (pickles can run code); pass the export folder written by train.py"
            )
        manifest = read_manifest(ckpt)
        if not manifest.tokens:
            raise InputError(f"checkpoint '{ckpt}' has no learned token: re-export it with train.py")
    image = cfg.image or (manifest.tokens[0].image if manifest is not None else None)
    source = cfg.source or (manifest.tokens[0].prompt if manifest is not None else None)
    if image is None:
        raise InputError("no image: pass image=path/to/photo.png (or ckpt= to edit the training image)")
    if source is None:
        raise InputError('no source prompt: pass source="a photo of a cat" describing the image')
    read_image(image)  # exists, decodes, is large enough
    if cfg.lora is not None:
        from s2edit.core.lora import check_lora_file

        check_lora_file(Path(cfg.lora).expanduser())
    if manifest is not None:
        from s2edit.training.export import base_lora_file

        base_lora_file(Path(cfg.ckpt), manifest, cfg.lora)  # the export's base LoRA is where it says
    out = check_output(cfg, image)
    method = choose_method(cfg, given, default=cfg.default_method)
    if cfg.ckpt is None:
        from s2edit.core.detect import family_name, method_refusal

        family = family_name(cfg.model)
        refusal = method_refusal(method, family, cfg.model) if family is not None else None
        if refusal is not None:  # before minutes of loading
            raise InputError(refusal)
    if cfg.offload:
        check_offload(cfg.ckpt or cfg.model, cfg.device, checkpoint=cfg.ckpt is not None)
    return Inputs(Path(image), source, out, manifest, edit_plan(cfg, source, manifest, method))


def check_offload(model: str, device: str, checkpoint: bool = False) -> None:
    """Refuse `offload=true` where it cannot work (a UNet model or checkpoint, or no GPU) in one line."""
    from s2edit.core.detect import family_name, offload_refusal
    from s2edit.core.runtime import resolve_device

    family = "sd1" if checkpoint else family_name(model)  # exports are UNet models
    refusal = offload_refusal(model, family, str(resolve_device(device)))
    if refusal is not None:
        raise InputError(refusal)


def check_output(cfg: InferConfig, image: str | Path) -> Path:
    """`out` is a folder (made if missing) that holds no input: the run never writes over the image (also
    through a symlink or a hard link), nor into the checkpoint folder, which a re-export replaces."""
    out = Path(cfg.out)
    refuse_overwriting_inputs("out", out, {"image": image}, files=[out])
    if out.exists() and not out.is_dir():
        raise InputError(f"out='{out}' is a file: pass a folder")
    files = [out / name for name in output_names(len(cfg.target))]
    refuse_overwriting_inputs("out", out, {"image": image}, files=files,
                              folders=[out / "masks", out / "attention"])
    if cfg.ckpt is not None and resolved(out, "out").is_relative_to(resolved(cfg.ckpt, "ckpt")):
        raise InputError(f"out='{out}' lies in the checkpoint folder ckpt='{cfg.ckpt}', which train.py "
                         "replaces as a whole: choose another out=")
    return out


def edit_plan(cfg: InferConfig, source: str, manifest: Any | None, method: str) -> Any:
    """The edit plan (prompts, words, schedules checked once) with the offline CLIP tokenizer."""
    from s2edit.core.tokenizer import clip_tokenizer
    from s2edit.editing.plan import Placeholder, plan_edit

    tokenizer = clip_tokenizer()
    tokens = manifest.tokens if manifest is not None else []
    tokenizer.add_tokens([token.placeholder for token in tokens])
    placeholders = [Placeholder(token.placeholder, None, token.prompt) for token in tokens]
    return plan_edit(tokenizer, placeholders, source, cfg.target, EditRequest.of(cfg), method=method)


def write_outputs(out: Path, result: Any) -> dict[str, Any]:
    """Every image of the run, each written atomically; returns {kind: relative path(s)}."""
    from editkit.images import save_image, save_mask

    files: dict[str, Any] = {
        "source": "source.png",
        "reconstruction": "reconstruction.png",
        "edits": [],
        "masks": {},
        "attention": {},
    }
    save_image(result.source, out / files["source"])
    save_image(result.reconstruction, out / files["reconstruction"])
    for k in range(result.images.shape[0]):
        name = f"edit_{k}.png"
        save_image(result.images[k], out / name)
        files["edits"].append(name)
    for name, mask in result.output_masks().items():
        files["masks"][name] = f"masks/{name}.png"
        save_mask(mask, out / files["masks"][name])
    for folder, maps in result.attention_images().items():
        for word, attention in maps.items():
            path = f"attention/{folder}/{slug(word)}.png"
            files["attention"].setdefault(folder, {})[word] = path
            save_mask(attention, out / path)
    return files


def listed_files(files: Any) -> set[str]:
    """The relative paths in a report's "files" entry (nested lists and dicts of paths)."""
    if isinstance(files, str):
        return {files}
    values = files.values() if isinstance(files, dict) else files if isinstance(files, list) else []
    return set().union(*(listed_files(v) for v in values))


def previous_outputs(out: Path) -> set[str]:
    """Files the last run into `out` wrote, from its report (empty if there is none or it is unreadable)."""
    try:
        return listed_files(json.loads((out / REPORT).read_text()).get("files", {}))
    except (OSError, ValueError, AttributeError):
        return set()


def remove_stale(out: Path, previous: set[str], current: set[str], keep: Path) -> list[str]:
    """Delete what the previous run wrote and this one did not (edit_4.png of a 5-target run, masks of
    words no longer asked for), so `out` never mixes two runs: only PNG files inside `out`, never `keep`
    (the input image); folders left empty go too."""
    removed = []
    root, keep = out.resolve(), keep.resolve()
    for name in sorted(previous - current):
        path = (out / name).resolve()
        if path.is_relative_to(root) and path != keep and path.suffix == ".png" and path.is_file():
            path.unlink()
            removed.append(name)
            for folder in path.parents:
                if folder == root or any(folder.iterdir()):
                    break
                folder.rmdir()
    return removed


def load_editor(cfg: InferConfig, inputs: Inputs) -> Any:
    """The editor of a run: the checkpoint's, or the base model's (its inversion cache in `<out>/cache`)."""
    from s2edit.editing.editor import Editor

    if cfg.ckpt is not None:
        return Editor.from_export(cfg.ckpt, device=cfg.device, precision=cfg.precision, lora=cfg.lora)
    # a random preset's weights are always drawn from seed 0: `seed` is the edit's noise, not the model
    return Editor.from_model(
        cfg.model, device=cfg.device, precision=cfg.precision, cache_dir=inputs.out / "cache", lora=cfg.lora,
        offload=cfg.offload,
    )


def run(cfg: InferConfig, editor: Any | None = None, command: list[str] | None = None,
        given: Iterable[str] | None = None) -> dict[str, Any]:
    """One edit as infer.py does it: check, load (unless an `editor` of the same model is given, as the
    web app does), edit (p2p: invert first, cached), write every output and `report.json` into `cfg.out`.
    Returns the report. `given`: the keys the user set (see :func:`check_inputs`). One run at a time per
    `out` (a second one is refused, naming the first); a full disk or a read-only `out` is one
    ReportedError line naming the file, with no partial file left."""
    start = time.perf_counter()

    # 1. Check inputs and plan the edit (no model yet)
    inputs = check_inputs(cfg, given)

    # 2.–4. under the lock of `out`, with what a killed run left there removed
    with OutputLock(inputs.out, " ".join(command or ["infer.py"])), io_errors(inputs.out):
        attention = inputs.out / "attention"  # not the inversion cache: it cleans up itself
        remove_temporaries(inputs.out, inputs.out / "masks", attention, *sorted(attention.glob("*/")))
        return edit_and_write(cfg, inputs, editor, command, start)


def edit_and_write(
    cfg: InferConfig, inputs: Inputs, editor: Any | None, command: list[str] | None, start: float
) -> dict[str, Any]:
    """The body of :func:`run` once the inputs are checked and `out` is locked."""
    # 2. Model (heavy imports here, so that refused inputs fail fast)
    import diffusers
    import torch
    import transformers

    from editkit.files import atomic_path
    from s2edit.core.runtime import retain_freed_memory

    retain_freed_memory()  # CPU runs: no page faults on every pass's activations (s2edit/core/runtime.py)
    torch.manual_seed(cfg.seed)
    load_start = time.perf_counter()
    editor = editor if editor is not None else load_editor(cfg, inputs)
    # resolution=None: the checkpoint's training size, else the model's native size (as train.py)
    image = editor.load_image(inputs.image, cfg.resolution)
    load_seconds = time.perf_counter() - load_start

    # 3. Edit (p2p: the inversion first, cached)
    result = editor.run(image, inputs.source, inputs.plan, seed=cfg.seed)
    if result.inversion is not None:
        how = "cache hit" if result.inversion["cached"] else "computed"
        print(f"inversion ({result.inversion['method']}): {how} in {result.inversion_seconds:.1f} s",
              file=sys.stderr)

    # 4. Outputs, each written atomically; the report last
    write_start = time.perf_counter()
    previous = previous_outputs(inputs.out)
    files = write_outputs(inputs.out, result)
    stale = remove_stale(inputs.out, previous, listed_files(files), inputs.image)
    edit = result.to_report()
    for k, target in enumerate(edit["metrics"]["targets"]):
        target["file"] = files["edits"][k]
    timings = {
        "load": load_seconds,
        "inversion": result.inversion_seconds,
        "edit": edit.pop("timings"),
        "write": time.perf_counter() - write_start,
    }
    report = {
        "command": command or ["infer.py"],
        "settings": dataclasses.asdict(cfg),
        "seed": cfg.seed,
        "model": {
            "ckpt": cfg.ckpt,
            "model": editor.model.source,
            "family": editor.model.name,
            "weights": editor.weights,
            "placeholders": [p.text for p in editor.placeholders],
            "device": str(editor.model.device),
            "offload": getattr(editor.model, "offload_device", None) is not None,
            "dtype": str(editor.model.dtype).removeprefix("torch."),
        },
        "image": {
            "path": str(inputs.image),
            "sha256": file_sha256(inputs.image),
            "working_size": [int(image.shape[-1]), int(image.shape[-2])],
        },
        **edit,
        "timings": timings,
        "files": files,
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
        "removed_stale_outputs": stale,
    }
    timings["total"] = time.perf_counter() - start
    with atomic_path(inputs.out / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def main(argv: list[str]) -> dict[str, Any]:
    cfg: InferConfig = parse_config(InferConfig, argv, prog="infer.py", description=__doc__.splitlines()[0])
    report = run(cfg, command=["infer.py", *argv], given=explicit_keys(InferConfig, argv))
    out, edits = Path(cfg.out), report["files"]["edits"]
    print(
        f"wrote {len(edits)} edit(s) ({report['method']}), masks, attention maps and {REPORT} to {out}/",
        file=sys.stderr,
    )
    for name, target in zip(edits, cfg.target):
        print(f"  {out / name}  ← '{target}'")
    return report


def cli() -> None:
    """The `infer.py` / `s2edit-infer` / `python -m s2edit.infer` command."""
    run_main(main)
