"""S2Edit: identity fine-tuning and Prompt-to-Prompt editing of Stable Diffusion with spatial control.

Built on `spl` (model-free image ops: structure/colour preservation losses, guided filter, image I/O).
"""
