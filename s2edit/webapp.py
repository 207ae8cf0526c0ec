"""The web app (Gradio 6): edit images with S2Edit + SPL in a browser. `python app.py` launches it.

Two tabs:

- **Edit**: every control of the SPL demo (gongms00/SPL `app.py`) with its defaults and ranges, plus the
  editing method, Prompt-to-Prompt mode, reweight and blend words. Each control is bound to a field of the
  engine's typed settings (:mod:`s2edit.settings`, :class:`s2edit.config.InferConfig`): its default,
  choices and help come from the field, and its range is the SPL app's, checked at start to lie inside
  the field's. Run does exactly what `infer.py` does (:func:`infer.run` with the loaded editor) and
  shows the edit, a before/after comparison, the preservation mask, per-word attention maps, the
  reconstruction and its PSNR, SPL/CPL before and after, the timings, the `infer.py` command that
  reproduces the edit and a download of the same `report.json`. A user's mistake (a mask word not in
  the prompt, a prompt over 77 tokens, an unreadable image) is the engine's one-line message, shown in
  the page; inversions are cached, so editing the same image and source prompt again skips it.
- **Identity (S2Edit)**: fine-tune `[I]` (optionally an attribute `[A]` from a reference image) on one
  uploaded image with Lightning in this process, a progress bar showing steps and loss; when done, this
  session's edits use the export (:meth:`Editor.from_export`).

Concurrency: Gradio's queue runs up to `concurrency` edits at once, in worker threads. They share one
loaded :class:`Editor` per model, whose lock serialises model runs; every run builds its own plan,
controllers, schedules, attention store and output folder (infer.run), and each session's identity
export lives in its own `gr.State`. Nothing mutable is shared between requests.

The app runs from the repository root, beside `train.py` and `infer.py`, whose checks and run it reuses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import secrets
import shlex
import shutil
import threading
import time
import typing
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import lightning as L

import infer
import train
from editkit.config import check_fields, check_value
from editkit.errors import InputError, ReportedError
from editkit.files import slug
from s2edit.config import FinetuneConfig, InferConfig, TrainConfig
from s2edit.editing import Editor
from s2edit.export import read_manifest
from s2edit.settings import DEFAULT_MODEL, MaskSettings, P2PSettings, SPLSettings, VirtualSettings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
MAX_SEED = 2**31 - 1  # the SPL app's random range; also exact in the browser's float64 numbers
REPORT = infer.REPORT

# Names of the inversions (InferConfig.inversion's choices) for people
INVERSION_LABELS = {"null_text": "Null-text", "direct": "Direct", "negative_prompt": "Negative-prompt",
                    "ddim": "Plain DDIM"}
WHEN = ("before", "after")
AREA_LABELS = {"whole": "Whole image", "masked": "Masked area"}

CSS = """
.gradio-container {max-width: 1280px !important; margin: auto !important}
#edit-result img, #input-image img {object-fit: contain}
"""


@dataclass(frozen=True)
class AppSettings:
    """What `python app.py` was started with."""

    model: str = DEFAULT_MODEL  # base model: hub id, diffusers folder, 'tiny', 'tiny-lcm', 'sd-v1-random'
    ckpt: str | None = None  # an export of train.py to edit with by default (else the base model)
    workdir: Path = Path("outputs/app")  # edits/, identities/ and the base model's inversion cache/
    resolution: int | None = None  # working size (None: the model's native size, an export's own)
    device: str = "auto"
    precision: str = "auto"
    concurrency: int = 2  # edits run at once (their model runs take turns on the editor's lock)
    keep_edits: int = 100  # output folders of the most recent edits kept in workdir/edits
    keep_identities: int = 2  # fine-tuned editors kept loaded besides the default one


# ----------------------------------------------------------------------------------------- binding


def _field(schema: type, name: str) -> dataclasses.Field:
    for field in dataclasses.fields(schema):
        if field.name == name:
            return field
    raise KeyError(f"{schema.__name__} has no field '{name}'")


def field_default(schema: type, name: str) -> Any:
    field = _field(schema, name)
    return field.default if field.default is not dataclasses.MISSING else field.default_factory()


def _checked(schema: type, name: str, values: Sequence[Any]) -> dataclasses.Field:
    """The field, after checking that every value the control can give is valid for it."""
    field = _field(schema, name)
    for value in values:
        check_value(f"{schema.__name__}.{name}", value, field.metadata)  # a UI range wider than the field's
    return field


def bound_slider(
    schema: type, name: str, label: str, minimum: float, maximum: float, step: float, **kwargs: Any
) -> gr.Slider:
    """A slider for `schema.name` over the SPL app's range (which must lie inside the field's)."""
    field = _checked(schema, name, (minimum, maximum))
    return gr.Slider(minimum, maximum, value=field_default(schema, name), step=step, label=label,
                     info=kwargs.pop("info", field.metadata["help"]), **kwargs)


def bound_number(schema: type, name: str, label: str, minimum: int, maximum: int, **kwargs: Any) -> gr.Number:
    field = _checked(schema, name, (minimum, maximum))
    return gr.Number(field_default(schema, name), label=label, minimum=minimum, maximum=maximum, precision=0,
                     info=kwargs.pop("info", field.metadata["help"]), **kwargs)


def bound_checkbox(schema: type, name: str, label: str, **kwargs: Any) -> gr.Checkbox:
    return gr.Checkbox(field_default(schema, name), label=label, **kwargs)


def bound_dropdown(schema: type, name: str, label: str, labels: dict[str, str], **kwargs: Any) -> gr.Dropdown:
    """A dropdown over the field's choices (`labels` names them for people)."""
    field = _field(schema, name)
    choices = [(labels.get(c, str(c)), c) for c in field.metadata["choices"]]
    return gr.Dropdown(choices, value=field_default(schema, name), label=label,
                       info=kwargs.pop("info", field.metadata["help"]), **kwargs)


