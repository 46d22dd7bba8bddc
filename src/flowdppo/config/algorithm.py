"""Algorithm names: the presets, their objective and kernel, and ``OBJECTIVE+KERNEL`` forms."""

from __future__ import annotations

OBJECTIVES = {
    "dppo": "dppo",
    "grpo": "clip",
    "clip": "clip",
    "cps": "clip",
    "dance": "clip",
    "guard": "guard",
    "nft": "nft",
}
KERNEL_OF_PRESET = {
    "dppo": "flow",
    "grpo": "flow",
    "clip": "flow",
    "cps": "cps",
    "dance": "dance",
    "guard": "flow",
    # DiffusionNFT's public recipe samples deterministically (config/nft.py of NVlabs/
    # DiffusionNFT: sample.deterministic = True); nft+flow explores with Flow-SDE steps.
    "nft": "ode",
}
KERNELS = ("flow", "cps", "dance")
#: The six methods of the paper's comparison table.
PAPER_ALGORITHMS = ("dppo", "grpo", "cps", "guard", "nft", "dppo+cps")


def parse_algorithm(name: str) -> tuple[str, str]:
    """``"dppo+cps"`` -> ``("dppo", "cps")``: the objective and the kernel."""
    head, _, kernel = name.partition("+")
    kernels = KERNELS + (("ode",) if head == "nft" else ())
    if head not in OBJECTIVES or (kernel and kernel not in kernels):
        raise ValueError(
            f"unknown algorithm {name!r}: use one of {', '.join(PAPER_ALGORITHMS)} (the "
            f"paper's six), dance, or OBJECTIVE+KERNEL with OBJECTIVE in (dppo, clip, guard, "
            f"nft) and KERNEL in {KERNELS} (nft also ode), e.g. guard+cps"
        )
    return OBJECTIVES[head], kernel or KERNEL_OF_PRESET[head]
