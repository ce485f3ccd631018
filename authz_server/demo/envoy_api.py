"""The typed Envoy API the kit builds configs from: ``envoy-data-plane``'s dataclasses, packed,
merged and written as Envoy reads them.

``envoy-data-plane`` (betterproto2 + pydantic) generates one dataclass per message of Envoy's
data-plane API, so a config is checked while it is built: an unknown field name is a
``ValidationError`` naming the message and the field, and so is a value of the wrong shape (a
string for a message, a list for a scalar, a negative ``uint32``). Pydantic validates in its lax
mode, so a numeric string still passes as a number; Envoy's ``--mode validate`` catches what is
left (``tests/e2e/test_envoy_configs.py`` loads every generated config into Envoy 1.40).

Fit for Envoy 1.40 (checked by that test against the descriptors compiled into the Envoy binary):
every field the package declares on the messages the kit uses has Envoy 1.40's name, number and
type. The package (2.2.0) trails 1.40 by a few fields the kit does not use, such as ext_authz's
``emit_client_span`` and ``clear_route_cache_headers``, jwt_authn's ``JwtClaimToHeader.claim_path``
and ``SetCurrentClientCertDetails.issuer``; a config needing one of them cannot be built with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import betterproto2
import yaml
from envoy_data_plane.google.protobuf import Any

M = TypeVar("M", bound=betterproto2.Message)


def pack(message: betterproto2.Message) -> Any:
    """*message* as a ``google.protobuf.Any`` (``@type`` = its Envoy type URL)."""
    return Any.pack(message)


def merge_patch(base: M, patch: M) -> M:
    """Protobuf merge semantics, as Istio applies an EnvoyFilter MERGE: set fields of *patch*
    replace scalars, merge into messages field by field, append to repeated fields and replace map
    entries by key; a oneof member set in *patch* replaces whichever member *base* had. An ``Any``
    merges its contents when both hold the same type (Istio's ``MergeAnyWithAny``), else fails.

    Not ``parse(bytes(base) + bytes(patch))``: betterproto2 replaces a message that occurs twice
    on the wire instead of merging it.
    """
    if type(base) is not type(patch):
        raise TypeError(f"cannot merge {type(patch).__name__} into {type(base).__name__}")
    if isinstance(base, Any):
        if base.type_url != patch.type_url:
            raise ValueError(f"cannot merge {patch.type_url} into {base.type_url}")
        return pack(merge_patch(base.unpack(), patch.unpack()))  # type: ignore[return-value]
    meta = type(base)._betterproto
    values = {name: getattr(base, name) for name in meta.sorted_field_names}
    for name, field in meta.meta_by_field_name.items():
        new, old = getattr(patch, name), values[name]
        if field.map_meta is not None:
            values[name] = {**old, **new}
        elif field.repeated:
            values[name] = [*old, *new]
        elif new is None or (not (field.optional or field.group) and new == patch._get_field_default(name)):
            continue  # not set in the patch
        else:
            for member in meta.oneof_field_by_group.get(field.group or "", ()):
                values[member.name] = None
            same_message = isinstance(new, betterproto2.Message) and type(old) is type(new)
            values[name] = merge_patch(old, new) if same_message else new
    return type(base)(**values)


def to_dict(message: betterproto2.Message) -> dict:
    """The proto3 JSON form Envoy reads, with the API's own snake_case field names."""
    return message.to_dict(casing=betterproto2.Casing.SNAKE)


def write_config(config: betterproto2.Message, path: Path) -> Path:
    """Write *config* as YAML (Envoy picks the format from the ``.yaml`` suffix)."""
    path = Path(path)
    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    return path
