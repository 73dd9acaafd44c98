"""Serving many requests on one model (lab 30): engine and batching policies, HTTP server, load.

- `engine`: `Engine`, `Request`; the static, dynamic and continuous policies.
- `server`: `create_app`, an OpenAI-compatible FastAPI app; `python -m labsupport.serving` runs it.
- `load`: `Workload` (skewed prompt and output lengths) and `run_load` (Poisson arrivals or a fixed
  concurrency against any OpenAI-compatible URL; TTFT, TPOT and end-to-end percentiles).
- `process`: `serve(...)`, the server in a subprocess on a free loopback port for a `with` block.
"""

from .engine import POLICIES, Engine, Request, StepRecord, near_tie_gap

__all__ = ["POLICIES", "Engine", "Request", "StepRecord", "near_tie_gap"]