# ----------------------------------------------------------------------------------------- the form


@dataclass
class EditForm:
    """The Edit tab's controls: the edit event's keyword inputs, and the HTTP API's parameter names."""

    image: str | None
    source: str
    target: str
    method: str  # "virtual" or an inversion of the p2p method (INVERSIONS)
    attention_schedule: float  # virtual: cross and self replace (the SPL app ties them); p2p: cross
    opt_schedule: float
    spl: bool
    spl_area: str
    cpl: bool
    cpl_area: str
    source_mask_words: str
    source_threshold: float
    source_invert: bool
    target_mask_words: str
    target_threshold: float
    target_invert: bool
    random_seed: bool
    seed: float
    steps: float
    structure_weight: float
    color_weight: float
    iterations: float
    postprocess: bool
    source_guidance: float
    target_guidance: float
    guidance: float
    p2p_mode: str
    self_attention_schedule: float
    reweight: str
    blend_source: str
    blend_target: str

    @property
    def inversion_based(self) -> bool:
        return self.method != "virtual"


def words(text: str | None) -> list[str]:
    """'cat, dog' or 'cat dog' → ['cat', 'dog'] (prompt words; a word is never split by the engine)."""
    return [w for w in re.split(r"[,\s]+", text or "") if w]


def word_factors(text: str | None) -> dict[str, float]:
    """'smiling: 2, tiger: 1.5' → {'smiling': 2.0, 'tiger': 1.5}; InputError for anything else."""
    factors: dict[str, float] = {}
    for item in (part.strip() for part in (text or "").split(",")):
        if not item:
            continue
        word, _, value = item.partition(":")
        try:
            factor = float(value)
        except ValueError:
            factor = None
        if not word.strip() or factor is None:
            raise InputError(f"reweight '{item}' must be word: factor pairs, e.g. 'smiling: 2, tiger: 1.5'")
        factors[word.strip()] = factor
    return factors


