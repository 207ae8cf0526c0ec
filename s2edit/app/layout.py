"""The web app's layout: the Edit and Identity tabs, their controls (bound to the typed settings by
:mod:`s2edit.app.binding`) and their outputs, and the examples on the shipped photos."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from s2edit.app.binding import (
    bound_checkbox,
    bound_dropdown,
    bound_number,
    bound_slider,
    checked_field,
    field_default,
    field_of,
)
from s2edit.core.settings import FlowEditSettings, MaskSettings, P2PSettings, SPLSettings, VirtualSettings
from s2edit.editing.config import InferConfig
from s2edit.editing.flowedit import FAMILY_DEFAULTS
from s2edit.editing.run import REPORT
from s2edit.training.config import FinetuneConfig, TrainConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"  # a checkout's shipped photos
SHAPES_PRESET = "shapes"  # the trained shapes-world model: the app shows its own examples
MAX_SEED = 2**31 - 1  # the SPL app's random range; also exact in the browser's float64 numbers
# Names of the inversions (InferConfig.inversion's choices) for people
INVERSION_LABELS = {"null_text": "Null-text", "direct": "Direct", "negative_prompt": "Negative-prompt",
                    "ddim": "Plain DDIM"}
AREA_LABELS = {"whole": "Whole image", "masked": "Masked area"}


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


def edit_tab(method: str, flow: FlowEditSettings | None = None, examples: list[list[Any]] | None = None
             ) -> tuple[dict[str, Any], list[Any], gr.Button]:
    """The Edit tab. `flow`: the model is a flow model (SD3, FLUX) and these are its family's FlowEdit
    defaults: the method is flowedit, with its own controls; else virtual or an inversion + P2P.
    `examples`: rows of EDIT_EXAMPLES' columns (default: the model kind's, :func:`examples_for`)."""
    c: dict[str, Any] = {}
    p2p = method not in ("virtual", "flowedit")
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
                c["method"] = gr.Dropdown(
                    editing_methods(flow is not None), value=method, label="Editing method",
                    info="FlowEdit: inversion-free, on flow models (SPEC §11)" if flow is not None else
                         "virtual: no inversion (SPEC §9); the others invert the image (cached) and edit "
                         "with Prompt-to-Prompt")
                c["attention_schedule"] = bound_slider(
                    VirtualSettings, "cross_replace", "Attention control schedule", 0.0, 1.0, 0.05,
                    info="Higher = more consistency with the source image (virtual: cross- and "
                         "self-attention, as the SPL app; p2p: cross-attention)", visible=flow is None)
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
                            info=field_of(MaskSettings, f"{side}_words").metadata["help"])
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
                    checked_field(schema, "steps", (1, 50))
                checked_field(FlowEditSettings, "steps", (1, 50))
                c["steps"] = gr.Slider(
                    1, 50, value=flow.steps if flow is not None else defaults_steps(p2p), step=1,
                    label="Inference steps",
                    info="FlowEdit: T, the flow schedule's steps" if flow is not None else
                         "virtual: virtual.steps (15); p2p: DDIM steps (50)")
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
                shown = flow or FAMILY_DEFAULTS["sd3"]  # the FlowEdit controls are hidden on UNet models
                with gr.Group(visible=method == "flowedit"):
                    c["flow_n_max"] = bound_slider(FlowEditSettings, "n_max", "Edit steps (n_max)", 0, 50,
                                                   1, value=shown.n_max)
                    c["flow_n_avg"] = bound_number(FlowEditSettings, "n_avg", "Noise samples per step", 1, 8,
                                                   value=shown.n_avg)
                    with gr.Row():
                        c["flow_source_guidance"] = bound_slider(
                            FlowEditSettings, "source_guidance", "Source guidance", 0, 20, 0.5,
                            value=shown.source_guidance)
                        c["flow_target_guidance"] = bound_slider(
                            FlowEditSettings, "target_guidance", "Target guidance", 0, 30, 0.5,
                            value=shown.target_guidance)
                with gr.Row(visible=method == "virtual") as virtual_row:
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
                                               info=field_of(P2PSettings, "reweight").metadata["help"])
                with gr.Row(visible=method != "flowedit"):
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
    default_examples = FLOW_EXAMPLES if flow is not None else EDIT_EXAMPLES
    edit_examples(c, examples if examples is not None else default_examples)

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
                   gr.Group(visible=m not in ("virtual", "flowedit"))),
        c["method"], [c["steps"], virtual_row, p2p_group], api_visibility="private")
    outputs = [result, comparison, mask, attention, reconstruction, psnr, losses, timings, report,
               c["seed"], summary]
    return c, outputs, run

def edit_examples(c: dict[str, Any], rows: list[list[Any]]) -> None:
    """The Edit tab's examples on the shipped images (a checkout's `examples/`; none in a bare wheel)."""
    if not EXAMPLES.is_dir():
        return
    columns = ["image", "source", "target", "method", "spl_area", "source_mask_words", "cpl", "p2p_mode",
               "reweight"]
    gr.Examples(
        [[str(EXAMPLES / row[0]), *row[1:]] for row in rows],
        [c[name] for name in columns],
        label="Examples (shipped images; see examples/README.md)",
    )

def identity_tab(examples: list[list[Any]] | None = None
                 ) -> tuple[dict[str, Any], list[Any], gr.Button, gr.Button]:
    c: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=5):
            c["image"] = image_input(label="Image of the subject", sources=["upload", "clipboard"],
                                     height=280)
            c["prompt"] = gr.Textbox(label="Prompt with [I]", value=field_default(TrainConfig, "prompt"),
                                     info=field_of(TrainConfig, "prompt").metadata["help"])
            c["object_word"] = gr.Textbox(label="Object word", value=field_default(TrainConfig, "object"),
                                          info=field_of(TrainConfig, "object").metadata["help"])
            with gr.Row():
                c["steps"] = bound_slider(TrainConfig, "max_steps", "Fine-tuning steps", 1, 1000, 1)
                c["seed"] = bound_number(TrainConfig, "seed", "Seed", 0, MAX_SEED)
            c["finetune_method"] = bound_dropdown(FinetuneConfig, "method", "Fine-tuning", {
                "auto": "the model family's default (SD: full, SDXL: LoRA)",
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
    if EXAMPLES.is_dir():
        gr.Examples([[str(EXAMPLES / row[0]), *row[1:]] for row in examples or IDENTITY_EXAMPLES],
                    [c["image"], c["prompt"], c["object_word"]], label="Examples")
    return c, [status, masks, history], fit, forget


def editing_methods(flow: bool = False) -> list[tuple[str, str]]:
    """The method dropdown's (label, value): FlowEdit on a flow model; else virtual inversion, or one of
    InferConfig's inversions + P2P."""
    if flow:
        return [("FlowEdit (inversion-free)", "flowedit")]
    inversions = field_of(InferConfig, "inversion").metadata["choices"]
    return [("Virtual inversion (fast, training-free)", "virtual")] + [
        (f"{INVERSION_LABELS.get(name, name)} inversion + Prompt-to-Prompt", name) for name in inversions
    ]


