"""Edit images with S2Edit + SPL in the browser (Gradio 6 web app; the UI is in s2edit/app/ui.py).

    python app.py                                  # CompVis/stable-diffusion-v1-4 (local cache or hub)
    python app.py --model tiny                     # random tiny model: every control runs, offline
    python app.py --model /path/to/sdxl --lora lcm-lora-sdxl.safetensors   # SDXL + LCM-LoRA
    python app.py --model /path/to/FLUX.1-dev --offload   # a flow model: FlowEdit, components offloaded
    python app.py --model /path/to/sd --ckpt outputs/astronaut/export   # edit with a fine-tuned [I]
    python app.py --port 7860 --share              # a fixed port, and a public Gradio link

Open the printed URL. Edits run exactly as `infer.py` runs them and write into `<workdir>/edits/`;
identity fine-tuning (the Identity tab) writes into `<workdir>/identities/`. Needs the `[app]` extra:
`pip install 's2edit[app]'` (a checkout: `pip install -e '.[app]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from editkit.config import run_main
from s2edit.core.settings import DEFAULT_MODEL, LORA_HELP, MODEL_HELP


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"base model: {MODEL_HELP} (default {DEFAULT_MODEL})")
    parser.add_argument("--lora", default=None, help=LORA_HELP)
    parser.add_argument("--ckpt", default=None, help="export folder of train.py to edit with by default")
    parser.add_argument("--port", type=int, default=None,
                        help="server port (default: the first free one from 7860)")
    parser.add_argument("--share", action="store_true", help="also create a public Gradio link")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="working size of the base model's edits (default: the model's native size)")
    parser.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, …")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--offload", action="store_true",
                        help="flow models (SD3, FLUX) on a GPU: model CPU offload, each component on the GPU "
                             "only while it runs")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/app"),
                        help="where edits, identities and the inversion cache go (default outputs/app)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="edits that may run at once (model runs still take turns; default 2)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    # heavy imports (gradio, torch) after the arguments, so that --help answers at once
    from s2edit.app.ui import AppSettings, EditingApp

    settings = AppSettings(
        model=args.model, lora=args.lora, ckpt=args.ckpt, workdir=args.workdir, resolution=args.resolution,
        device=args.device, precision=args.precision, offload=args.offload, concurrency=args.concurrency,
    )
    EditingApp(settings).launch(host=args.host, port=args.port, share=args.share)


def cli() -> None:
    """The `app.py` / `s2edit-app` / `python -m s2edit.app` command."""
    run_main(main)