def infer_config(form: EditForm, *, model: str, ckpt: str | None, out: Path, seed: int,
                 resolution: int | None = None, device: str = "auto", precision: str = "auto") -> InferConfig:
    """The `infer.py` configuration of an edit of the form (the web app's edits ARE infer.py's).

    Only the chosen method's settings leave their defaults; mask words count only when a preservation
    area is `masked` (as in the SPL app, whose mask settings are hidden otherwise). Values are checked
    by the settings types: a refused one raises InputError naming its field.
    """
    masked = (form.spl and form.spl_area == "masked") or (form.cpl and form.cpl_area == "masked")
    blend_source, blend_target = words(form.blend_source), words(form.blend_target)
    p2p = P2PSettings(
        mode=form.p2p_mode, cross_replace=float(form.attention_schedule),
        self_replace=float(form.self_attention_schedule), reweight=word_factors(form.reweight),
        blend_words=list(dict.fromkeys(blend_source + blend_target)),
    ) if form.inversion_based else P2PSettings()
    virtual = VirtualSettings() if form.inversion_based else VirtualSettings(
        steps=int(form.steps), source_guidance=float(form.source_guidance),
        target_guidance=float(form.target_guidance), cross_replace=float(form.attention_schedule),
        self_replace=float(form.attention_schedule), blend_source=blend_source, blend_target=blend_target,
    )
    defaults = InferConfig()
    target = (form.target or "").strip()
    cfg = InferConfig(
        ckpt=ckpt,
        model=model if ckpt is None else defaults.model,  # an export names its own base model
        image=form.image,
        source=(form.source or "").strip() or None,
        target=[target] if target else [],
        out=str(out),
        resolution=None if ckpt is not None else resolution,  # an export edits at its training size
        seed=seed,
        method="p2p" if form.inversion_based else "virtual",
        steps=int(form.steps) if form.inversion_based else defaults.steps,
        guidance=float(form.guidance) if form.inversion_based else defaults.guidance,
        inversion=form.method if form.inversion_based else defaults.inversion,
        precision=precision,
        device=device,
        p2p=p2p,
        virtual=virtual,
        spl=SPLSettings(
            structure=bool(form.spl), color=bool(form.cpl), structure_weight=float(form.structure_weight),
            color_weight=float(form.color_weight), iterations=int(form.iterations),
            opt_schedule=float(form.opt_schedule), postprocess=bool(form.postprocess),
            structure_area=form.spl_area, color_area=form.cpl_area,
        ),
        mask=MaskSettings(
            source_words=words(form.source_mask_words) if masked else [],
            target_words=words(form.target_mask_words) if masked else [],
            source_threshold=float(form.source_threshold), target_threshold=float(form.target_threshold),
            source_invert=bool(form.source_invert), target_invert=bool(form.target_invert),
        ),
    )
    check_fields(cfg)
    return cfg


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)  # JSON is YAML: what infer.py's key=[…] / key={…} parse
    return str(value)


def cli_arguments(cfg: InferConfig) -> list[str]:
    """The `infer.py` key=value arguments that give `cfg` (keys left at their defaults omitted)."""
    arguments = []
    hints = typing.get_type_hints(InferConfig)
    for field in dataclasses.fields(InferConfig):
        value, default = getattr(cfg, field.name), getattr(InferConfig(), field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            arguments += [
                f"{field.name}.{sub.name}={_cli_value(getattr(value, sub.name))}"
                for sub in dataclasses.fields(value)
                if getattr(value, sub.name) != getattr(default, sub.name)
            ]
        elif field.metadata.get("text"):  # prompts: one key per prompt, literal text
            arguments += [f"{field.name}={item}" for item in value]
        elif value != default:
            arguments.append(f"{field.name}={_cli_value(value)}")
    return arguments


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
                                 cache_dir=s.workdir / "cache", resolution=s.resolution)

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
    """train.py's `fit` in this process, with the app's callbacks (progress) and without the resumable
    checkpoint or a progress bar; returns the export folder (<out>/export)."""
    return train.fit(config, pairs, callbacks=callbacks, resumable=False, progress_bar=False, devices=devices)


