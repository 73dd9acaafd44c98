"""Serving many requests on one model (lab 30): engine and batching policies, HTTP server, load.

- `engine`: `Engine`, `Request`; the static, dynamic and continuous policies.
- `server`: `create_app`, an OpenAI-compatible FastAPI app; `python -m labsupport.serving` runs it.
"""

from .engine import POLICIES, Engine, Request, StepRecord

__all__ = ["POLICIES", "Engine", "Request", "StepRecord"]
