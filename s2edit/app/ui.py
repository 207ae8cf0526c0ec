"""The web app (Gradio 6): edit images with S2Edit + SPL in a browser. `python app.py` launches it.

Two tabs (laid out in :mod:`s2edit.app.layout`):

- **Edit**: every control of the SPL demo (gongms00/SPL `app.py`) with its defaults and ranges, plus the
  editing method, Prompt-to-Prompt mode, reweight and blend words, each bound to a field of the typed
  settings (:mod:`s2edit.app.binding`). Run does exactly what `infer.py` does
  (:func:`s2edit.editing.run.run` with the loaded editor) and shows the edit, a before/after comparison,
  the preservation mask, per-word attention maps, the reconstruction and its PSNR, SPL/CPL before and
  after, the timings, the `infer.py` command that reproduces the edit and a download of the same
  `report.json`. A user's mistake (a mask word not in the prompt, a prompt over 77 tokens, an unreadable
  image) is the engine's one-line message, shown in the page; inversions are cached, so editing the same
  image and source prompt again skips it.
- **Identity (S2Edit)**: fine-tune `[I]` (optionally an attribute `[A]` from a reference image) on one
  uploaded image with Lightning in this process (:func:`s2edit.training.run.fit`), a progress bar
  showing steps and loss; when done, this session's edits use the export (:meth:`Editor.from_export`).

Concurrency: Gradio's queue runs up to `concurrency` edits at once, in worker threads. They share one
loaded :class:`Editor` per model, whose lock serialises model runs; every run builds its own plan,
controllers, schedules, attention store and output folder, and each session's identity export lives in
its own `gr.State`. Nothing mutable is shared between requests.
"""

from __future__ import annotations

import dataclasses
import functools
import secrets
import shlex
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import lightning as L

from editkit.config import check_fields, check_value
from editkit.errors import InputError, ReportedError
from editkit.files import slug
from s2edit.app.binding import EditForm, cli_arguments, field_of, infer_config
from s2edit.app.layout import (
    MAX_SEED,
    SHAPES_EXAMPLES,
    SHAPES_IDENTITY_EXAMPLES,
    SHAPES_PRESET,
    edit_tab,
    identity_tab,
)
from s2edit.core.flow_family import FlowFamily
from s2edit.core.settings import DEFAULT_MODEL
from s2edit.editing import run as editing
from s2edit.editing.config import InferConfig
from s2edit.editing.editor import Editor
from s2edit.editing.flowedit import FAMILY_DEFAULTS
from s2edit.training import run as training
from s2edit.training.config import TrainConfig
from s2edit.training.export import read_manifest

WHEN = ("before", "after")
CSS = """
.gradio-container {max-width: 1280px !important; margin: auto !important}
#edit-result img, #input-image img {object-fit: contain}
"""


@dataclass(frozen=True)
class AppSettings:
    """What `python app.py` was started with."""

    model: str = DEFAULT_MODEL  # base model: hub id, diffusers folder, or a random preset
    lora: str | None = None  # a LoRA file fused into the base model's UNet (e.g. LCM-LoRA)
    ckpt: str | None = None  # an export of train.py to edit with by default (else the base model)
    workdir: Path = Path("outputs/app")  # edits/, identities/ and the base model's inversion cache/
    resolution: int | None = None  # working size (None: the model's native size, an export's own)
    device: str = "auto"
    precision: str = "auto"
    offload: bool = False  # flow models: model CPU offload (each component on the GPU only while it runs)
    concurrency: int = 2  # edits run at once (their model runs take turns on the editor's lock)
    keep_edits: int = 100  # output folders of the most recent edits kept in workdir/edits
    keep_identities: int = 2  # fine-tuned editors kept loaded besides the default one


# ----------------------------------------------------------------------------------------- editors


class Editors:
    """The loaded editors: the app's default (base model, or --ckpt) and recent identity exports.

    One Editor serves every thread (its lock serialises model runs); loading is serialised here.
    """

    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._exports: OrderedDict[str, Editor] = OrderedDict()
        self.default = self._load(settings.ckpt)

    def _load(self, export: str | None) -> Editor:
        s = self.settings
        if export is not None:
            return Editor.from_export(export, device=s.device, precision=s.precision)
        return Editor.from_model(s.model, device=s.device, precision=s.precision,
                                 cache_dir=s.workdir / "cache", resolution=s.resolution, lora=s.lora,
                                 offload=s.offload)

    def get(self, export: str | None) -> Editor:
        """The editor of an identity export (loaded once, most recent kept), or the default one."""
        if export is None or export == self.settings.ckpt:
            return self.default
        with self._lock:
            if export not in self._exports:
                self._exports[export] = self._load(export)
                while len(self._exports) > self.settings.keep_identities:
                    self._exports.popitem(last=False)  # a run still using it keeps its own reference
            self._exports.move_to_end(export)
            return self._exports[export]


