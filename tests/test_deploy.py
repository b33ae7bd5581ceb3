"""deploy/: every manifest parses and has its kind's required fields, entrypoints name modules and
configs that exist, no credential is inline, and the Dockerfile has the structure the image needs."""

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from selector.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
CONFIG_MOUNT = "/configs"


NOT_MANIFESTS = {"crds", "configs", "helm"}  # folders under deploy/ whose YAML is not a Kubernetes object


def documents():
    """``(path relative to deploy/, document)`` for every YAML document under deploy/ (configs, the vendored
    CRDs and Helm values excluded)."""
    out = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        rel = path.relative_to(DEPLOY)
        if NOT_MANIFESTS & set(rel.parts[:-1]):
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((str(rel), doc))
    return out


DOCS = documents()


def of_kind(kind):
    return [(name, doc) for name, doc in DOCS if doc["kind"] == kind]


def dig(obj, *keys):
    for key in keys:
        obj = obj[key]
    return obj


def test_every_manifest_parses_with_kind_and_api_version():
    assert {doc["kind"] for _, doc in DOCS} >= {"RayCluster", "RayJob", "RayCronJob", "CronJob", "ServiceAccount",
                                                 "Role", "RoleBinding", "Kustomization"}
    for name, doc in DOCS:
        assert doc.get("apiVersion") and doc.get("kind"), name
        if doc["kind"] != "Kustomization":
            meta = doc["metadata"]
            assert meta.get("name") or meta.get("generateName"), f"{name}: {doc['kind']} has no name"
        if doc["kind"] in ("RayCluster", "RayJob", "RayCronJob"):
            assert doc["apiVersion"] == "ray.io/v1", name


# -- Ray cluster specs ------------------------------------------------------------------------


def cluster_specs():
    """Every RayCluster spec: the RayCluster's own and each RayJob's inline rayClusterSpec."""
    specs = [(name, doc["spec"]) for name, doc in of_kind("RayCluster")]
    specs += [(name, doc["spec"]["rayClusterSpec"]) for name, doc in of_kind("RayJob") if "rayClusterSpec" in doc["spec"]]
    specs += [(name, doc["spec"]["jobTemplate"]["rayClusterSpec"]) for name, doc in of_kind("RayCronJob")]
    return specs


def check_pod_template(where, template):
    spec = template["spec"]
    containers = spec["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers), where
    ctx = spec.get("securityContext", {})
    assert ctx.get("runAsNonRoot") is True and ctx.get("runAsUser", 0) != 0, f"{where}: pods run as non-root"
    for container in containers:
        # object-store credentials come from a Secret (or workload identity), never from literal env values
        refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert refs == ["thresher-object-store"], f"{where}: credentials through envFrom secretRef"
    assert spec.get("serviceAccountName") == "thresher-ray", f"{where}: workload identity hook"
    return spec


@pytest.mark.parametrize("name,spec", cluster_specs(), ids=lambda v: v if isinstance(v, str) else "")
def test_ray_cluster_spec_has_required_fields(name, spec):
    assert spec["rayVersion"]
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    head_spec = check_pod_template(f"{name} head", head["template"])
    assert head_spec["containers"][0]["image"]
    # the driver runs on the head: the configs ConfigMap must be mounted there at /configs
    volumes = {v["name"]: v for v in head_spec.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in head_spec["containers"][0].get("volumeMounts", [])}
    assert volumes[mounts[CONFIG_MOUNT]]["configMap"]["name"] == "thresher-configs", name

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu-readers"}, name
    for group_name, group in groups.items():
        assert isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}/{group_name}"
        check_pod_template(f"{name}/{group_name}", group["template"])
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]
    assert int(gpu["limits"]["nvidia.com/gpu"]) >= 1 and gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"]
    cpu = groups["cpu-readers"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu.get("limits", {}) and cpu["limits"]["cpu"]


def test_ray_version_matches_the_image():
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)$", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert {spec["rayVersion"] for _, spec in cluster_specs()} == {ray_version}


# -- entrypoints ------------------------------------------------------------------------------


def parse_entrypoint(entrypoint):
    """``python -m <module> --config <path> [flags]`` -> ``(module, path)``."""
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and "--config" in argv, entrypoint
    return argv[2], argv[argv.index("--config") + 1]


def config_file(path):
    """A path under the /configs mount -> the file in deploy/configs/ the ConfigMap is made from."""
    assert path.startswith(CONFIG_MOUNT + "/"), path
    local = DEPLOY / "configs" / path[len(CONFIG_MOUNT) + 1:]
    assert local.is_file(), f"{path} has no file {local}"
    generated = {g["name"]: g["files"] for g in of_kind("Kustomization")[0][1]["configMapGenerator"]}
    assert str(local.relative_to(DEPLOY)) in generated["thresher-configs"], f"{local} is not in the ConfigMap"
    return local


