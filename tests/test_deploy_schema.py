"""deploy/ against the schemas the API server enforces, without a cluster or kubectl.

* Every ``ray.io`` object (RayCluster, RayJob, RayCronJob) is validated against the
  ``openAPIV3Schema`` of the matching version in KubeRay's own CRDs (vendored in deploy/crds/, see
  its README). The CRD schema is a Kubernetes *structural* schema, turned into a JSON Schema here:

  - unknown fields are errors (``additionalProperties: false`` wherever the schema lists
    ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields``
    allows more): ``kubectl apply`` (strict server-side field validation) rejects them, and
    without strict validation the API server silently drops them, which is worse;
  - ``x-kubernetes-int-or-string`` accepts an integer or a string; ``x-kubernetes-preserve-unknown-fields``
    keeps any field; ``x-kubernetes-embedded-resource`` requires ``apiVersion`` and ``kind`` and allows
    ``metadata``; ``nullable`` allows null; ``format: int32/int64`` bounds integers;
  - ``x-kubernetes-list-type: map`` items must be unique by their ``x-kubernetes-list-map-keys``
    (``set``: unique items), as the API server requires;
  - ``x-kubernetes-validations`` CEL rules are evaluated with a real CEL implementation (the
    ``common-expression-language`` package); transition rules (those naming ``oldSelf``) only apply
    to updates and are skipped;
  - the top-level ``metadata`` is the Kubernetes ObjectMeta (from the schemas below).

* Every core object (ServiceAccount, Role, RoleBinding, CronJob, ...) and every ConfigMap that a
  kustomization's ``configMapGenerator`` makes is validated against the Kubernetes OpenAPI schemas
  shipped by the ``kubernetes-validate`` package (strict variant: unknown fields are errors), for the
  oldest Kubernetes deploy/README.md supports and the newest the package has.

Errors name the file, the object and the field path (``spec.workerGroupSpecs[0].replicas``); the
mutation tests below show that a misspelt, misplaced or mistyped field fails with its path.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.resources
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
CRD_DIR = DEPLOY / "crds"
SHARED_CRDS = REPO.parent / "shared" / "kuberay-crds"
# deploy/README.md: Kubernetes 1.27 or newer (the CronJob's timeZone); the newest schemas the package has.
K8S_VERSIONS = ("1.27", "latest")
NOT_MANIFESTS = {"crds", "configs", "helm"}  # folders under deploy/ whose YAML is not a Kubernetes object
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# --------------------------------------------------------------------------- the documents


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml")
                  if not NOT_MANIFESTS & set(p.relative_to(DEPLOY).parts[:-1]))


def documents() -> list[tuple[str, dict]]:
    """``(path relative to deploy/, document)`` for every YAML document of every manifest file."""
    out = []
    for path in manifest_files():
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):
            if doc is not None:
                out.append((str(path.relative_to(DEPLOY)), doc))
    return out


def generated_configmaps() -> list[tuple[str, dict]]:
    """The ConfigMaps each kustomization's configMapGenerator makes, as kustomize builds them
    (``files:`` entries become keys named by the file's basename, or ``key=path``)."""
    out = []
    for path in sorted(DEPLOY.rglob("kustomization.yaml")):
        kust = yaml.load(path.read_text(), Loader=_Loader)
        hashed = not (kust.get("generatorOptions") or {}).get("disableNameSuffixHash", False)
        for gen in kust.get("configMapGenerator") or []:
            data = {}
            for entry in gen.get("files", []):
                key, _, rel = entry.rpartition("=") if "=" in entry else (Path(entry).name, "", entry)
                data[key] = (path.parent / rel).read_text()
            for literal in gen.get("literals", []):
                key, _, value = literal.partition("=")
                data[key] = value
            name = gen["name"] + ("-<hash>" if hashed else "")
            meta = {"name": name}
            if gen.get("namespace") or kust.get("namespace"):
                meta["namespace"] = gen.get("namespace") or kust["namespace"]
            out.append((f"{path.relative_to(DEPLOY)} configMapGenerator {gen['name']}",
                        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}))
    return out


