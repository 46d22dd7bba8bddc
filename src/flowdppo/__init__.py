"""flowdppo: online RL for flow-matching generators (Flow-DPPO, Flow-GRPO, Flow-CPS)."""

__version__ = "0.1.0"
