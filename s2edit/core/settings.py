"""Typed, range-checked settings of the editing engine (SPEC §3–§6, §9), one definition each.

Each group is a frozen dataclass that checks its own fields when built (type, choices, range, finite
numbers: :func:`editkit.config.check_fields`), so the same refusals reach a command line, a Python caller,
the web app and the evaluation runner. The edit request (:mod:`s2edit.editing.request`) embeds them
(`p2p.*`, `spl.*`, `mask.*`, `nti.*`, `virtual.*`); their defaults are SPEC §7's and equal
`configs/infer.yaml` (a test keeps them equal).
"""

from __future__ import annotations

from dataclasses import dataclass

from editkit.config import check_fields, setting

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"  # SPEC §7 base model
MAX_RESOLUTION = 2048  # working sizes above this do not fit SD's attention in memory on one GPU
AREAS = ("whole", "masked")
MASK_INPUTS = ("preview", "in_loop")
LATENT_MODES = ("mean", "sample")
VIRTUAL_SCHEDULES = ("auto", "lcm", "ddim")
PRESETS_HELP = "tiny, tiny-lcm, tiny-v, tiny-xl, tiny-xl-lcm, tiny-sd3, tiny-flux, sd-v1-random, sdxl-random"
MODEL_HELP = (f"hub id, local diffusers folder (SD 1.x, 2.x, SDXL; SD3, FLUX: method=flowedit), or a random "
              f"preset ({PRESETS_HELP})")
LORA_HELP = ("a LoRA file (.safetensors; diffusers, peft or kohya keys) fused into the model's UNet, e.g. "
             "LCM-LoRA")


class Checked:
    """Base of the settings dataclasses: every field is checked when an instance is built."""

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass(frozen=True)
class NullTextSettings(Checked):
    """Null-text optimisation (SPEC §3): at most `inner_steps` Adam updates of ∅ per denoising step,
    learning rate lr·(1 − i/100); after each update, stop once its loss was < early_stop + i·growth."""

    inner_steps: int = setting(10, "Adam updates of the null embedding per timestep", ge=0, le=1000)
    lr: float = setting(1e-2, "initial learning rate, decayed as lr·(1 − i/100)", gt=0)
    early_stop: float = setting(1e-5, "stop a timestep once an update's loss < early_stop + i·growth", ge=0)
    early_stop_growth: float = setting(2e-5, "growth of the early-stop threshold per timestep", ge=0)


@dataclass(frozen=True)
class P2PSettings(Checked):
    """Prompt-to-Prompt attention control of the inversion-based editor (SPEC §4)."""

    mode: str = setting("refine", "word mapping: refine (any prompts) or replace (same word count)",
                        choices=("refine", "replace"))
    cross_replace: float = setting(0.8, "cross-attention injection for steps i < int(cross_replace·(T+1))",
                                   ge=0, le=1)
    cross_replace_words: dict[str, float] = setting(
        {}, "per-word cross-attention schedules, e.g. {bangs: 0.4}", ge=0, le=1)
    self_replace: float = setting(0.5, "self-attention injection for steps i < int(self_replace·T)",
                                  ge=0, le=1)
    reweight: dict[str, float] = setting(
        {}, "scale words' injected cross-attention while it is injected, e.g. {smiling: 2.0}")
    blend_words: list[str] = setting([], "LocalBlend words (source and target); empty = off")
    blend_threshold: float = setting(0.3, "LocalBlend threshold on the max-normalised word map", ge=0, le=1)
    blend_start: float = setting(0.2, "LocalBlend from step int(blend_start·T) on", ge=0, le=1)


@dataclass(frozen=True)
class VirtualSettings(Checked):
    """Training-free virtual inversion (InfEdit/DDCM, SPEC §9): no inversion, 15 steps of an LCM model."""

    steps: int = setting(15, "denoising steps (LCM timesteps when the model's scheduler is LCM)",
                         ge=1, le=1000)
    source_guidance: float = setting(1.0, "guidance of the source and mutual branches", gt=0, le=100)
    target_guidance: float = setting(2.0, "guidance of the target branches", gt=0, le=100)
    cross_replace: float = setting(0.8, "targets take the source's cross-attention while (i+1)/N <= this",
                                   ge=0, le=1)
    self_replace: float = setting(0.8, "targets take the source's self-attention while (i+1)/N < this; "
                                       "afterwards the mutual branch attends to the source", ge=0, le=1)
    eta: float = setting(1.0, "share of fresh noise in each re-noising (1: InfEdit's setting)", ge=0, le=1)
    blend_target: list[str] = setting([], "LocalBlend: target words whose region follows the target")
    blend_source: list[str] = setting([], "LocalBlend: source words whose region is kept from the source")
    thresh_e: float = setting(0.6, "LocalBlend threshold of the target words' mask", ge=0, le=1)
    thresh_m: float = setting(0.6, "LocalBlend threshold of the source words' mask", ge=0, le=1)
    image_latent: str = setting("mean", "z0 from the VAE posterior mean, or a seeded sample (as InfEdit)",
                                choices=LATENT_MODES)
    schedule: str = setting("auto", "timesteps: auto (LCM when the model's scheduler is an LCMScheduler, "
                                    "else the DDIM chain), lcm (e.g. with an LCM-LoRA), ddim",
                            choices=VIRTUAL_SCHEDULES)