# --------------------------------------------------------------------------- CRD schema -> JSON Schema

_COPIED = ("type", "enum", "pattern", "minLength", "maxLength", "minimum", "maximum", "minItems", "maxItems",
           "uniqueItems", "required", "format", "minProperties", "maxProperties", "multipleOf", "default")
OBJECT_META = "https://kubernetes.io/api/_definitions.json#/$defs/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def structural_to_jsonschema(node: dict, top: bool = True) -> dict:
    """A CRD's structural (OpenAPI v3) schema as a JSON Schema (draft 2020-12) with the Kubernetes
    extensions made explicit (see the module docstring). ``top``: the object's root, whose
    ``metadata`` is ObjectMeta."""
    out: dict = {k: node[k] for k in _COPIED if k in node}
    # OpenAPI 3.0's boolean exclusiveMinimum/Maximum -> draft 2020-12's numeric form
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if node.get(bound) is True and limit in node:
            out[bound] = out.pop(limit)
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    for combinator in ("allOf", "anyOf", "oneOf"):
        if combinator in node and not node.get("x-kubernetes-int-or-string"):
            out[combinator] = [structural_to_jsonschema(s, False) for s in node[combinator]]
    if "not" in node:
        out["not"] = structural_to_jsonschema(node["not"], False)
    if "items" in node:
        out["items"] = structural_to_jsonschema(node["items"], False)
    if node.get("x-kubernetes-list-type") == "map":
        out["x-list-map-keys"] = node.get("x-kubernetes-list-map-keys", [])
    elif node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    props = dict(node.get("properties", {}))
    embedded = node.get("x-kubernetes-embedded-resource", False)
    if embedded:  # an embedded object: apiVersion and kind are required, metadata is allowed
        props.setdefault("apiVersion", {"type": "string"})
        props.setdefault("kind", {"type": "string"})
        props.setdefault("metadata", {"type": "object", "x-kubernetes-preserve-unknown-fields": True})
        out["required"] = sorted(set(out.get("required", [])) | {"apiVersion", "kind"})
    if props:
        out["properties"] = {}
        for key, sub in props.items():
            if top and key == "metadata":
                out["properties"][key] = {"$ref": OBJECT_META}
            else:
                out["properties"][key] = structural_to_jsonschema(sub, False)
    if "additionalProperties" in node:
        extra = node["additionalProperties"]
        out["additionalProperties"] = extra if isinstance(extra, bool) else structural_to_jsonschema(extra, False)
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # unknown fields: rejected (strict) or pruned by the API server
    if node.get("x-kubernetes-validations"):
        out["x-cel"] = node["x-kubernetes-validations"]
    return out


def _list_map_keys(validator, keys, instance, schema):
    if not isinstance(instance, list) or not keys:
        return
    seen: dict = {}
    for i, item in enumerate(instance):
        if not isinstance(item, dict):
            continue
        missing = [k for k in keys if k not in item and "default" not in
                   (schema.get("items", {}).get("properties", {}).get(k, {}))]
        if missing:
            yield jsonschema.ValidationError(f"[{i}] lacks the list-map key(s) {missing}")
            continue
        ident = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
        if ident in seen:
            yield jsonschema.ValidationError(
                f"[{i}] duplicates [{seen[ident]}] on the list-map key(s) {', '.join(keys)}")
        seen.setdefault(ident, i)


def _cel(validator, rules, instance, schema):
    import cel

    for rule in rules:
        expression = rule["rule"]
        if re.search(r"\boldSelf\b", expression):
            continue  # a transition rule: only checked on update
        try:
            ok = cel.evaluate(expression, {"self": instance})
        except Exception as exc:  # noqa: BLE001 - report, not crash
            yield jsonschema.ValidationError(f"CEL rule {expression!r} could not be evaluated: {exc}")
            continue
        if ok is not True:
            yield jsonschema.ValidationError(rule.get("message") or f"failed CEL rule: {expression}")