# ----------------------------------------------------------------------------------------- training


class TrainingProgress(L.Callback):
    """Feeds each fine-tuning step (step, total, loss) to `report` (a gr.Progress) and keeps every step's
    logged loss terms."""

    def __init__(self, report: Callable[[int, int, float], None]) -> None:
        self.report = report
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any, **kwargs: Any) -> None:
        terms = {
            name.removeprefix("train/"): float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("train/") and name != "train/lr"
        }
        self.history.append({"step": trainer.global_step, **terms})
        self.report(trainer.global_step, trainer.max_steps, terms.get("loss", float("nan")))


def fine_tune(config: TrainConfig, pairs: list[Any], callbacks: Sequence[L.Callback],
              devices: list[int] | int = 1) -> Path:
    """train.py's fine-tuning in this process, with the app's callbacks (progress), TensorBoard logs and
    no resumable checkpoint or progress bar; returns the export folder (<out>/export)."""
    module, data = training.fit(config, pairs, out=config.out, resumable=False, callbacks=callbacks,
                                progress=False, devices=devices)
    return module.export(config.out, data.prepared)


# ----------------------------------------------------------------------------------------- the app


def one_line_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A user's mistake (ReportedError) becomes its one-line message in the page, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ReportedError as err:
            raise gr.Error(str(err), duration=None, print_exception=False) from None

    return wrapper


def _uploaded_names(message: str, *paths: str | None) -> str:
    """Messages name an upload by its file name, not by the server's temporary copy."""
    for path in paths:
        if path:
            message = message.replace(str(path), Path(path).name)
    return message


def _new_folder(parent: Path, label: str) -> Path:
    folder = parent / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug(label)[:40]}-{uuid.uuid4().hex[:6]}"
    folder.mkdir(parents=True)
    return folder


def _prune(parent: Path, keep: int) -> None:
    """Remove all but the `keep` most recent run folders of `parent` (their names start with the time)."""
    folders = sorted(p for p in parent.iterdir() if p.is_dir())
    for folder in folders[: max(0, len(folders) - keep)]:
        shutil.rmtree(folder, ignore_errors=True)


def _timings_rows(timings: dict[str, Any], prefix: str = "") -> list[list[Any]]:
    rows = []
    for name, value in timings.items():
        if isinstance(value, dict):
            rows += _timings_rows(value, f"{prefix}{name}.")
        else:
            rows.append([f"{prefix}{name}", round(float(value), 3)])
    return rows