def rayjobs():
    """Every RayJob, and every RayCronJob's job template as the RayJob it creates."""
    jobs = {name: doc for name, doc in of_kind("RayJob")}
    jobs.update({name: {"kind": "RayJob", "spec": doc["spec"]["jobTemplate"]} for name, doc in of_kind("RayCronJob")})
    return jobs


def test_every_rayjob_runs_on_a_cluster_with_a_valid_config():
    from selector.data.refresh import load_refresh_config

    for name, job in rayjobs().items():
        spec = job["spec"]
        assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{name}: exactly one cluster source"
        if "clusterSelector" in spec:
            target = spec["clusterSelector"]["ray.io/cluster"]
            assert target in {doc["metadata"]["name"] for _, doc in of_kind("RayCluster")}, name
        module, path = parse_entrypoint(spec["entrypoint"])
        # a refresh config may carry a refresh: section (lease, drift, decay) around the job config
        config = load_refresh_config(config_file(path))[1] if module == "ray_jobs.refresh" else load_config(config_file(path))
        assert config.method == "random"  # until quad lands (the YAML says so)
        assert not _secrets_in(config.model_dump(mode="json")), f"{path} holds a credential"


def test_select_entrypoint_names_an_importable_module():
    module, _ = parse_entrypoint(rayjobs()["rayjob-select.yaml"]["spec"]["entrypoint"])
    assert module == "ray_jobs.select" and importlib.util.find_spec(module) is not None


def test_refresh_entrypoint_names_the_refresh_module():
    module, path = parse_entrypoint(rayjobs()["refresh-rayjob.yaml"]["spec"]["entrypoint"])
    assert module == "ray_jobs.refresh" and path == "/configs/refresh.yaml"


def test_refresh_module_exists():
    module, _ = parse_entrypoint(rayjobs()["refresh-rayjob.yaml"]["spec"]["entrypoint"])
    assert importlib.util.find_spec(module) is not None


# -- the nightly schedule ---------------------------------------------------------------------

_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_NAMES = {3: "jan feb mar apr may jun jul aug sep oct nov dec".split(), 4: "sun mon tue wed thu fri sat".split()}


def valid_cron(expr):
    """A standard 5-field cron expression (numbers, *, ranges, steps, lists, month/day names)."""
    fields = expr.split()
    if len(fields) != 5:
        return False
    for i, (field, (lo, hi)) in enumerate(zip(fields, _CRON_RANGES)):
        for item in field.split(","):
            base, _, step = item.partition("/")
            if step and not (step.isdigit() and int(step) > 0):
                return False
            if base == "*":
                continue
            for bound in base.split("-", 1):
                value = _NAMES.get(i, []).index(bound.lower()) + (1 if i == 3 else 0) \
                    if bound.lower() in _NAMES.get(i, []) else (int(bound) if bound.isdigit() else None)
                if value is None or not lo <= value <= hi:
                    return False
    return True


def test_cron_validator():
    assert valid_cron("0 2 * * *") and valid_cron("*/15 1-5 1,15 jan-mar mon-fri")
    assert not valid_cron("0 2 * *") and not valid_cron("60 2 * * *") and not valid_cron("0 24 * * *")
    assert not valid_cron("0 2 * * * *") and not valid_cron("@nightly x")


def _kustomization(folder=""):
    return yaml.safe_load((DEPLOY / folder / "kustomization.yaml").read_text())


def _generated():
    """ConfigMap name -> files, over every kustomization under deploy/ (paths relative to deploy/)."""
    out = {}
    for path in DEPLOY.rglob("kustomization.yaml"):
        for g in yaml.safe_load(path.read_text()).get("configMapGenerator", []):
            out[g["name"]] = [str((path.parent / f).relative_to(DEPLOY)) for f in g["files"]]
    return out