def _int_format(bits: int):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return lambda value: not isinstance(value, int) or isinstance(value, bool) or lo <= value <= hi


FORMATS = jsonschema.FormatChecker()
FORMATS.checks("int32")(_int_format(32))
FORMATS.checks("int64")(_int_format(64))
KubeValidator = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                             {"x-list-map-keys": _list_map_keys, "x-cel": _cel})


# --------------------------------------------------------------------------- schema sources


@functools.lru_cache(maxsize=None)
def k8s_schema_dir(version: str):
    """kubernetes-validate's strict JSON schemas for a Kubernetes minor version ('latest': newest)."""
    root = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    dirs = {m.group(1): d for d in root.iterdir()
            if (m := re.fullmatch(r"v(\d+\.\d+)\.\d+-local-strict", d.name))}
    if version == "latest":
        version = max(dirs, key=lambda v: tuple(map(int, v.split("."))))
    assert version in dirs, f"kubernetes-validate has no schemas for Kubernetes {version}: {sorted(dirs)}"
    return dirs[version]


@functools.lru_cache(maxsize=None)
def k8s_registry(version: str) -> Registry:
    definitions = json.loads((k8s_schema_dir(version) / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


@functools.lru_cache(maxsize=None)
def crd_schemas() -> dict[tuple[str, str, str], dict]:
    """``(group, version, kind) -> JSON Schema`` for every served version of the vendored CRDs."""
    out = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        assert crd["kind"] == "CustomResourceDefinition", path
        for v in crd["spec"]["versions"]:
            if v.get("served", True):
                out[(crd["spec"]["group"], v["name"], crd["spec"]["names"]["kind"])] = \
                    structural_to_jsonschema(v["schema"]["openAPIV3Schema"])
    return out


def _path(error: jsonschema.ValidationError) -> str:
    parts = ""
    for p in error.absolute_path:
        parts += f"[{p}]" if isinstance(p, int) else (f".{p}" if parts else str(p))
    return parts or "(root)"


def _describe(error: jsonschema.ValidationError) -> list[str]:
    """One line per problem; an unknown field is reported at its own path, as kubectl does."""
    path = _path(error)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        extra = [k for k in error.instance if k not in known]
        if extra:
            return [f"{path + '.' if path != '(root)' else ''}{k}: unknown field" for k in extra]
    if error.validator in ("anyOf", "oneOf") and error.context:
        # name the deepest cause (e.g. a wrong type inside an int-or-string)
        best = jsonschema.exceptions.best_match(error.context)
        return [f"{path}: {best.message}"]
    return [f"{path}: {error.message}"]


def schema_errors(doc: dict, k8s_version: str = K8S_VERSIONS[0]) -> list[str]:
    """Every schema violation of one Kubernetes object (empty: valid). ray.io objects against
    KubeRay's CRDs, everything else against the Kubernetes OpenAPI schemas."""
    api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
    group, _, version = api_version.rpartition("/")
    if group == "ray.io":
        schema = crd_schemas().get((group, version, kind))
        if schema is None:
            served = sorted(f"{g}/{v} {k}" for g, v, k in crd_schemas())
            return [f"(root): {api_version} {kind} is not served by the vendored KubeRay CRDs ({served})"]
    else:
        short = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)  # rbac.authorization.k8s.io/v1 -> rbac-v1
        path = k8s_schema_dir(k8s_version) / f"{kind.lower()}-{short}.json"
        if not path.is_file():
            return [f"(root): no Kubernetes {k8s_version} schema for {api_version} {kind}"]
        schema = json.loads(path.read_text())
    validator = KubeValidator(schema, registry=k8s_registry(k8s_version), format_checker=FORMATS)
    errors = sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path])
    return [line for e in errors for line in _describe(e)]


