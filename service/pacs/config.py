"""PACS endpoints are deployment configuration, never request input: a request names a configured server by
name, so no client can make the service fetch from (or write to) an address of its choosing (SSRF).

`MSTAR_PACS_SERVERS` is a JSON list of `PacsServer` objects (or `MSTAR_PACS_SERVERS_FILE`, a JSON file an
admin manages, e.g. a mounted secret). Each server belongs to one tenant; `public()` is what the admin API
shows: everything but the secrets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import InvalidParameterError, MstarError


class PacsNotConfiguredError(MstarError):
    code = "pacs_not_configured"
    http_status = 404


class PacsServer(BaseModel):
    """One DICOMweb server of one tenant."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    tenant: str = Field(min_length=1, max_length=64, description="the tenant whose jobs may use this server")
    url: str = Field(description="base URL, e.g. https://pacs.example.org")
    qido_prefix: str | None = Field("dicom-web", description="path under url for QIDO-RS")
    wado_prefix: str | None = Field("dicom-web", description="path under url for WADO-RS")
    stow_prefix: str | None = Field("dicom-web", description="path under url for STOW-RS")
    auth: Literal["none", "basic", "bearer"] = "none"
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    verify_tls: bool = True
    ca_bundle: Path | None = Field(None, description="PEM file of the CA that signed the server's certificate")
    connect_timeout_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0, description="per request: a PACS that hangs fails the job")
    stow_attempts: int = Field(4, ge=1, le=20, description="STOW-RS tries before the job fails")
    stow_backoff_s: float = Field(1.0, ge=0, description="first STOW retry delay; doubles per try")
    write_results: bool = Field(True, description="STOW the DICOM results into the source study")
    heatmap: Literal["seg", "pmap", "both"] = Field(
        "seg",
        description="heatmap objects written: FRACTIONAL Segmentation (8-bit, the widest viewer support), "
        "float Parametric Map (exact attention values), or both",
    )

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if not (v.startswith("http://") or v.startswith("https://")) or any(c.isspace() for c in v):
            raise ValueError("url must be an http(s):// URL")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> PacsServer:
        if self.auth == "basic" and (not self.username or self.password is None):
            raise ValueError(f"PACS {self.name!r}: basic auth needs username and password")
        if self.auth == "bearer" and self.token is None:
            raise ValueError(f"PACS {self.name!r}: bearer auth needs a token")
        return self

    def public(self) -> dict:
        """The configuration without secrets (what an admin may read back)."""
        return self.model_dump(mode="json", exclude={"password", "token"}) | {
            "has_password": self.password is not None,
            "has_token": self.token is not None,
        }


class FhirEndpoint(BaseModel):
    """Where finished reports are POSTed (optional), per tenant."""

    tenant: str
    url: str
    token: SecretStr | None = None
    verify_tls: bool = True
    timeout_s: float = Field(10.0, gt=0)
    attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(1.0, ge=0)


class PacsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MSTAR_PACS_", env_file=".env", extra="ignore")

    servers: list[PacsServer] = Field(default_factory=list, description="JSON list of DICOMweb servers")
    servers_file: Path | None = Field(None, description="JSON file with the same list (read at each use)")
    fhir_endpoints: list[FhirEndpoint] = Field(default_factory=list, description="JSON list of FHIR endpoints")
    max_frames: int = Field(200_000, gt=0, description="a series declaring more frames than this is refused")

    def all_servers(self) -> list[PacsServer]:
        servers = list(self.servers)
        if self.servers_file is not None:
            try:
                raw = json.loads(Path(self.servers_file).read_text())
            except (OSError, ValueError) as err:
                raise InvalidParameterError(f"MSTAR_PACS_SERVERS_FILE cannot be read ({type(err).__name__})") from err
            servers += [PacsServer.model_validate(x) for x in raw]
        return servers

    def server(self, tenant: str, name: str) -> PacsServer:
        """The tenant's server called `name`; another tenant's server is as unknown as a missing one."""
        for s in self.all_servers():
            if s.name == name and s.tenant == tenant:
                return s
        raise PacsNotConfiguredError(f"no PACS named {name!r} is configured for this tenant")

    def fhir_endpoint(self, tenant: str) -> FhirEndpoint | None:
        return next((f for f in self.fhir_endpoints if f.tenant == tenant), None)