@dataclass(frozen=True)
class FlowEditSettings(Checked):
    """FlowEdit on flow models (SD3, FLUX; SPEC §11). null: the family's default from the paper (SD3: 50
    steps, n_max 33, guidance 3.5 → 13.5; FLUX: 28 steps, n_max 24, guidance 1.5 → 5.5; n_min 0, n_avg 1)."""

    steps: int | None = setting(None, "T: steps of the flow schedule", ge=1, le=1000)
    n_max: int | None = setting(None, "steps that run: the first T − n_max are skipped (more: stronger edit)",
                                ge=0, le=1000)
    n_min: int | None = setting(None, "the last n_min steps sample regularly from the target", ge=0, le=1000)
    n_avg: int | None = setting(None, "noise samples averaged per step", ge=1, le=100)
    source_guidance: float | None = setting(None, "w_src (SD3: CFG; FLUX: its guidance embedding)", ge=0,
                                            le=100)
    target_guidance: float | None = setting(None, "w_tar (SD3: CFG; FLUX: its guidance embedding)", ge=0,
                                            le=100)


@dataclass(frozen=True)
class SPLSettings(Checked):
    """Structure / Color Preservation Losses in the loop and as post-processing (SPEC §5)."""

    structure: bool = setting(True, "optimise the Structure Preservation Loss")
    color: bool = setting(False, "optimise the Color Preservation Loss")
    structure_weight: float = setting(1e4, "λ_s", ge=0)
    color_weight: float = setting(1e3, "λ_c (100–10000)", ge=0)
    iterations: int = setting(100, "SGD iterations per refinement", ge=0, le=100000)
    lr: float = setting(1.0, "SGD learning rate", gt=0)
    momentum: float = setting(0.9, "SGD momentum", ge=0, lt=1)
    opt_schedule: float = setting(0.8, "refine the predicted x0 at steps i/T >= this (1: only the last step)",
                                  ge=0, le=1)
    postprocess: bool = setting(True, "refine the final decoded image against the input")
    radius: int = setting(5, "local window radius (11×11)", ge=0, le=1000)
    eps: float = setting(1e-4, "regulariser ε of the local linear models", gt=0)
    structure_area: str = setting("whole", "where SPL applies: the whole image or the mask (mask.*)",
                                  choices=AREAS)
    color_area: str = setting("whole", "where CPL applies: the whole image or the mask (mask.*)",
                              choices=AREAS)

    @property
    def active(self) -> bool:
        """Whether any loss is optimised at all."""
        return self.iterations > 0 and (
            (self.structure and self.structure_weight > 0) or (self.color and self.color_weight > 0)
        )

    @property
    def uses_mask(self) -> bool:
        return (self.structure and self.structure_area == "masked") or (
            self.color and self.color_area == "masked"
        )


@dataclass(frozen=True)
class MaskSettings(Checked):
    """Preservation masks from cross-attention, upsampled by a guided filter (SPEC §6, the SPL app)."""

    source_words: list[str] = setting([], "source-prompt words whose attention makes the source mask")
    target_words: list[str] = setting([], "target-prompt words whose attention makes the target mask")
    source_threshold: float = setting(0.5, "threshold of the max-normalised source word maps", ge=0, le=1)
    target_threshold: float = setting(0.5, "threshold of the max-normalised target word maps", ge=0, le=1)
    source_invert: bool = setting(False, "use 1 − the source mask")
    target_invert: bool = setting(False, "use 1 − the target mask")
    radius: int = setting(1, "guided-filter radius at the first ×2 stage (+1 per stage)", ge=0, le=100)
    eps: float = setting(1e-2, "guided-filter ε", gt=0)
    inputs: str = setting(
        "preview", "maps and target guide from a loss-free preview edit (SPL app), or in_loop: the maps of "
                   "the steps before the first SPL step and that step's x0 (faster approximation)",
        choices=MASK_INPUTS)

    @property
    def wanted(self) -> bool:
        return bool(self.source_words or self.target_words)
