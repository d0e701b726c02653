"""Protocols (TOML files shipped in excise/bench/protocols/) and the runner behind ``excise bench``."""

from .runner import evaluate, list_protocols, load_protocol, run_bench

__all__ = ["evaluate", "list_protocols", "load_protocol", "run_bench"]
