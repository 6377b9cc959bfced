"""Generate the ModelDeployment CRD from the pydantic models (``make crds``).

pydantic emits JSON Schema; a CRD needs a *structural* OpenAPI v3 schema: no ``$ref``, no
``anyOf`` with null (an optional field is simply not required), no ``additionalProperties:
false`` beside ``properties`` (the apiserver prunes or, with strict field validation, rejects
unknown fields instead), and int-or-string marked with ``x-kubernetes-int-or-string``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from modelpilot.api import v1alpha1 as api

_DROP = {"title", "additionalProperties", "$defs"}

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.conditions[?(@.type=='Ready')].status",
    },
    {
        "name": "Variant",
        "type": "string",
        "jsonPath": ".status.stages.inference.variant",
        "description": "Serving inference variant",
    },
    {"name": "Ingest", "type": "integer", "jsonPath": ".status.stages.ingestion.replicas"},
    {"name": "Embed", "type": "integer", "jsonPath": ".status.stages.embedding.replicas"},
    {"name": "Retrieve", "type": "integer", "jsonPath": ".status.stages.retrieval.replicas"},
    {"name": "Infer", "type": "integer", "jsonPath": ".status.stages.inference.replicas"},
    {
        "name": "P95ms",
        "type": "integer",
        "jsonPath": ".status.observedP95Ms",
        "description": "Observed end-to-end p95 latency (ms)",
    },
    {"name": "SLO", "type": "string", "jsonPath": ".status.conditions[?(@.type=='SLOMet')].status"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural OpenAPI v3 node."""
    node = dict(schema)
    while "$ref" in node or "anyOf" in node:
        if "$ref" in node:
            target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
            node = {**target, **node}  # sibling keys (description) win over the target's
        if "anyOf" in node:
            options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
            if node.get("x-kubernetes-int-or-string"):
                options = []
            elif len(options) == 1:
                node = {**options[0], **node}
            elif options:
                raise ValueError(f"unsupported union in schema: {options}")
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {k: structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = structural(value, defs)
        else:
            out[key] = value
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "properties" not in node:
        out["additionalProperties"] = structural(extra, defs)
        if extra == {}:  # dict[str, Any]
            out.pop("additionalProperties")
            out["x-kubernetes-preserve-unknown-fields"] = True
    # JSON Schema 2020 bounds are numbers; OpenAPI 3.0 wants minimum + a boolean flag.
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), int | float) and not isinstance(out[bound], bool):
            out[plain] = out.pop(bound)
            out[bound] = True
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition as a dict."""
    spec_schema = openapi_schema(api.ModelDeploymentSpec)
    status_schema = openapi_schema(api.ModelDeploymentStatus)
    status_schema.pop("required", None)
    schema = {
        "type": "object",
        "description": "A ModelDeployment is an ML serving pipeline (ingestion, embedding, "
        "retrieval, inference) that ModelPilot deploys and keeps tuning within its SLO, "
        "quality floor and cost budget.",
        "required": ["spec"],
        # Children are named <name>-<stage> and include Services: DNS-1035 labels of <= 63.
        "x-kubernetes-validations": [
            {
                "rule": "size(self.metadata.name) <= 53 && "
                "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                "message": "metadata.name must be a DNS-1035 label of at most 53 characters "
                "(children are named <name>-<stage>)",
            }
        ],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{api.PLURAL}.{api.GROUP}",
            "labels": {
                "app.kubernetes.io/name": "modelpilot",
                "app.kubernetes.io/component": "crd",
            },
        },
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["modelpilot"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


HEADER = "# Generated by `make crds` from operator/modelpilot/api/v1alpha1.py; do not edit.\n"
CHART_HEADER = (
    "{{- if .Values.crds.enabled }}\n"
    "# Generated by `make crds` from operator/modelpilot/api/v1alpha1.py; do not edit.\n"
)


REF_START = "<!-- crd-reference:start (generated by make crds) -->"
REF_END = "<!-- crd-reference:end -->"


def reference_table(schema: dict[str, Any], prefix: str = "spec") -> list[str]:
    """Markdown rows (field, type, default, description) for every field under ``schema``."""
    rows: list[str] = []
    required = set(schema.get("required", []))
    for name, prop in schema.get("properties", {}).items():
        path = f"{prefix}.{name}"
        kind = prop.get("type") or (
            "int-or-string" if prop.get("x-kubernetes-int-or-string") else "object"
        )
        if kind == "array":
            kind = f"[]{(prop.get('items') or {}).get('type', 'object')}"
        if "enum" in prop:
            kind = " \\| ".join(str(e) for e in prop["enum"])
        default = (
            json.dumps(prop["default"])
            if "default" in prop
            else ("required" if name in required else "")
        )
        desc = " ".join(str(prop.get("description", "")).split()).replace("|", "\\|")
        rows.append(f"| `{path}` | {kind} | {default} | {desc} |")
        rows += reference_table(prop, path)
        if isinstance(prop.get("items"), dict):
            rows += reference_table(prop["items"], f"{path}[]")
    return rows


def readme_with_reference(readme: str) -> str:
    """README.md with the generated spec reference between its markers."""
    spec = openapi_schema(api.ModelDeploymentSpec)
    table = "\n".join(
        [
            "| field | type | default | description |",
            "| --- | --- | --- | --- |",
            *reference_table(spec),
        ]
    )
    start, end = readme.find(REF_START), readme.find(REF_END)
    if start < 0 or end < 0:
        return readme
    return readme[: start + len(REF_START)] + "\n" + table + "\n" + readme[end:]


def render_files(root: Path) -> dict[Path, str]:
    """Every generated file and its content: the plain CRD, the chart's templated copy and
    the README's field reference."""
    body = yaml.safe_dump(crd(), sort_keys=False, width=100)
    chart_doc = crd()
    chart_doc["metadata"]["annotations"] = {"__KEEP__": "x"}
    chart_body = yaml.safe_dump(chart_doc, sort_keys=False, width=100).replace(
        "    __KEEP__: x\n",
        "    {{- if .Values.crds.keep }}\n    helm.sh/resource-policy: keep\n    {{- end }}\n",
    )
    files = {
        root / "crds" / "modeldeployment.yaml": HEADER + body,
        root / "charts" / "modelpilot" / "templates" / "crd-modeldeployment.yaml": CHART_HEADER
        + chart_body
        + "{{- end }}\n",
    }
    readme = root / "README.md"  # its CRD reference section, between the markers
    if readme.exists():
        files[readme] = readme_with_reference(readme.read_text())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, default=Path.cwd())
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a generated file differs from what is committed",
    )
    args = parser.parse_args(argv)
    stale = []
    for path, content in render_files(args.root).items():
        if args.check:
            if not path.exists() or path.read_text() != content:
                stale.append(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    for path in stale:
        print(f"{path} is stale: run `make crds`", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
