"""GET /health (the process and its engine loops are alive) and GET /ready (models loaded, warm, accepting)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from service.registry import ServedModel
from service.schemas.common import HealthResponse

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> JSONResponse:
    """Liveness: 200 while the process and every engine loop are alive; 503 names a dead engine."""
    models: dict[str, ServedModel] = getattr(request.app.state, "models", {})
    states = {name: ("dead: " + m.engine.dead) if m.engine.dead else "ok" for name, m in models.items()}
    ok = all(v == "ok" for v in states.values())
    return JSONResponse(HealthResponse(status="ok" if ok else "unhealthy", models=states).model_dump(),
                        200 if ok else 503)


@router.get("/ready", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def ready(request: Request) -> JSONResponse:
    """Readiness: 200 once the models are loaded and warm; 503 before that and while draining."""
    models: dict[str, ServedModel] = getattr(request.app.state, "models", {})
    draining = getattr(request.app.state, "draining", False)
    ok = bool(models) and getattr(request.app.state, "ready", False) and not draining and not any(
        m.engine.dead for m in models.values())
    status = "ready" if ok else ("draining" if draining else "not ready")
    return JSONResponse(HealthResponse(status=status, models={n: "ready" if ok else status for n in models}).model_dump(),
                        200 if ok else 503)
