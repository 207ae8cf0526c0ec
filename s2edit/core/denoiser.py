"""The guided denoiser: the model's noise prediction under classifier-free guidance and attention control.

As k-diffusion's `CFGDenoiser`, it is what samplers and inversions call, and the one place where the
model, classifier-free guidance and the attention controllers meet:

    denoiser = GuidedDenoiser(model, controller)        # controller: spatial control, P2P, a store, …
    with denoiser.controlled():                         # route attention through it while inside
        eps = denoiser.guided(z, t, alpha, cond, uncond, guidance)   # one call on [uncond rows, cond rows]
        eps_c = denoiser.conditional(z, t, alpha, cond)              # conditional rows only
    eps_u = denoiser.unconditional(z, t, alpha, null)   # outside: the layers keep their own processors

Every prediction is ε in float32, whatever the model's dtype and prediction type. Before each call the
controller is told which rows are conditional, so controllers address rows of the conditional half.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from s2edit.core.attention import AttentionController
from s2edit.core.diffusion import Alpha, guided_noise
from s2edit.core.family import Conditioning, ModelFamily


class GuidedDenoiser:
    """ε̂(z, t) of `model` with classifier-free guidance; `controller` (optional) edits its attention.

    The controller acts only inside :meth:`controlled` (entered once for a whole loop): a prediction
    made outside it runs the model's own attention processors.
    """

    def __init__(self, model: ModelFamily, controller: AttentionController | None = None) -> None:
        self.model = model
        self.controller = controller

    @contextlib.contextmanager
    def controlled(self) -> Iterator[GuidedDenoiser]:
        """Route the attention layers the controller wants through it while inside."""
        if self.controller is None:
            yield self
            return
        with self.model.attention_control(self.controller):
            yield self

    def _predict(self, z: torch.Tensor, t: torch.Tensor, alpha: Alpha, cond: Conditioning,
                 conditional: slice) -> torch.Tensor:
        if self.controller is not None:
            self.controller.conditional_rows = conditional
        if z.shape[0] != len(cond):
            z = z.expand(len(cond), *z.shape[1:])
        return self.model.to_epsilon(self.model.predict(z, t, cond), z.float(), alpha)

    def conditional(self, z: torch.Tensor, t: torch.Tensor, alpha: Alpha, cond: Conditioning) -> torch.Tensor:
        """ε of the conditional rows alone (guidance 1): (rows, C, h, w); `z` has 1 or `len(cond)` rows,
        `t` is one timestep or one per row (then `alpha` is (rows, 1, 1, 1))."""
        return self._predict(z, t, alpha, cond, slice(0, len(cond)))

    def unconditional(self, z: torch.Tensor, t: torch.Tensor, alpha: Alpha, uncond: Conditioning
                      ) -> torch.Tensor:
        """ε of unconditional rows alone (no conditional row in the batch)."""
        return self._predict(z, t, alpha, uncond, slice(0, 0))

    def guided(
        self,
        z: torch.Tensor,
        t: torch.Tensor,
        alpha: Alpha,
        cond: Conditioning,
        uncond: Conditioning,
        guidance: float | torch.Tensor,
    ) -> torch.Tensor:
        """ε_∅ + w·(ε_c − ε_∅) from ONE model call on [uncond rows…, cond rows…]: (rows, C, h, w).

        `z` (rows, C, h, w) is shared by both halves; `guidance` is a number or one w per row (rows,);
        `t` is one timestep, or one per row (then `alpha` is (rows, 1, 1, 1)).
        """
        rows = len(cond)
        if t.dim() and t.shape[0] == rows:  # one timestep per row: the same for both halves
            t = t.repeat(2)
        if isinstance(alpha, torch.Tensor) and alpha.dim() and alpha.shape[0] == rows:
            alpha = alpha.repeat(2, *([1] * (alpha.dim() - 1)))
        both = Conditioning.cat([uncond, cond])
        eps = self._predict(torch.cat([z, z]), t, alpha, both, slice(rows, 2 * rows))
        return guided_noise(eps[:rows], eps[rows:], guidance)
