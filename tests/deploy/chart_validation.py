"""Render the Helm chart offline and validate what it produces.

* rendering: helm-python-sdk (Helm's own Go engine, no helm binary, no cluster);
* core Kubernetes kinds: kubernetes-validate with strict schemas (unknown fields rejected);
* Istio kinds: the openAPIV3Schema of Istio's CRDs (data/istio-crds.yaml), read with the API
  server's structural-schema rules, including the CEL `x-kubernetes-validations` cel-python can run;
* mesh config snippets: data/meshconfig.schema.json.
"""
from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import celpy
import helm_python
import jsonschema
import kubernetes_validate
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "istio-ext-authz"
DATA = Path(__file__).resolve().parent / "data"
KUBE_VERSION = "1.36"  # Helm 4.2's default .Capabilities.KubeVersion


class StrictLoader(yaml.SafeLoader):
    """Rejects duplicate keys, which kubectl/Helm's strict decoders also reject (PyYAML keeps the last)."""


def _mapping(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=True) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dupes)}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def render(values: dict, namespace: str = "istio-ext-authz", release: str = "authz") -> tuple[list[dict], str]:
    """Returns (objects, NOTES.txt) as `helm install` would create them."""
    rendered = helm_python.Chart.load(CHART).render(values, name=release, namespace=namespace, is_install=True)
    objects, notes = [], ""
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects += [d for d in yaml.load_all(text, Loader=StrictLoader) if d]
    return objects, notes


def load_values(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


# --------------------------------------------------------------------------- Istio CRDs


def _to_jsonschema(node: dict, structural: bool = True) -> dict:
    """Kubernetes structural schema -> JSON Schema: objects with `properties` reject unknown fields
    (unless x-kubernetes-preserve-unknown-fields), nullable/int-or-string become JSON types.
    Nodes under anyOf/oneOf/not only constrain values, so they get no additionalProperties."""
    out = {}
    for key, sub in node.items():
        if key == "properties":
            out[key] = {k: _to_jsonschema(v, structural) for k, v in sub.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(sub, dict):
            out[key] = _to_jsonschema(sub, structural and key != "not")
        elif key in ("anyOf", "oneOf", "allOf"):
            out[key] = [_to_jsonschema(s, False) for s in sub]
        elif not key.startswith("x-kubernetes-") and key not in ("nullable", "description", "format"):
            out[key] = sub
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if structural and "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    return out


@cache
def _crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> openAPIV3Schema of that served version."""
    out = {}
    for crd in yaml.safe_load_all((DATA / "istio-crds.yaml").read_text()):
        spec = crd["spec"]
        for ver in spec["versions"]:
            if ver.get("served"):
                out[(f"{spec['group']}/{ver['name']}", spec["names"]["kind"])] = ver["schema"]["openAPIV3Schema"]
    return out


def is_istio_kind(obj: dict) -> bool:
    return obj["apiVersion"].split("/")[0].endswith(".istio.io")


@cache
def _cel():
    return celpy.Environment()


def _cel_errors(schema: dict, value, path: str) -> list[str]:
    """Evaluates the x-kubernetes-validations rules along the value. A rule that is false, or fails
    at run time, rejects the object as in the API server; rules calling a Kubernetes CEL library
    function that cel-python lacks (url(), substring()) are skipped ("undeclared reference")."""
    errors = []
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        for k, v in value.items():
            if (sub := props.get(k, extra)) is not None:
                errors += _cel_errors(sub, v, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += _cel_errors(schema["items"], v, f"{path}[{i}]")
    for rule in schema.get("x-kubernetes-validations", []):
        env = _cel()
        try:
            ok = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})
        except celpy.CELEvalError as e:
            if "undeclared reference" in str(e):
                continue
            ok = False
        if not (isinstance(ok, celpy.celtypes.BoolType) and ok):
            errors.append(f"{path}: {rule.get('message') or rule['rule']}")
    return errors


def istio_errors(obj: dict) -> list[str]:
    raw = _crds().get((obj["apiVersion"], obj["kind"]))
    if raw is None:
        return [f"no CRD schema for {obj['apiVersion']} {obj['kind']}"]
    schema = _to_jsonschema(copy.deepcopy(raw))
    # The CRD schema leaves out the type and object metadata, which the API server checks itself.
    schema["properties"].update(apiVersion={"type": "string"}, kind={"type": "string"},
                                metadata={"type": "object", "required": ["name"]})
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    return errors + _cel_errors(raw, obj, obj["kind"])


# --------------------------------------------------------------------------- core kinds, mesh config


def core_errors(obj: dict) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path))}: {e.message}"]
    return []


@cache
def _mesh_validator():
    return jsonschema.Draft202012Validator(json.loads((DATA / "meshconfig.schema.json").read_text()))


def mesh_errors(mesh: dict) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in _mesh_validator().iter_errors(mesh)]


def validate(obj: dict) -> list[str]:
    return istio_errors(obj) if is_istio_kind(obj) else core_errors(obj)
