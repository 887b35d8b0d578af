"""What every section of the fleet spec shares (the base model, Secret references, name patterns):
apart from spec.py so the sections of third-party sources (sources.py) use them without a cycle.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AliasGenerator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# DNS-1123 label: Kubernetes object names built from these must stay valid.
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_SENSOR_NAME = r"^[a-z][a-z0-9_]{0,30}$"
# A Secret's name (DNS subdomain) and one of its keys.
_SECRET_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_SECRET_KEY = r"^[-._a-zA-Z0-9]+$"
_CRON_FIELD = r"^(\*|\*/\d+|\d+(-\d+)?(/\d+)?)(,(\*|\*/\d+|\d+(-\d+)?(/\d+)?))*$"


class SpecModel(BaseModel):
    """Base for every spec section: camelCase aliases, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=AliasGenerator(alias=to_camel),
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )


class SecretKeyRef(SpecModel):
    """One key of a Secret in the fleet's namespace. In Kubernetes the operator hands it to the pods
    that need it as a `secretKeyRef` environment variable: the value is never in a manifest, an
    argument or the fleet's status, and the operator itself never reads it. Local runs
    (`sensorfleet run`) ignore the reference and read the same environment variable."""

    name: Annotated[str, Field(pattern=_SECRET_NAME, max_length=253, description="Name of the Secret, in the fleet's namespace.")]
    key: Annotated[str, Field(pattern=_SECRET_KEY, max_length=253, description="Key within the Secret's data.")]


class CredentialsRef(SpecModel):
    """A username and a password, each from a Secret key (often the same Secret)."""

    username: Annotated[SecretKeyRef, Field(description="Secret key holding the username.")]
    password: Annotated[SecretKeyRef, Field(description="Secret key holding the password.")]


