"""Latency as a budget: the clock a budget is judged by (runtime, file type, threads, machine),
a latency model of a channel space fitted on whole models timed on it, and its cache."""
from compress.latency.build import build_latency_model, cached_latency_model
from compress.latency.clock import Clock
from compress.latency.model import LatencyModel
from compress.settings import LutSettings


def clock_of(settings: LutSettings, device: str = "local") -> Clock:
    """The clock `settings` describe."""
    return Clock(settings.runtime, settings.threads, settings.int8, device, settings.runs, settings.warmup)


__all__ = ["Clock", "LatencyModel", "build_latency_model", "cached_latency_model", "clock_of"]