def defaults_steps(inversion_based: bool) -> int:
    """The steps slider's default: DDIM steps for p2p, virtual.steps for virtual (SPEC §7, §9)."""
    return field_default(InferConfig, "steps") if inversion_based else field_default(VirtualSettings, "steps")


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
# On a flow model: the virtual-inversion examples, edited with FlowEdit.
FLOW_EXAMPLES: list[list[Any]] = [[*row[:3], "flowedit", *row[4:]] for row in EDIT_EXAMPLES
                                  if row[3] == "virtual"]
# On the shapes world (model=shapes): the shipped 64² scenes (examples/shapes/), colour and shape swaps.
SHAPES_EXAMPLES: list[list[Any]] = [
    ["shapes/red_circle_white.png", "a red circle on a white background",
     "a blue circle on a white background", "direct", "whole", "", False, "refine", ""],
    ["shapes/blue_square_grey.png", "a blue square on a grey background",
     "a blue circle on a grey background", "direct", "masked", "grey", False, "refine", ""],
    ["shapes/green_triangle_black.png", "a green triangle on a black background",
     "a yellow triangle on a black background", "virtual", "whole", "", False, "refine", ""],
]
SHAPES_IDENTITY_EXAMPLES: list[list[Any]] = [
    ["shapes/red_circle_white.png", "a red [I] circle on a white background", "circle"],
]
IDENTITY_EXAMPLES: list[list[Any]] = [
    ["astronaut.png", "a photo of a [I] woman", "woman"],
    ["chelsea.png", "a photo of a [I] cat", "cat"],
    ["coffee.png", "a photo of a [I] cup of coffee", "cup"],
]