def _crd(plural):
    return yaml.load((DEPLOY / "crds" / f"ray.io_{plural}.yaml").read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _daily(schedule):
    """A schedule that fires once a day ('M H * * *') -> its period in seconds."""
    fields = schedule.split()
    assert valid_cron(schedule) and fields[0].isdigit() and fields[1].isdigit() and fields[2:] == ["*"] * 3, schedule
    return 86400


def test_raycronjob_is_the_nightly_refresh():
    from selector.data.refresh import load_refresh_config

    [(name, cron)] = of_kind("RayCronJob")
    assert name == "nightly/refresh-raycronjob.yaml"
    crd = _crd("raycronjobs")
    served = {f"{crd['spec']['group']}/{v['name']}" for v in crd["spec"]["versions"] if v["served"]}
    assert cron["apiVersion"] in served, (cron["apiVersion"], served)
    spec = cron["spec"]
    period = _daily(spec["schedule"])
    assert spec["timeZone"] == "Etc/UTC" and spec.get("suspend") is False
    # the job it creates is exactly the refresh RayJob (which a user can also create by hand)
    [(_, template)] = [(n, d) for n, d in of_kind("RayJob") if n == "refresh-rayjob.yaml"]
    assert spec["jobTemplate"] == template["spec"]
    job = spec["jobTemplate"]
    assert job["shutdownAfterJobFinishes"] is True and "rayClusterSpec" in job
    # one refresh at a time: a concurrency policy where the CRD offers one, and in any case the deadline
    # (a run is stopped before the next tick) and the project's lease (a second run exits at once)
    cron_spec_fields = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    if "concurrencyPolicy" in cron_spec_fields:
        assert spec.get("concurrencyPolicy") == "Forbid"
    assert 0 < job["activeDeadlineSeconds"] < period
    module, path = parse_entrypoint(job["entrypoint"])
    assert module == "ray_jobs.refresh"
    settings, _ = load_refresh_config(config_file(path))
    # a refresh that died leaves a lease that expires long before the next night
    assert settings.name and settings.lease_ttl_s < period - job["activeDeadlineSeconds"]


def test_the_refresh_lease_refuses_a_second_refresh(tmp_path):
    from selector.data.lease import Lease, LeaseHeldError
    from selector.data.refresh import load_refresh_config

    settings, _ = load_refresh_config(DEPLOY / "configs" / "refresh.yaml")
    first = Lease(str(tmp_path), settings.name, holder_id="thresher-refresh-aaaaa", ttl_s=settings.lease_ttl_s)
    with first:
        second = Lease(str(tmp_path), settings.name, holder_id="thresher-refresh-bbbbb", ttl_s=settings.lease_ttl_s)
        with pytest.raises(LeaseHeldError, match="thresher-refresh-aaaaa"):
            second.acquire()
    with Lease(str(tmp_path), settings.name, holder_id="thresher-refresh-bbbbb", ttl_s=settings.lease_ttl_s):
        pass  # released: the next night's refresh takes it


def test_batch_cronjob_creates_the_refresh_rayjob_with_the_rights_it_needs():
    [(name, cron)] = of_kind("CronJob")
    assert name == "nightly-cronjob/refresh-cronjob.yaml" and cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    [(_, raycron)] = of_kind("RayCronJob")  # both paths fire at the same time
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == (raycron["spec"]["schedule"], raycron["spec"]["timeZone"])
    pod = dig(cron, "spec", "jobTemplate", "spec", "template", "spec")
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    [container] = pod["containers"]
    assert container["image"] and container["command"][:2] == ["kubectl", "create"]
    template_path = container["command"][container["command"].index("-f") + 1]
    # the file it creates comes from the ConfigMap that kustomize builds from refresh-rayjob.yaml
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v["configMap"]["name"] for v in pod["volumes"]}
    [(volume, mount)] = [(v, mounts[v]) for v in volumes if template_path.startswith(mounts[v] + "/")]
    [template_file] = [f for f in _generated()[volumes[volume]] if Path(f).name == Path(template_path).name]
    [template] = [d for n, d in DOCS if n == template_file]
    assert template["kind"] == "RayJob" and template["metadata"]["generateName"], "each night needs a new name"
    assert "name" not in template["metadata"]
    # its service account may create RayJobs
    account = pod["serviceAccountName"]
    assert account in {d["metadata"]["name"] for n, d in of_kind("ServiceAccount") if n.startswith("nightly-cronjob/")}
    roles = {d["metadata"]["name"]: d for _, d in of_kind("Role")}
    granted = [roles[b["roleRef"]["name"]] for _, b in of_kind("RoleBinding")
               if any(s["kind"] == "ServiceAccount" and s["name"] == account for s in b["subjects"])]
    assert any("ray.io" in r["apiGroups"] and "rayjobs" in r["resources"] and "create" in r["verbs"]
               for role in granted for r in role["rules"])


