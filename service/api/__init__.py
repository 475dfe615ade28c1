"""FastAPI gateway: `create_app(settings)` builds it; routers per resource under `service.api.routers`."""

from service.api.app import create_app

__all__ = ["create_app"]
