"""flowdppo: online RL for flow-matching generators (Flow-DPPO and its baselines Flow-GRPO,
Flow-CPS, GRPO-Guard and DiffusionNFT)."""

__version__ = "0.1.0"