def test_kustomizations_each_apply_one_schedule():
    base = _kustomization()
    for resource in base["resources"]:
        assert (DEPLOY / resource).is_file(), resource
    assert "refresh-rayjob.yaml" not in base["resources"], "the refresh template is created, not applied"
    for gen in base["configMapGenerator"]:
        for f in gen["files"]:
            assert (DEPLOY / f).is_file(), f
    schedulers = {"RayCronJob", "CronJob"}

    def kinds(folder):
        kust = _kustomization(folder)
        out = set()
        for r in kust["resources"]:
            if (DEPLOY / folder / r / "kustomization.yaml").is_file():
                out |= kinds(str(Path(folder, r)))
            else:
                out |= {d["kind"] for d in yaml.safe_load_all((DEPLOY / folder / r).read_text()) if d}
        return out

    assert not kinds("") & schedulers, "deploy/ alone is the cluster without a schedule"
    assert kinds("nightly") & schedulers == {"RayCronJob"} and "RayCluster" in kinds("nightly")
    assert kinds("nightly-cronjob") & schedulers == {"CronJob"} and "RayCluster" in kinds("nightly-cronjob")
    for folder in ("nightly", "nightly-cronjob"):
        assert _kustomization(folder)["namespace"] == base["namespace"]


def test_operator_values_enable_the_raycronjob_gate():
    values = yaml.safe_load((DEPLOY / "helm" / "kuberay-operator-values.yaml").read_text())
    gates = {g["name"]: g["enabled"] for g in values["featureGates"]}
    assert gates["RayCronJob"] is True

# -- credentials ------------------------------------------------------------------------------

_SECRET_NAME = re.compile(r"(key|secret|token|password|passwd|credential|session)", re.I)


def _is_secret(name):
    return bool(_SECRET_NAME.search(name))


# an AWS access key id, a literal 40-character secret key (a "$VARIABLE" reference is fine), a PEM key
_CREDENTIAL_TEXT = re.compile(r"(AKIA[0-9A-Z]{16}|aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+]{40}"
                              r"|-----BEGIN [A-Z ]*PRIVATE KEY)", re.I)


def _secrets_in(obj, path=""):
    """Paths of literal credentials: env entries with a secret-looking name and a literal value, or
    secret-looking keys with string values inside storage options."""
    found = []
    if isinstance(obj, dict):
        name = str(obj.get("name", ""))
        if "value" in obj and _is_secret(name) and obj["value"]:
            found.append(f"{path}.{name}")
        for k, v in obj.items():
            if path.endswith("storage_options") and _is_secret(str(k)) and isinstance(v, str) and v:
                found.append(f"{path}.{k}")
            found += _secrets_in(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            found += _secrets_in(v, f"{path}[{i}]")
    return found


def test_no_credentials_inline():
    assert not of_kind("Secret"), "ship no Secret: reference one the user creates (deploy/README.md)"
    for name, doc in DOCS:
        assert not _secrets_in(doc), name
    for path in [*DEPLOY.rglob("*.yaml"), DEPLOY / "Dockerfile", DEPLOY / "README.md"]:
        assert not _CREDENTIAL_TEXT.search(path.read_text()), path
    # the checks themselves bite
    assert _secrets_in({"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}]})
    assert _CREDENTIAL_TEXT.search("AWS_SECRET_ACCESS_KEY=" + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert not _CREDENTIAL_TEXT.search('AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"')


# -- Dockerfile -------------------------------------------------------------------------------


def dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    return text, [line.strip() for line in text.replace("\\\n", " ").splitlines()
                  if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_structure():
    text, lines = dockerfile()
    froms = [line.split()[1] for line in lines if line.upper().startswith("FROM ")]
    assert froms and re.match(r"(nvidia/cuda:.*(runtime|devel)|rayproject/ray(-ml)?:.*(gpu|cu\d+))", froms[-1]), froms
    users = [line.split()[1] for line in lines if line.upper().startswith("USER ")]
    assert users, "the image must switch to a non-root user"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "numeric non-root USER (lets runAsNonRoot verify it)"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["TORCH_VERSION"] in SpecifierSet(">=2.3,<3") and "+cpu" not in args["TORCH_VERSION"]
    assert not re.search(r"download\.pytorch\.org/whl/cpu", text)
    install = next(line for line in lines if '".[gpu]"' in line)
    # faiss-cpu and faiss-gpu share the module `faiss`: the gpu extra is installed, then faiss-cpu removed,
    # then faiss-gpu reinstalled alone, in that order
    assert install.index('".[gpu]"') < install.index("pip uninstall -y faiss-cpu") < \
        install.index('pip install --no-deps "faiss-gpu==')
    assert "torch==${TORCH_VERSION}" in install
    assert not re.search(r"^(ENV|ARG)\s.*(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", text, re.M | re.I)
    copied = [line.split()[1] for line in lines if line.startswith("COPY ")]
    assert {"selector/", "workers/", "ray_jobs/", "pyproject.toml"} <= set(copied)