def k8s_objects():
    return [(name, doc) for name, doc in documents() if not doc.get("apiVersion", "").startswith("kustomize.")] \
        + generated_configmaps()


def _id(value):
    if isinstance(value, str):
        return value
    return f"{value.get('kind')}/{value.get('metadata', {}).get('name') or value.get('metadata', {}).get('generateName')}"


# --------------------------------------------------------------------------- the tests


def test_the_vendored_crds_are_kuberays_and_match_shared():
    kinds = {kind for _, _, kind in crd_schemas()}
    assert kinds == {"RayCluster", "RayJob", "RayCronJob"}
    if SHARED_CRDS.is_dir():  # in a checkout beside the project's shared/: the copies have not drifted
        for path in sorted(SHARED_CRDS.glob("*.yaml")):
            ours = CRD_DIR / path.name
            assert ours.is_file(), f"{path.name} is in {SHARED_CRDS} but not in deploy/crds/"
            assert hashlib.sha256(ours.read_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest(), \
                f"deploy/crds/{path.name} differs from {path}: cp {SHARED_CRDS}/*.yaml deploy/crds/"


def test_every_deploy_object_is_covered():
    kinds = {doc["kind"] for _, doc in k8s_objects()}
    assert {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount", "Role", "RoleBinding",
            "ConfigMap"} <= kinds, kinds


@pytest.mark.parametrize("k8s_version", K8S_VERSIONS)
@pytest.mark.parametrize("name,doc", k8s_objects(), ids=lambda v: _id(v) if isinstance(v, dict) else v)
def test_object_matches_its_schema(name, doc, k8s_version):
    if doc["apiVersion"].startswith("ray.io/") and k8s_version != K8S_VERSIONS[0]:
        pytest.skip("CRD objects do not depend on the Kubernetes version (only their ObjectMeta)")
    errors = schema_errors(doc, k8s_version)
    assert not errors, f"{name}: {_id(doc)} (Kubernetes {k8s_version}):\n  " + "\n  ".join(errors)


CONFIGMAP_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")


@pytest.mark.parametrize("name,doc", generated_configmaps(), ids=lambda v: v if isinstance(v, str) else "")
def test_generated_configmap_keys_and_size(name, doc):
    # what the API server checks beyond the OpenAPI schema: key syntax and the 1 MiB object limit
    for key in doc["data"]:
        assert CONFIGMAP_KEY.match(key) and len(key) <= 253, f"{name}: bad ConfigMap key {key!r}"
    assert len(json.dumps(doc).encode()) < 1024 * 1024, f"{name}: over the 1 MiB object limit"


KUSTOMIZATION_FIELDS = {
    "apiVersion", "kind", "metadata", "namespace", "namePrefix", "nameSuffix", "labels", "commonLabels",
    "commonAnnotations", "resources", "components", "crds", "configMapGenerator", "secretGenerator",
    "generatorOptions", "patches", "patchesStrategicMerge", "patchesJson6902", "images", "replicas",
    "replacements", "vars", "configurations", "generators", "transformers", "validators", "openapi",
    "sortOptions", "buildMetadata", "helmCharts", "helmGlobals"}
GENERATOR_FIELDS = {"name", "namespace", "behavior", "files", "literals", "envs", "options"}


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("kustomization.yaml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_kustomization_fields_and_files(path):
    kust = yaml.load(path.read_text(), Loader=_Loader)
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    assert not set(kust) - KUSTOMIZATION_FIELDS, f"{path}: unknown fields {set(kust) - KUSTOMIZATION_FIELDS}"
    for resource in kust.get("resources", []):
        target = (path.parent / resource).resolve()
        assert target.is_file() or (target / "kustomization.yaml").is_file(), f"{path}: {resource} missing"
        # kustomize's default load restrictor: files must lie under the kustomization's folder
        assert target.is_dir() or path.parent.resolve() in target.parents, f"{path}: {resource} is outside its root"
    for gen in kust.get("configMapGenerator", []):
        assert not set(gen) - GENERATOR_FIELDS, f"{path}: {gen['name']}: unknown fields {set(gen) - GENERATOR_FIELDS}"
        for entry in gen.get("files", []):
            target = (path.parent / entry.rpartition("=")[2]).resolve()
            assert target.is_file() and path.parent.resolve() in target.parents, f"{path}: {entry}"


# -- the checks bite: mutated copies fail, naming the path --------------------------------------


def _doc(kind: str, name_part: str = "") -> dict:
    [doc] = [d for n, d in documents() if d["kind"] == kind and name_part in n]
    return copy.deepcopy(doc)


def test_misspelt_key_in_a_worker_group_is_named():
    doc = _doc("RayCluster")
    group = doc["spec"]["workerGroupSpecs"][0]
    group["tolerations "] = group["template"]["spec"].pop("tolerations")  # misplaced and misspelt
    assert schema_errors(doc) == ["spec.workerGroupSpecs[0].tolerations : unknown field"]
    group = _doc("RayCluster")["spec"]["workerGroupSpecs"][0]
    doc["spec"]["workerGroupSpecs"][0] = group
    group["maxReplica"] = group.pop("maxReplicas")  # a required key misspelt: both halves are named
    assert schema_errors(doc) == ["spec.workerGroupSpecs[0]: 'maxReplicas' is a required property",
                                  "spec.workerGroupSpecs[0].maxReplica: unknown field"]


def test_wrong_type_for_replicas_is_named():
    doc = _doc("RayCluster")
    doc["spec"]["workerGroupSpecs"][1]["replicas"] = "2"
    [error] = schema_errors(doc)
    assert error.startswith("spec.workerGroupSpecs[1].replicas: ") and "'integer'" in error, error


def test_unknown_top_level_spec_field_is_named():
    for kind, field in (("RayCluster", "enableInTreeAutoscaler"), ("RayJob", "shutdownAfterJobFinish"),
                        ("RayCronJob", "concurrencyPolicy")):
        doc = _doc(kind, "select" if kind == "RayJob" else "")
        doc["spec"][field] = True
        assert schema_errors(doc) == [f"spec.{field}: unknown field"], kind


def test_the_same_mutations_inside_a_nested_cluster_spec():
    # the RayCronJob's job template carries a whole RayCluster spec: it is checked as deeply
    doc = _doc("RayCronJob")
    group = doc["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]
    group["replicas"] = 1.5
    group["template"]["spec"]["containers"][0]["resource"] = {}
    doc["spec"]["jobTemplate"]["rayClusterSpec"]["headGroupSpec"]["template"]["metadata"]["lables"] = {}
    errors = schema_errors(doc)
    prefix = "spec.jobTemplate.rayClusterSpec."
    assert f"{prefix}headGroupSpec.template.metadata.lables: unknown field" in errors, errors
    assert f"{prefix}workerGroupSpecs[0].template.spec.containers[0].resource: unknown field" in errors, errors
    assert any(e.startswith(f"{prefix}workerGroupSpecs[0].replicas: ") for e in errors), errors
    assert len(errors) == 3, errors


def test_kubernetes_extensions():
    doc = _doc("RayCluster")
    resources = doc["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    resources["limits"]["cpu"] = 8            # x-kubernetes-int-or-string: an integer quantity is fine
    assert schema_errors(doc) == []
    resources["limits"]["cpu"] = [8]          # ... a list is not
    [error] = schema_errors(doc)
    assert error.startswith("spec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.cpu: "), error
    doc = _doc("RayCluster")
    ports = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append(dict(ports[0], name="again"))  # list-map keyed by containerPort+protocol: a duplicate
    [error] = schema_errors(doc)
    assert error.startswith("spec.headGroupSpec.template.spec.containers[0].ports: ") and "duplicates" in error
    doc = _doc("RayJob", "select")
    doc["spec"]["rayClusterSpec"] = {"headGroupSpec": {"template": {}}}
    doc["spec"]["workerGroupSpecs"] = []   # a field of the cluster spec, misplaced one level up
    assert "spec.workerGroupSpecs: unknown field" in schema_errors(doc)
    doc = _doc("RayJob", "select")
    doc["spec"]["replicas"] = 2 ** 31        # format int32 is bounded... on a field that does not exist
    assert schema_errors(doc) == ["spec.replicas: unknown field"]
    doc["spec"].pop("replicas")
    doc["spec"]["backoffLimit"] = 2 ** 31    # int32 overflow on one that does
    [error] = schema_errors(doc)
    assert error.startswith("spec.backoffLimit: ") and "int32" in error, error
    # top-level metadata is ObjectMeta: a misspelt key there is named too
    doc = _doc("RayJob", "select")
    doc["metadata"]["label"] = {}
    assert schema_errors(doc) == ["metadata.label: unknown field"]


def test_preserve_unknown_fields_and_embedded_resources():
    schema = structural_to_jsonschema({"type": "object", "properties": {
        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        "obj": {"type": "object", "x-kubernetes-embedded-resource": True,
                "properties": {"spec": {"type": "object", "properties": {"n": {"type": "integer"}}}}},
        "nullable": {"type": "string", "nullable": True}}}, top=False)
    v = KubeValidator(schema, format_checker=FORMATS)
    assert not list(v.iter_errors({"free": {"anything": {"at": ["all"]}}, "nullable": None}))
    assert not list(v.iter_errors({"obj": {"apiVersion": "v1", "kind": "X", "metadata": {"name": "a"}, "spec": {"n": 1}}}))
    errs = [(_path(e), e.message) for e in v.iter_errors({"obj": {"kind": "X", "spec": {"m": 1}}})]
    assert ("obj", "'apiVersion' is a required property") in errs and any(p == "obj.spec" for p, _ in errs), errs


def test_cel_rules_are_evaluated():
    doc = _doc("RayJob", "select")
    doc["spec"]["deletionStrategy"] = {"onSuccess": {"policy": "DeleteCluster"},
                                       "deletionRules": [{"policy": "DeleteCluster",
                                                          "condition": {"jobStatus": "SUCCEEDED"}}]}
    errors = schema_errors(doc)
    assert any(e.startswith("spec.deletionStrategy: legacy policies") for e in errors), errors
    doc["spec"]["deletionStrategy"] = {"deletionRules": [{"policy": "DeleteCluster", "condition": {"ttlSeconds": 5}}]}
    errors = schema_errors(doc)
    assert errors == ["spec.deletionStrategy.deletionRules[0].condition: the deletion condition requires either "
                      "the JobStatus or the JobDeploymentStatus field."], errors
    doc["spec"]["deletionStrategy"]["deletionRules"][0]["condition"]["jobStatus"] = "SUCCEEDED"
    assert schema_errors(doc) == []


def test_core_objects_fail_with_their_path():
    [(_, cron)] = [(n, d) for n, d in documents() if d["kind"] == "CronJob"] or [(None, None)]
    if cron is not None:
        cron = copy.deepcopy(cron)
        cron["spec"]["concurencyPolicy"] = cron["spec"].pop("concurrencyPolicy", "Forbid")
        assert "spec.concurencyPolicy: unknown field" in schema_errors(cron)
    [(_, role)] = [(n, d) for n, d in documents() if d["kind"] == "Role"][:1]
    role = copy.deepcopy(role)
    role["rules"][0]["verbs"] = "create"
    assert any(e.startswith("rules[0].verbs: ") for e in schema_errors(role))
    [(_, cm)] = generated_configmaps()[:1]
    cm = copy.deepcopy(cm)
    cm["data"]["x"] = 1
    assert any(e.startswith("data.x: ") for e in schema_errors(cm, "latest"))
