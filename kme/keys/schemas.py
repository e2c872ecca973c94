"""The spec's data formats (§6, T9 to T13), with the spec's field names.

Request models are tolerant of unknown members (spec/clients.md item 5) and strict about
types: JSON `"3"` is not an integer. Response models keep key material out of reprs.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

ExtensionList = list[dict[str, Any]]


class KeyRequest(BaseModel):
    """Key request (§6.2 T10). Every field is optional; `{}` is a default request."""

    model_config = ConfigDict(extra="ignore")

    number: StrictInt | None = Field(default=None, description="Number of keys, default 1")
    size: StrictInt | None = Field(
        default=None, description="Size of each key in bits, default Status.key_size"
    )
    additional_slave_SAE_IDs: list[StrictStr] | None = Field(
        default=None, description="Further slave SAEs that receive the same keys"
    )
    extension_mandatory: ExtensionList | None = None
    extension_optional: ExtensionList | None = None


class KeyIDEntry(BaseModel):
    model_config = ConfigDict(extra="ignore")

    key_ID: StrictStr
    key_ID_extension: dict[str, Any] | None = None


class KeyIDs(BaseModel):
    """Key IDs (§6.4 T12)."""

    model_config = ConfigDict(extra="ignore")

    key_IDs: list[KeyIDEntry] = Field(min_length=1)
    key_IDs_extension: dict[str, Any] | None = None


class KeyOut(BaseModel):
    key_ID: str = Field(description="UUID (lowercase canonical text)")
    key: str = Field(repr=False, description="Key material, standard padded base64")
    key_ID_extension: dict[str, Any] | None = None
    key_extension: dict[str, Any] | None = None


class KeyContainer(BaseModel):
    """Key container (§6.3 T11)."""

    keys: list[KeyOut]
    key_container_extension: dict[str, Any] | None = None


class Status(BaseModel):
    """Status (§6.1 T9); sizes in bits."""

    source_KME_ID: str
    target_KME_ID: str
    master_SAE_ID: str
    slave_SAE_ID: str
    key_size: int
    stored_key_count: int
    max_key_count: int
    max_key_per_request: int
    max_key_size: int
    min_key_size: int
    max_SAE_ID_count: int
    status_extension: dict[str, Any] | None = None


class Error(BaseModel):
    """Error (§6.5 T13)."""

    message: str
    details: list[dict[str, Any]] | None = None
