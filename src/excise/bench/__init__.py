"""Protocols (TOML files shipped in excise/bench/protocols/) and the runner behind ``excise bench``."""

from ..protocol import list_protocols, load_protocol
from .runner import evaluate, run_bench

__all__ = ["evaluate", "list_protocols", "load_protocol", "run_bench"]
