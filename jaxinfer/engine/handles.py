"""The handle a decode call returns: sampled tokens still on the device until read."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxinfer.engine.sampling import Sampled
from jaxinfer.engine.types import SlotToken


class StepResult:
    """Handle of a dispatched decode call; ``result()`` (one step) and
    ``results()`` (every step of a multi-step call) block."""

    def __init__(self, out: Sampled, rows: Sequence[int], want_top: dict[int, int], steps: int):
        self._out, self._rows, self._want_top, self._steps = out, list(rows), want_top, steps

    def result(self) -> dict[int, SlotToken]:
        if self._steps > 1:
            raise ValueError(f"a {self._steps}-step decode call: use results()")
        return self.results()[0]

    def results(self) -> list[dict[int, SlotToken]]:
        lead = (lambda a: np.asarray(a)) if self._steps > 1 else (lambda a: np.asarray(a)[None])  # noqa: E731
        token, lp = lead(self._out.token), lead(self._out.logprob)
        need_top = any(self._want_top.get(r, 0) for r in self._rows)
        top_ids = lead(self._out.top_ids) if need_top else None
        top_lp = lead(self._out.top_logprobs) if need_top else None
        out = []
        for i in range(token.shape[0]):
            res = {}
            for j, r in enumerate(self._rows):
                n = self._want_top.get(r, 0)
                res[r] = SlotToken(int(token[i, j]), float(lp[i, j]),
                                   tuple(int(x) for x in top_ids[i, j, :n]) if n else (),
                                   tuple(float(x) for x in top_lp[i, j, :n]) if n else ())
            out.append(res)
        return out
