"""Evaluate an editing method on a dataset of edits (SPEC §8): edit, score, summarise; resumable.

    python evaluate.py data=examples/pie_bench_mini model=/path/to/sd method=p2p inversion=direct \\
        metrics.clip=/path/to/clip-vit-large-patch14 out=outputs/eval/p2p_direct
    python evaluate.py data=examples/dataset.jsonl model=tiny resolution=128 virtual.steps=4  # CPU smoke
    python evaluate.py ... devices=4 strategy=ddp          # 4 GPUs (or num_nodes=…): every item exactly once
    python evaluate.py ... finetune=true tune.steps=200    # S2Edit: fine-tune [I] on each image, then edit
    python evaluate.py compare runs=[outputs/eval/a,outputs/eval/b] out=outputs/eval/compare
    python evaluate.py install lpips fid dists  # real LPIPS / FID / DISTS weights from the package registry

Writes into `out=`: `items/<id>/` (source, reconstruction, edits, masks, `metrics.json`, then `DONE`),
`metrics.csv` (one row per item and target), `summary.md` / `summary.json` (mean ± std per metric, per
edit type and overall), `plots/metrics_by_edit_type.png` and `config.yaml`. `method=auto` edits with
virtual inversion (p2p with finetune=true) unless a setting of one method is given. Rerunning the same
command resumes: finished items are kept, the items in flight when a run was killed are redone. `python
evaluate.py --help` lists every key; `python evaluate.py compare --help` the comparison's.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from editkit.config import explicit_keys, flat_values, parse_config, run_main, to_yaml
from editkit.errors import InputError
from editkit.files import OutputLock, atomic_path, io_errors
from s2edit.editing.request import choose_method
from s2edit.evaluation.config import EXECUTION_KEYS, CompareConfig, EvaluateConfig

CONFIG_FILE = "config.yaml"


def check_resumable(out: Path, cfg: EvaluateConfig) -> None:
    """A rerun into an earlier run's folder must compute the same thing as the items already there
    (execution keys may differ); a folder without finished items binds nothing."""
    from s2edit.evaluation.items import DONE, ITEMS_DIR

    saved = out / CONFIG_FILE
    if not saved.is_file() or not any((out / ITEMS_DIR).glob(f"*/{DONE}")):
        return
    try:
        previous = parse_config(EvaluateConfig, [f"config={saved}"])
    except InputError as err:
        raise InputError(f"'{saved}' of the earlier run does not load ({err}): use a new out=") from None
    old, new = flat_values(previous), flat_values(cfg)
    for key, value in new.items():
        if key.split(".")[0] not in EXECUTION_KEYS and old.get(key) != value:
            raise InputError(f"out='{out}' holds a run made with {key}={old.get(key)!r}, not {value!r}: "
                             f"resume it with the same settings, or pass a new out=")


def check_inputs(cfg: EvaluateConfig, given: Iterable[str] | None = None) -> tuple[list[Any], str]:
    """Refuse bad inputs in one line before any model loads; returns the items to evaluate and the editing
    method (`given`: the keys the user set, see `s2edit.editing.request.choose_method`)."""
    from s2edit.editing.request import EditRequest
    from s2edit.evaluation.datasets import read_dataset
    from s2edit.evaluation.items import check_item_folders, check_items

    if cfg.data is None:
        raise InputError("no dataset: pass data=path/to/edits.jsonl (or .csv, or a PIE-Bench folder)")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"out='{out}' is a file: pass a folder")
    if cfg.lora is not None:
        from s2edit.core.lora import check_lora_file

        check_lora_file(Path(cfg.lora).expanduser())
    if cfg.offload:
        import torch

        from s2edit.core.detect import family_name, offload_refusal

        gpu = cfg.accelerator in ("gpu", "cuda") or (cfg.accelerator == "auto" and torch.cuda.is_available())
        refusal = offload_refusal(cfg.model, family_name(cfg.model), "cuda" if gpu else "cpu")
        if refusal is not None:
            raise InputError(refusal)
    items = read_dataset(cfg.data, edit_types=cfg.edit_types or None)
    items = items[: cfg.limit] if cfg.limit is not None else items
    if not items:
        kinds = f" of edit types {cfg.edit_types}" if cfg.edit_types else ""
        raise InputError(f"dataset '{cfg.data}' has no items{kinds}")
    check_item_folders(items)
    check_resumable(out, cfg)
    method = choose_method(cfg, given, default=cfg.default_method)
    check_items(items, EditRequest.of(cfg), method=method, item_blend=cfg.item_blend,
                placeholder=cfg.tune.placeholder if cfg.finetune else None, object_override=cfg.tune.object)
    return items, method


def run(cfg: EvaluateConfig, given: Iterable[str] | None = None) -> dict[str, Any] | None:
    """Evaluate (resuming what `cfg.out` holds) and write the report; returns summary.json's content in
    the process of global rank 0, None in the others."""
    # 1. Check inputs (no model yet)
    items, method = check_inputs(cfg, given)

    # 2. Edit and score the items not done yet (heavy imports here, so that refused inputs fail fast)
    from lightning.pytorch.utilities import rank_zero_only

    from s2edit.core.runtime import retain_freed_memory
    from s2edit.core.trainer import interruptible, make_trainer
    from s2edit.evaluation.items import ITEMS_DIR, EvaluationDataModule, is_done, item_folder
    from s2edit.evaluation.report import write_report
    from s2edit.evaluation.runner import EvaluationModule, ItemWriter

    out = Path(cfg.out)
    items_dir = out / ITEMS_DIR
    with atomic_path(out / CONFIG_FILE) as tmp:  # the experiment, for resuming and for readers
        tmp.write_text(to_yaml(cfg))
    pending = [item for item in items if not is_done(items_dir / item_folder(item.id))]
    is_zero = True
    if pending:
        retain_freed_memory()  # CPU runs: no page faults on every UNet pass's activations
        trainer = make_trainer(
            accelerator=cfg.accelerator, devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
            callbacks=[ItemWriter(items_dir)], progress=cfg.progress, root=out, predicting=True,
        )
        if rank_zero_only.rank == 0:
            world = cfg.devices * cfg.num_nodes
            log(f"{len(items)} items: {len(items) - len(pending)} done earlier, {len(pending)} to evaluate "
                f"({method}) on {world} process{'es' if world > 1 else ''}")

        def how_to_resume() -> None:
            done = sum(is_done(items_dir / item_folder(item.id)) for item in items)
            log(f"interrupted with {done} of {len(items)} items done; rerun the same command to resume")

        with interruptible(trainer, how_to_resume):
            data = EvaluationDataModule(pending, items_dir)
            trainer.predict(EvaluationModule(cfg, method), datamodule=data, return_predictions=False)
        trainer.strategy.barrier("evaluation-written")  # every process has written its share
        is_zero = trainer.is_global_zero
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    else:
        log(f"all {len(items)} items were evaluated earlier in {out}: writing the report")
    if not is_zero:
        return None

    # 3. Report from the item folders (this run's items and earlier runs')
    info = {"data": cfg.data, "method": method, "model": cfg.model, "seed": cfg.seed,
            "config": str(out / CONFIG_FILE)}
    return write_report(items, out, info=info, weights=dataclasses.asdict(cfg.metrics))


def compare(argv: list[str]) -> dict[str, Any]:
    from s2edit.evaluation.compare import COMPARE_MD, COMPARE_PLOT, compare_runs

    cfg: CompareConfig = parse_config(CompareConfig, argv, None, prog="evaluate.py compare",
                                      description="Compare evaluate.py runs: one table and one plot")
    result = compare_runs(cfg.runs, cfg.names, cfg.out)
    out = Path(cfg.out)
    print(f"compared {len(result['runs'])} runs: {out / COMPARE_MD}, {out / COMPARE_PLOT}")
    if result["note"]:
        print(f"note: {result['note']}")
    return result


def launching_process() -> bool:
    """Whether this is the process a user started (rank 0), not one a launcher spawned for DDP."""
    for variable in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(variable, "").isdigit():
            return int(os.environ[variable]) == 0
    return True


def main(argv: list[str]) -> dict[str, Any] | None:
    if argv and argv[0] == "compare":
        return compare(argv[1:])
    if argv and argv[0] in ("install", "list"):  # the metric-weights cache: python -m s2edit.metrics
        from s2edit.evaluation.weights import main as weights_main

        return weights_main(argv)
    cfg: EvaluateConfig = parse_config(EvaluateConfig, argv, prog="evaluate.py",
                                       description=__doc__.splitlines()[0])
    # One run per out folder, held by the launching process only (DDP's other processes re-run this script)
    lock = OutputLock(cfg.out, " ".join(["evaluate.py", *argv])) if launching_process() else nullcontext()
    with lock, io_errors(cfg.out):
        summary = run(cfg, given=explicit_keys(EvaluateConfig, argv))
    if summary is not None:
        out = Path(cfg.out)
        print(f"evaluated {summary['done']}/{summary['items']} items ({summary['edits']} edit(s)): "
              f"{out / 'metrics.csv'}, {out / 'summary.md'}", file=sys.stderr)
    return summary


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cli() -> None:
    """The `evaluate.py` / `s2edit-evaluate` / `python -m s2edit.evaluate` command."""
    run_main(main)
