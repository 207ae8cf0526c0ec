"""Typed configuration of `evaluate.py` (SPEC §8): one file describes one experiment.

`configs/evaluate.yaml` lists every key with these defaults (a test keeps them equal). The editing keys
are the edit request's (:class:`~s2edit.editing.request.EditRequest`: `method`, `inversion`, `p2p.*`,
`virtual.*`, `spl.*`, `mask.*`, `nti.*`), as in `infer.py`; per-item fine-tuning embeds train.py's
groups (`tune.finetune.*`, `tune.semantic.*`, `tune.spatial.*`). Only `evaluate.py` and the
LightningModule's `__init__` read these objects.
"""

# ruff: noqa: RUF009  (`setting` returns dataclasses.field(...))

from __future__ import annotations

from dataclasses import dataclass, field

from editkit.config import setting
from s2edit.core.settings import DEFAULT_MODEL, LORA_HELP, MAX_RESOLUTION, MODEL_HELP
from s2edit.editing.request import EditRequest
from s2edit.training.config import FinetuneConfig, SemanticConfig, SpatialConfig

STRATEGIES = ("auto", "ddp")
# Keys that change how a run is executed, not what it computes: a resumed run may change them.
EXECUTION_KEYS = ("out", "limit", "edit_types", "devices", "num_nodes", "strategy", "accelerator",
                  "progress", "continue_on_error", "cache_dir", "save_attention")


@dataclass(frozen=True)
class MetricWeightsConfig:
    """Weights of the weight-backed metrics (SPEC §8): LPIPS, FID and DISTS from the weights cache unless a
    file is given; CLIP and DINO from local paths only. Without weights a metric is reported as skipped."""

    lpips: str | None = setting(None, "LPIPS backbone: a torchvision state dict (squeezenet1_1-*.pth, "
                                      "PIE-Bench's choice; alexnet / vgg16); null: the weights cache")
    lpips_net: str = setting("auto", "LPIPS backbone architecture (auto: told from the file; AlexNet from "
                                     "the cache)", choices=("auto", "squeeze", "alex", "vgg"))
    lpips_lin: str | None = setting(None, "LPIPS linear-layer weights (default: the copy torchmetrics ships)")
    clip: str | None = setting(None, "local Hugging Face CLIP folder (PIE-Bench: "
                                     "openai/clip-vit-large-patch14)")
    dino: str | None = setting(None, "DINO ViT-B/8: dino_vitbase8_pretrain.pth or a local "
                                     "facebook/dino-vitb8 folder (structure distance)")
    fid: str | None = setting(None, "torch-fidelity's Inception weights file (needs torch-fidelity); null: "
                                    "the weights cache's TF-FID Inception")
    cache: str | None = setting(None, "weights cache filled by `python -m s2edit.metrics install` (LPIPS, "
                                      "FID, DISTS; default: $S2EDIT_WEIGHTS, else ~/.cache/s2edit/weights)")


@dataclass(frozen=True)
class TuneConfig:
    """Per-item S2Edit fine-tuning (`finetune=true`): `[I]` is learned on each image, then the item is
    edited with prompts that hold it; every item starts again from the base weights."""

    steps: int = setting(200, "fine-tuning steps per item (S2Edit §4.1)", ge=1, le=10**6)
    placeholder: str = setting("[I]", "identity token string added to the tokenizer")
    object: str | None = setting(None, "object word of every item (default: the item's blend source word, "
                                       "else its one bracketed source word)")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    semantic: SemanticConfig = field(default_factory=SemanticConfig)
    spatial: SpatialConfig = field(default_factory=SpatialConfig)


@dataclass(frozen=True)
class EvaluateConfig(EditRequest):
    data: str | None = setting(None, "dataset: a .jsonl / .csv file, or a PIE-Bench folder or its "
                                     "mapping_file.json")
    out: str = setting("outputs/eval", "output folder (a rerun into the same folder resumes)")
    model: str = setting(DEFAULT_MODEL, f"base model: {MODEL_HELP}")
    lora: str | None = setting(None, LORA_HELP)
    resolution: int | None = setting(
        None, "working size (area ≈ resolution², sides multiples of 64); null: the model's native size",
        ge=64, le=MAX_RESOLUTION)
    seed: int = setting(0, "base seed; each item's seed is derived from it and the item id", ge=0,
                        le=2**63 - 1)
    limit: int | None = setting(None, "evaluate only the first N items of the dataset", ge=1)
    edit_types: list[int] = setting([], "keep only these edit types (PIE-Bench: 0 random … 9 style)", ge=0)
    item_blend: bool = setting(False, "LocalBlend with each item's blend words (p2p: p2p.blend_words = "
                                      "[source, target]; virtual: virtual.blend_target = [target])")
    finetune: bool = setting(False, "fine-tune [I] on each item's image (S2Edit) before editing it")
    precision: str = setting("auto", "model dtype: auto (bf16 on GPU, fp32 on CPU), fp32, bf16",
                             choices=("auto", "fp32", "bf16"))
    offload: bool = setting(False, "flow models (SD3, FLUX): model CPU offload, each component moved to the "
                                   "GPU only while it runs (diffusers' enable_model_cpu_offload)")
    accelerator: str = setting("auto", "Lightning accelerator: auto, cpu, gpu (= cuda)",
                               choices=("auto", "cpu", "gpu", "cuda"))
    devices: int = setting(1, "processes (GPUs) per node; items are shared out without repeats", ge=1)
    num_nodes: int = setting(1, "nodes", ge=1)
    strategy: str = setting("auto", "Lightning strategy: ddp for devices > 1 or several nodes",
                            choices=STRATEGIES)
    cache_dir: str | None = setting(None, "cache p2p inversions here (share it between runs that differ "
                                          "only in editing settings); null: no cache")
    save_attention: bool = setting(False, "also save each item's per-word attention maps")
    continue_on_error: bool = setting(False, "record a failing item (error.txt) and go on; it is retried "
                                             "by the next run")
    progress: bool = setting(True, "show a progress bar over the items")
    metrics: MetricWeightsConfig = field(default_factory=MetricWeightsConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    @property
    def default_method(self) -> str:
        """What `method=auto` means when no method's settings are given: p2p when each item is
        fine-tuned (the paper's editor), flowedit on a flow model, else virtual inversion (training-free)."""
        if self.finetune:
            return "p2p"
        from s2edit.core.detect import FLOW_FAMILIES, family_name

        return "flowedit" if family_name(self.model) in FLOW_FAMILIES else "virtual"


@dataclass(frozen=True)
class CompareConfig:
    runs: list[str] = setting([], "output folders of evaluate.py runs to compare (each has metrics.csv)")
    names: list[str] = setting([], "a label per run (default: the folder names)")
    out: str = setting("outputs/compare", "folder for compare.md, compare.csv and compare.png")
