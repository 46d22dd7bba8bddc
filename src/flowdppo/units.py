"""The one unit every KL to the reference is shown in: per SDE step, x 1e-3.

The KL to the reference model is exact at each SDE step of a sample (a Gaussian KL,
averaged over the sample's latent elements with the default ``sampler.log_prob_reduce:
mean``, summed with ``sum``) and averaged over the steps and samples: the metric
``kl_ref/mean`` (``eval/<split>/kl_ref/mean`` at evaluations). Every surface a user reads
shows that number divided by 1e-3, to three significant digits, as the paper's tables do:
the progress lines, the table ``train`` ends with and ``flowdppo eval`` prints, the
trust-region line at the start (Flow-DPPO's threshold is a KL in the same unit), the
report and ``flowdppo compare``'s tables and plots. The sum along the path
(``kl_ref/path``) stays in ``metrics.jsonl`` and ``summary.json`` and is shown nowhere
without that label (docs/method.md, "Units").

Nothing but the standard library: the command line reads it before torch.
"""

from __future__ import annotations

import math

KL_UNIT = 1e-3
#: The unit as a heading shows it: ``KL to ref (1e-3/step)``.
KL_LABEL = "1e-3/step"
#: The unit as a sentence, for the notes under tables.
KL_SENTENCE = (
    "KL to the reference is in 1e-3 per SDE step (the exact KL at each SDE step, averaged "
    "over the steps; docs/method.md, Units)"
)


def kl_shown(kl: float) -> str:
    """A KL in nats per step as every table shows it: x 1e-3, three significant digits
    (0.02889 -> ``28.9``)."""
    return f"{kl / KL_UNIT:.3g}"


def kl_inline(kl: float) -> str:
    """The same number with its unit, for running text and progress lines
    (0.02889 -> ``28.9e-3/step``; 7.8e-8 -> ``0.000078e-3/step``, still in the unit); a KL
    of a nat or more per step is written whole."""
    shown = kl_shown(kl)
    if kl == 0:
        return "0"
    if not math.isfinite(kl) or abs(kl) >= 1000 * KL_UNIT:
        return f"{kl:.3g}/step"
    if "e" in shown:  # below 1e-4 of the unit: fixed point, three significant digits
        digits = 2 - math.floor(math.log10(abs(kl / KL_UNIT)))
        shown = f"{kl / KL_UNIT:.{digits}f}".rstrip("0")
    return f"{shown}e-3/step"