# ----------------------------------------------------------------------------------------- the app


def image_input(**kwargs: Any) -> gr.Image:
    """A gr.Image upload that reaches the engine as a file path even when it cannot be decoded, so that the
    engine's own check refuses it with the CLI's one-line message (Gradio's decoder would fail first,
    with a message of its own). An instance's `preprocess`, not a subclass: Gradio writes a `.pyi` stub
    beside the module of every Component subclass."""
    image = gr.Image(type="filepath", image_mode=None, format="png", **kwargs)
    decode = image.preprocess

    def preprocess(payload: Any) -> Any:
        try:
            return decode(payload)
        except OSError:  # PIL.UnidentifiedImageError and other undecodable files
            return str(payload.path)

    image.preprocess = preprocess
    return image


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
        check_value("resolution", settings.resolution, _field(InferConfig, "resolution").metadata)
        for name in ("concurrency", "keep_edits", "keep_identities"):
            if getattr(settings, name) < 1:
                raise InputError(f"{name}={getattr(settings, name)} must be at least 1")
        self.settings = settings
        settings.workdir.mkdir(parents=True, exist_ok=True)
        self.editors = Editors(settings)  # load the model now: a bad --model fails at start, in one line
        if settings.ckpt is not None:
            self.training_model = read_manifest(settings.ckpt).base_model
        else:
            self.training_model = settings.model
        self.blocks = self._build()

    # ------------------------------------------------------------------------------------ handlers

    def _describe(self, export: str | None) -> str:
        if export is None and self.settings.ckpt is None:
            return f"Edits use the base model **{self.settings.model}** (training-free)."
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
                               device=self.settings.device,
                               precision=self.settings.precision)
            arguments = cli_arguments(cfg)
            report = infer.run(cfg, self.editors.get(identity), command=["infer.py", *arguments])
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
            str(folder / REPORT),
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
            train.check_inputs(config)
        except ReportedError as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise ReportedError(_uploaded_names(str(err), image, reference)) from None
        # the images go beside the export (its manifest names them; Gradio's uploads are temporary)
        copies = {name: str(shutil.copy(path, folder / f"{name}{Path(path).suffix or '.png'}"))
                  for name, path in (("image", image), ("reference", reference)) if path}
        config = dataclasses.replace(config, **copies)
        pairs = train.training_pairs(config)

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
                    edit_controls, edit_outputs, run = self._edit_tab(method)
                    self.edit_controls = edit_controls
                with gr.Tab("Identity (S2Edit)", id="identity"):
                    train_controls, train_outputs, fit, forget = self._identity_tab()

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

    def _edit_tab(self, method: str) -> tuple[dict[str, Any], list[Any], gr.Button]:
        c: dict[str, Any] = {}
        p2p = method != "virtual"
        with gr.Row():
            with gr.Column(scale=5):
                c["image"] = image_input(label="Input image", sources=["upload", "clipboard"], height=320,
                                         elem_id="input-image")
                c["source"] = gr.Textbox(label="Source prompt", placeholder="describes the input image",
                                         elem_id="source-prompt")
                c["target"] = gr.Textbox(label="Target prompt", placeholder="describes the edited image",
                                         elem_id="target-prompt")
                run = gr.Button("Run", variant="primary", elem_id="run-edit")
                with gr.Group():
                    c["method"] = gr.Dropdown(editing_methods(), value=method, label="Editing method",
                                              info="virtual: no inversion (SPEC §9); the others invert the "
                                                   "image (cached) and edit with Prompt-to-Prompt")
                    c["attention_schedule"] = bound_slider(
                        VirtualSettings, "cross_replace", "Attention control schedule", 0.0, 1.0, 0.05,
                        info="Higher = more consistency with the source image (virtual: cross- and "
                             "self-attention, as the SPL app; p2p: cross-attention)")
                    c["opt_schedule"] = bound_slider(
                        SPLSettings, "opt_schedule", "Optimization schedule", 0.0, 1.0, 0.05,
                        info="SPL/CPL act after this fraction of the steps; best matched to the attention "
                             "control schedule")
                with gr.Group():
                    c["spl"] = bound_checkbox(SPLSettings, "structure", "Preserve structure (SPL)")
                    c["spl_area"] = bound_dropdown(SPLSettings, "structure_area", "Preservation area (SPL)",
                                                   AREA_LABELS)
                with gr.Group():
                    c["cpl"] = bound_checkbox(SPLSettings, "color", "Preserve color (CPL)")
                    c["cpl_area"] = bound_dropdown(SPLSettings, "color_area", "Preservation area (CPL)",
                                                   AREA_LABELS, visible=False)
                with gr.Group(visible=False) as mask_group:
                    gr.Markdown("**Mask settings** (cross-attention of these words, upsampled edge-aware)")
                    for side in ("source", "target"):
                        with gr.Row():
                            c[f"{side}_mask_words"] = gr.Textbox(
                                "", label=f"Mask words from {side}",
                                info=_field(MaskSettings, f"{side}_words").metadata["help"])
                            c[f"{side}_threshold"] = bound_slider(
                                MaskSettings, f"{side}_threshold", f"Threshold ({side})", 0.0, 1.0, 0.01)
                            c[f"{side}_invert"] = bound_checkbox(MaskSettings, f"{side}_invert",
                                                                 f"Invert {side} mask")
                with gr.Accordion("Advanced", open=False):
                    with gr.Row():
                        c["random_seed"] = gr.Checkbox(False, label="Random seed",
                                                       info="draw a seed; the seed used is shown")
                        c["seed"] = bound_number(InferConfig, "seed", "Seed", 0, MAX_SEED, elem_id="seed")
                    for schema in (InferConfig, VirtualSettings):  # the SPL app's range fits both fields
                        _checked(schema, "steps", (1, 50))
                    c["steps"] = gr.Slider(1, 50, value=defaults_steps(p2p), step=1, label="Inference steps",
                                           info="virtual: virtual.steps (15); p2p: DDIM steps (50)")
                    with gr.Row():
                        c["structure_weight"] = bound_slider(SPLSettings, "structure_weight",
                                                             "Structure loss weight", 0, 10000, 1000)
                        c["color_weight"] = bound_slider(SPLSettings, "color_weight", "Color loss weight",
                                                         0, 10000, 100)
                    with gr.Row():
                        c["iterations"] = bound_number(SPLSettings, "iterations", "Optimization iterations",
                                                       0, 1000)
                        c["postprocess"] = bound_checkbox(SPLSettings, "postprocess",
                                                          "Post-processing with loss")
                    with gr.Row(visible=not p2p) as virtual_row:
                        c["source_guidance"] = bound_slider(VirtualSettings, "source_guidance",
                                                            "Source guidance scale", 1, 10, 0.5)
                        c["target_guidance"] = bound_slider(VirtualSettings, "target_guidance",
                                                            "Target guidance scale", 1, 10, 0.5)
                    with gr.Group(visible=p2p) as p2p_group:
                        c["guidance"] = bound_slider(InferConfig, "guidance", "Guidance scale", 1, 15, 0.5)
                        c["p2p_mode"] = bound_dropdown(P2PSettings, "mode", "Prompt-to-Prompt mode", {})
                        c["self_attention_schedule"] = bound_slider(
                            P2PSettings, "self_replace", "Self-attention schedule", 0.0, 1.0, 0.05)
                        c["reweight"] = gr.Textbox("", label="Reweight words",
                                                   placeholder="smiling: 2, tiger: 1.5",
                                                   info=_field(P2PSettings, "reweight").metadata["help"])
                    with gr.Row():
                        c["blend_source"] = gr.Textbox(
                            "", label="Blend words (source)", placeholder="cat",
                            info="LocalBlend: regions of these source words follow the edit (virtual: kept "
                                 "from the source)")
                        c["blend_target"] = gr.Textbox(
                            "", label="Blend words (target)", placeholder="tiger",
                            info="LocalBlend: regions of these target words change")
            with gr.Column(scale=6):
                result = gr.Image(label="Edit", type="filepath", format="png", interactive=False, height=360,
                                  elem_id="edit-result")
                summary = gr.Markdown(label="Summary", elem_id="edit-summary")
                comparison = gr.ImageSlider(label="Before / after", type="filepath", interactive=False,
                                            max_height=360)
                with gr.Row():
                    mask = gr.Image(label="Upsampled preservation mask (masked area)", type="filepath",
                                    elem_id="preservation-mask",
                                    format="png", interactive=False, height=200)
                    with gr.Column():
                        reconstruction = gr.Image(label="Reconstruction (source branch)", type="filepath",
                                                  format="png", interactive=False, height=140)
                        psnr = gr.Number(label="Reconstruction PSNR (dB)", interactive=False, precision=2)
                attention = gr.Gallery(label="Attention maps per word", columns=8, height=180,
                                       type="filepath")
                losses = gr.Dataframe(headers=["target", "SPL before", "SPL after", "CPL before",
                                               "CPL after"], interactive=False,
                                      label="Preservation losses against the input (before → after SPL/CPL)")
                with gr.Row():
                    timings = gr.Dataframe(headers=["stage", "seconds"], label="Timings", interactive=False,
                                           max_height=220, scale=3)
                    report = gr.File(label=f"{REPORT} (as infer.py writes it)", elem_id="report-file",
                                     scale=2)
        self._edit_examples(c)

        # SPL app behaviour: the area and mask settings appear when they apply
        c["spl"].change(lambda on: gr.Dropdown(visible=on), c["spl"], c["spl_area"], api_visibility="private")
        c["cpl"].change(lambda on: gr.Dropdown(visible=on), c["cpl"], c["cpl_area"], api_visibility="private")
        for control in ("spl", "spl_area", "cpl", "cpl_area"):
            c[control].change(
                lambda s, sa, k, ka: gr.Group(visible=(s and sa == "masked") or (k and ka == "masked")),
                [c["spl"], c["spl_area"], c["cpl"], c["cpl_area"]], mask_group, api_visibility="private")
        c["random_seed"].change(lambda on: gr.Number(interactive=not on), c["random_seed"], c["seed"],
                                api_visibility="private")
        c["method"].change(
            lambda m: (gr.Slider(value=defaults_steps(m != "virtual")), gr.Row(visible=m == "virtual"),
                       gr.Group(visible=m != "virtual")),
            c["method"], [c["steps"], virtual_row, p2p_group], api_visibility="private")
        outputs = [result, comparison, mask, attention, reconstruction, psnr, losses, timings, report,
                   c["seed"], summary]
        return c, outputs, run

    def _edit_examples(self, c: dict[str, Any]) -> None:
        columns = ["image", "source", "target", "method", "spl_area", "source_mask_words", "cpl", "p2p_mode",
                   "reweight"]
        gr.Examples(
            [[str(EXAMPLES / row[0]), *row[1:]] for row in EDIT_EXAMPLES],
            [c[name] for name in columns],
            label="Examples (shipped photos; see examples/README.md)",
        )

    def _identity_tab(self) -> tuple[dict[str, Any], list[Any], gr.Button, gr.Button]:
        c: dict[str, Any] = {}
        with gr.Row():
            with gr.Column(scale=5):
                c["image"] = image_input(label="Image of the subject", sources=["upload", "clipboard"],
                                         height=280)
                c["prompt"] = gr.Textbox(label="Prompt with [I]", value=field_default(TrainConfig, "prompt"),
                                         info=_field(TrainConfig, "prompt").metadata["help"])
                c["object_word"] = gr.Textbox(label="Object word", value=field_default(TrainConfig, "object"),
                                              info=_field(TrainConfig, "object").metadata["help"])
                with gr.Row():
                    c["steps"] = bound_slider(TrainConfig, "max_steps", "Fine-tuning steps", 1, 1000, 1)
                    c["seed"] = bound_number(TrainConfig, "seed", "Seed", 0, MAX_SEED)
                c["finetune_method"] = bound_dropdown(FinetuneConfig, "method", "Fine-tuning", {
                    "full": "full (UNet + text encoder, the paper's)", "lora": "LoRA (low memory)"})
                with gr.Accordion("Compositional [A] (optional)", open=False):
                    c["reference"] = image_input(label="Reference image carrying the attribute", height=200)
                    c["reference_prompt"] = gr.Textbox("", label="Reference prompt with [A]",
                                                       placeholder="a photo of a woman with [A] makeup")
                    c["reference_object"] = gr.Textbox("", label="Attribute word", placeholder="makeup")
                fit = gr.Button("Fine-tune", variant="primary", elem_id="run-train")
                forget = gr.Button("Use the default model again")
            with gr.Column(scale=6):
                status = gr.Markdown(label="Status", elem_id="train-status")
                masks = gr.Gallery(label="Object masks (spatial control)", columns=2, height=240,
                                   type="filepath")
                history = gr.Dataframe(label="Loss terms per step", interactive=False)
        gr.Examples([[str(EXAMPLES / row[0]), *row[1:]] for row in IDENTITY_EXAMPLES],
                    [c["image"], c["prompt"], c["object_word"]], label="Examples")
        return c, [status, masks, history], fit, forget

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