class EditingApp:
    """The Gradio app around one loaded editor per model (see the module docstring)."""

    def __init__(self, settings: AppSettings) -> None:
        check_value("resolution", settings.resolution, field_of(InferConfig, "resolution").metadata)
        for name in ("concurrency", "keep_edits", "keep_identities"):
            if getattr(settings, name) < 1:
                raise InputError(f"{name}={getattr(settings, name)} must be at least 1")
        self.settings = settings
        settings.workdir.mkdir(parents=True, exist_ok=True)
        self.editors = Editors(settings)  # load the model now: a bad --model fails at start, in one line
        model = self.editors.default.model
        # a flow model (SD3, FLUX) edits with FlowEdit, its family's paper settings as the controls' defaults
        self.flow_defaults = FAMILY_DEFAULTS.get(model.name) if isinstance(model, FlowFamily) else None
        if settings.ckpt is not None:
            manifest = read_manifest(settings.ckpt)
            self.training_model, self.training_lora = manifest.base_model, manifest.base_lora
        else:
            self.training_model, self.training_lora = settings.model, settings.lora
        self.blocks = self._build()

    # ------------------------------------------------------------------------------------ handlers

    def _describe(self, export: str | None) -> str:
        if export is None and self.settings.ckpt is None:
            model = self.editors.default.model
            how = "FlowEdit, training-free" if self.flow_defaults is not None else "training-free"
            return f"Edits use the base model **{self.settings.model}** ({model.label}; {how})."
        export = export or self.settings.ckpt
        manifest = read_manifest(export)
        tokens = ", ".join(f"`{t.placeholder}` ({t.prompt!r})" for t in manifest.tokens)
        return f"Edits use the identity export `{export}`: {tokens}."

    def edit(self, identity: str | None, progress: gr.Progress = gr.Progress(track_tqdm=True),  # noqa: B008
             **values: Any) -> tuple[Any, ...]:
        """Run one edit exactly as infer.py does; returns the outputs of the Edit tab."""
        form = EditForm(**values)
        if form.image is None:
            raise InputError("no image: upload the image to edit")
        seed = secrets.randbelow(MAX_SEED + 1) if form.random_seed else int(form.seed or 0)
        progress(0, desc="checking the inputs")
        folder = _new_folder(self.settings.workdir / "edits", form.target or "edit")
        try:
            cfg = infer_config(form, model=self.settings.model, ckpt=identity or self.settings.ckpt,
                               out=folder, seed=seed, resolution=self.settings.resolution,
                               lora=self.settings.lora,
                               device=self.settings.device,
                               precision=self.settings.precision, offload=self.settings.offload)
            arguments = cli_arguments(cfg)
            report = editing.run(cfg, self.editors.get(identity), command=["infer.py", *arguments])
        except ReportedError as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise ReportedError(_uploaded_names(str(err), form.image)) from None
        finally:
            _prune(self.settings.workdir / "edits", self.settings.keep_edits)
        return self._edit_outputs(folder, report, seed, arguments)

    def _edit_outputs(self, folder: Path, report: dict[str, Any], seed: int, arguments: list[str]
                      ) -> tuple[Any, ...]:
        files = report["files"]
        edit, source = folder / files["edits"][0], folder / files["source"]
        mask = files["masks"].get("mask_0")
        attention = [
            (str(folder / path), f"{'source' if row == 'source' else 'target'}: {word}")
            for row, maps in files["attention"].items()
            for word, path in maps.items()
        ]
        metrics = report["metrics"]
        losses = [
            [t["prompt"], *(t[f"{loss}_loss_{when}"] for loss in ("spl", "cpl") for when in WHEN)]
            for t in metrics["targets"]
        ]
        inversion = report["inversion"]
        how = "no inversion" if inversion is None else (
            f"{inversion['method']} inversion {'from the cache' if inversion['cached'] else 'computed'}")
        summary = (
            f"**{report['method']}** edit in {report['timings']['total']:.1f} s · seed **{seed}** · {how} · "
            f"{report['image']['working_size'][0]}×{report['image']['working_size'][1]} px\n\n"
            f"Reproduce: `{shlex.join(['python', 'infer.py', *arguments])}`"
        )
        return (
            str(edit),
            (str(source), str(edit)),
            str(folder / mask) if mask else None,
            attention,
            str(folder / files["reconstruction"]),
            metrics["reconstruction_psnr"],
            losses,
            _timings_rows(report["timings"]),
            str(folder / editing.REPORT),
            seed,
            summary,
        )

    def train_identity(
        self,
        identity: str | None,
        image: str | None,
        prompt: str,
        object_word: str,
        steps: float,
        seed: float,
        finetune_method: str,
        reference: str | None = None,
        reference_prompt: str = "",
        reference_object: str = "",
        progress: gr.Progress = gr.Progress(),  # noqa: B008
    ) -> tuple[Any, ...]:
        """Fine-tune [I] (and [A]) on the uploaded image(s); this session's edits then use the export."""
        if image is None:
            raise InputError("no image: upload the image whose subject becomes [I]")
        progress(0, desc="checking the inputs")
        folder = _new_folder(self.settings.workdir / "identities", prompt or "identity")
        try:
            config = TrainConfig(
                model=self.training_model,
                lora=self.training_lora,
                image=image,
                prompt=(prompt or "").strip(),
                object=(object_word or "").strip(),
                reference=reference,
                reference_prompt=(reference_prompt or "").strip() or None,
                reference_object=(reference_object or "").strip() or None,
                resolution=self.settings.resolution,
                out=str(folder),
                max_steps=int(steps),
                seed=int(seed),
                accelerator=_accelerator(self.settings.device),
                finetune=dataclasses.replace(TrainConfig().finetune, method=finetune_method),
            )
            check_fields(config)
            training.check_inputs(config)
        except ReportedError as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise ReportedError(_uploaded_names(str(err), image, reference)) from None
        # the images go beside the export (its manifest names them; Gradio's uploads are temporary)
        copies = {name: str(shutil.copy(path, folder / f"{name}{Path(path).suffix or '.png'}"))
                  for name, path in (("image", image), ("reference", reference)) if path}
        config = dataclasses.replace(config, **copies)
        pairs = training.training_pairs(config)

        def report(step: int, total: int, loss: float) -> None:
            progress((step, total), desc=f"fine-tuning: step {step}/{total}, loss {loss:.4f}", unit="steps")

        progress(0, desc=f"loading {config.model} and reading the object mask")
        callback = TrainingProgress(report)
        export = fine_tune(config, pairs, [callback], _devices(self.settings.device))
        progress(1, desc="loading the fine-tuned model")
        self.editors.get(str(export))  # load it now, inside the progress bar
        terms = sorted({k for row in callback.history for k in row} - {"step"}, key=lambda k: k != "loss")
        history = [[row["step"], *(row.get(k) for k in terms)] for row in callback.history]
        final = callback.history[-1]["loss"] if callback.history else float("nan")
        status = (
            f"Fine-tuned `{', '.join(p.placeholder for p in pairs)}` for {config.max_steps} steps "
            f"(final loss {final:.4f}) → `{export}`. {self._describe(str(export))} The Edit tab now holds "
            f"the training image and prompt: change the target prompt, keeping `[I]`."
        )
        mask_files = sorted(str(p) for p in Path(export).glob("mask_*.png"))
        return (
            str(export),
            status,
            mask_files,
            {"headers": ["step", *terms], "data": history},
            self._describe(str(export)),
            config.image,
            config.prompt,
            config.prompt,
            InferConfig().inversion,  # an identity edits with inversion + P2P, as infer.py's method=auto
        )

    def use_default_model(self, identity: str | None) -> tuple[Any, ...]:
        return None, self._describe(None), "This session's edits use the default model again."

    # ------------------------------------------------------------------------------------ layout

    def _build(self) -> gr.Blocks:
        method = InferConfig().inversion if self.settings.ckpt is not None else "virtual"  # as method=auto
        if self.flow_defaults is not None:
            method = "flowedit"
        cache = (3600, 24 * 3600)  # every hour, delete Gradio's copies of files older than a day
        with gr.Blocks(title="S2Edit + SPL", delete_cache=cache, analytics_enabled=False) as blocks:
            identity = gr.State(None)  # this session's identity export (None: the default model)
            gr.Markdown(
                "# S2Edit + SPL: precise, structure-preserving text-guided image editing\n"
                "Upload an image, describe it (source prompt) and the edit (target prompt), click **Run**. "
                "**Preserve structure (SPL)** and **Preserve color (CPL)** keep the edit on the input's "
                "edges and colours; **Identity** fine-tunes `[I]` on your image first (S2Edit)."
            )
            model_line = gr.Markdown(self._describe(None), elem_id="model-line")
            with gr.Tabs():
                with gr.Tab("Edit", id="edit"):
                    shapes = self.settings.model == SHAPES_PRESET and self.settings.ckpt is None
                    edit_controls, edit_outputs, run = edit_tab(
                        method, self.flow_defaults, SHAPES_EXAMPLES if shapes else None)
                    self.edit_controls = edit_controls
                # fine-tuning [I] needs a UNet family: flow models have no Identity tab
                with gr.Tab("Identity (S2Edit)", id="identity", visible=self.flow_defaults is None):
                    train_controls, train_outputs, fit, forget = identity_tab(
                        SHAPES_IDENTITY_EXAMPLES if shapes else None)

            run.click(
                one_line_errors(self.edit), inputs_kwargs={"identity": identity, **edit_controls},
                outputs=edit_outputs, api_name="edit", concurrency_limit=self.settings.concurrency,
                concurrency_id="edit",
            )
            fit.click(
                one_line_errors(self.train_identity), inputs_kwargs={"identity": identity, **train_controls},
                outputs=[identity, *train_outputs, model_line,
                         *(edit_controls[name] for name in ("image", "source", "target", "method"))],
                api_name="train", concurrency_limit=1, concurrency_id="train",
            )
            forget.click(self.use_default_model, inputs=[identity],
                         outputs=[identity, model_line, train_outputs[0]], api_name="use_default_model")
        return blocks

    # ------------------------------------------------------------------------------------ launch

    def launch(self, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
               block: bool = True) -> tuple[Any, str, str]:
        """Serve the app (Gradio 6: theme and css go to launch); `block=False` returns at once (tests)."""
        self.blocks.queue(default_concurrency_limit=1)
        return self.blocks.launch(
            server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
            theme=gr.themes.Default(), css=CSS, allowed_paths=[str(self.settings.workdir.resolve())],
            show_error=False, quiet=not block,
        )


def _accelerator(device: str) -> str:
    """Lightning's accelerator for a torch device name."""
    return "auto" if device == "auto" else "cpu" if device == "cpu" else "gpu"


def _devices(device: str) -> list[int] | int:
    """Lightning's devices for a torch device name: cuda:1 → [1], anything else one device."""
    kind, _, index = device.partition(":")
    return [int(index)] if kind == "cuda" and index.isdigit() else 1