def editing_methods() -> list[tuple[str, str]]:
    """The method dropdown's (label, value): virtual inversion, or one of InferConfig's inversions + P2P."""
    inversions = _field(InferConfig, "inversion").metadata["choices"]
    return [("Virtual inversion (fast, training-free)", "virtual")] + [
        (f"{INVERSION_LABELS.get(name, name)} inversion + Prompt-to-Prompt", name) for name in inversions
    ]


def defaults_steps(inversion_based: bool) -> int:
    """The steps slider's default: DDIM steps for p2p, virtual.steps for virtual (SPEC §7, §9)."""
    return field_default(InferConfig, "steps") if inversion_based else field_default(VirtualSettings, "steps")


def _accelerator(device: str) -> str:
    """Lightning's accelerator for a torch device name."""
    return "auto" if device == "auto" else "cpu" if device == "cpu" else "gpu"


def _devices(device: str) -> list[int] | int:
    """Lightning's devices for a torch device name: cuda:1 → [1], anything else one device."""
    kind, _, index = device.partition(":")
    return [int(index)] if kind == "cuda" and index.isdigit() else 1


# Examples on the shipped photos (examples/README.md): image, source, target, method, SPL area, source
# mask words, CPL, P2P mode, reweight. A test checks that each passes infer.py's checks.
EDIT_EXAMPLES: list[list[Any]] = [
    ["chelsea.png", "a photo of a cat", "a photo of a tiger", "virtual", "whole", "", False, "refine", ""],
    ["chelsea.png", "a photo of a cat", "a photo of a cat in the snow", "virtual", "masked", "cat", False,
     "refine", ""],
    ["astronaut.png", "a photo of a woman", "a photo of a woman with sunglasses", "virtual", "whole", "",
     True, "refine", ""],
    ["coffee.png", "a photo of a cup of coffee", "a photo of a cup of tea", "direct", "masked", "cup", False,
     "refine", ""],
    ["chelsea.png", "a photo of a cat", "a photo of a tiger", "direct", "whole", "", False, "replace",
     "tiger: 2"],
]
IDENTITY_EXAMPLES: list[list[Any]] = [
    ["astronaut.png", "a photo of a [I] woman", "woman"],
    ["chelsea.png", "a photo of a [I] cat", "cat"],
    ["coffee.png", "a photo of a [I] cup of coffee", "cup"],
]
