"""The deployment files match the server they deploy.

* every manifest in deploy/k8s parses, and passes the Kubernetes OpenAPI schemas in strict mode
  (``kubernetes-validate``, offline; no cluster or kubeconform here) for 1.28 (the oldest with
  the pod-index labels and gRPC probes the manifests use) and the newest it knows;
* every ``jaxinfer`` command line in them and in deploy/Dockerfile parses with the real CLI parser
  (an unknown or misspelt flag fails), and the names agree: ports, probes' service name, the
  coordinator's DNS name, process count, grace periods, the JAX_* variables distributed reads;
* the Envoy configuration inside its ConfigMap health-checks the same service on the replicas.

Not checked here: building the image (no Docker engine) and applying to a cluster.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from jaxinfer import distributed
from jaxinfer.cli import build_parser
from server.app import SERVICE

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in sorted(K8S.glob("*.yaml"))}


def by_kind(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, [d["metadata"]["name"] for d in docs])
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def container(workload: dict) -> dict:
    (c,) = pod_spec(workload)["containers"]
    return c


def parse_cli(argv: list[str]):
    """The real parser; argparse exits on an unknown flag or a bad value."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as e:
        raise AssertionError(f"jaxinfer does not accept {shlex.join(argv)}") from e


def named_port(c: dict, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def test_every_manifest_parses_and_has_the_expected_objects():
    docs = manifests()
    assert set(docs) == {"multihost.yaml", "replicas.yaml", "envoy.yaml"}
    kinds = {name: sorted(d["kind"] for d in ds) for name, ds in docs.items()}
    assert kinds["multihost.yaml"] == ["Job", "Service", "Service"]
    assert kinds["replicas.yaml"] == ["Deployment", "PodDisruptionBudget", "Service"]
    assert kinds["envoy.yaml"] == ["ConfigMap", "Deployment", "Service"]


@pytest.mark.parametrize("version", ["1.28.0", "latest"])
def test_manifests_pass_the_kubernetes_schemas_strictly(version):
    import kubernetes_validate as kv  # in the test extra: offline Kubernetes schemas
    version = kv.latest_version() if version == "latest" else version
    for name, docs in manifests().items():
        for d in docs:
            try:
                kv.validate(d, version, strict=True)
            except kv.ValidationError as e:
                raise AssertionError(f"{name}: {d['kind']}/{d['metadata']['name']} against {version}: {e}") from e


def test_multihost_job_is_one_group_with_process_0_serving():
    docs = manifests()["multihost.yaml"]
    job = by_kind(docs, "Job")
    spec, pod, c = job["spec"], pod_spec(job), container(job)
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    env = {e["name"]: e for e in c["env"]}
    assert set(env) == {distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID}
    assert int(env[distributed.ENV_NUM_PROCESSES]["value"]) == spec["completions"]
    assert env[distributed.ENV_PROCESS_ID]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    )
    # the coordinator is pod 0 of the Job, by its name in the headless Service = the pods' subdomain
    host, port = env[distributed.ENV_COORDINATOR]["value"].rsplit(":", 1)
    headless = by_kind(docs, "Service", pod["subdomain"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    assert host == f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert int(port) == named_port(c, "coordinator") == headless["spec"]["ports"][0]["port"]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert headless["spec"]["selector"].items() <= labels.items()
    # the gRPC Service selects process 0 only
    grpc_svc = by_kind(docs, "Service", "jaxinfer-group-grpc")
    sel = dict(grpc_svc["spec"]["selector"])
    assert sel.pop("batch.kubernetes.io/job-completion-index") == "0" and sel.items() <= labels.items()
    # the command line: the real parser, and its values agree with the rest
    args = parse_cli(c["args"])
    assert args.command == "serve" and args.num_processes is None and args.process_id is None  # from env
    assert args.port == named_port(c, "grpc") and args.metrics_port == named_port(c, "metrics")
    assert pod["terminationGracePeriodSeconds"] > args.grace_period
    assert pod["restartPolicy"] == "OnFailure"  # a dead process takes the group down; all restart
    probe = " ".join(c["readinessProbe"]["exec"]["command"])
    assert "$JAX_PROCESS_ID" in probe
    health = shlex.split(probe.split("||", 1)[1])  # the health command process 0 is probed with
    assert health[0] == "jaxinfer" and parse_cli(health[1:]).server == f"127.0.0.1:{args.port}"


def test_replicas_are_a_deployment_behind_a_headless_service_with_grpc_health_probes():
    docs = manifests()["replicas.yaml"]
    dep, svc = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    c, pod = container(dep), pod_spec(dep)
    args = parse_cli(c["args"])
    assert args.command == "serve" and args.num_processes is None
    assert svc["spec"]["clusterIP"] == "None"  # DNS lists every replica: clients balance requests
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert args.port == named_port(c, "grpc") and args.metrics_port == named_port(c, "metrics")
    assert c["readinessProbe"]["grpc"] == {"port": args.port, "service": SERVICE}
    assert c["startupProbe"]["grpc"]["port"] == c["livenessProbe"]["grpc"]["port"] == args.port
    assert pod["terminationGracePeriodSeconds"] > args.grace_period
    pdb = by_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_envoy_balances_the_replicas_with_grpc_health_checks():
    docs = manifests()
    envoy = yaml.safe_load(by_kind(docs["envoy.yaml"], "ConfigMap")["data"]["envoy.yaml"])
    (cluster,) = envoy["static_resources"]["clusters"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "ROUND_ROBIN"
    assert "http2_protocol_options" in json.dumps(cluster["typed_extension_protocol_options"])
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    replicas = by_kind(docs["replicas.yaml"], "Service")
    assert address["address"].startswith(replicas["metadata"]["name"] + ".")
    assert address["port_value"] == parse_cli(container(by_kind(docs["replicas.yaml"], "Deployment"))["args"]).port
    (listener,) = envoy["static_resources"]["listeners"]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    (route,) = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert route["route"]["cluster"] == cluster["name"] and route["route"]["timeout"] == "0s"  # long streams
    dep, svc = by_kind(docs["envoy.yaml"], "Deployment"), by_kind(docs["envoy.yaml"], "Service")
    assert named_port(container(dep), "grpc") == listener["address"]["socket_address"]["port_value"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def test_dockerfile_runs_the_same_cli():
    ins = dockerfile_instructions()
    get = lambda k: [v for i, v in ins if i == k]  # noqa: E731
    assert get("FROM")[0].startswith("python:3.11")
    (entrypoint,), (cmd,) = get("ENTRYPOINT"), get("CMD")
    assert json.loads(entrypoint) == ["jaxinfer"]
    args = parse_cli(json.loads(cmd))  # exec form: the default command line
    assert args.command == "serve" and args.host == "0.0.0.0"
    exposed = {int(p) for v in get("EXPOSE") for p in v.split()}
    assert {args.port, args.metrics_port} <= exposed
    assert 1234 in exposed  # the coordinator port the multi-host manifest uses
    health = json.loads(get("HEALTHCHECK")[0].split("CMD", 1)[1])
    assert health[0] == "jaxinfer" and parse_cli(health[1:]).server == f"127.0.0.1:{args.port}"
    for copy in get("COPY"):  # what it copies exists in the repository
        for src in copy.split()[:-1]:
            assert (ROOT / src).exists(), src
    run = " ".join(get("RUN"))
    assert "jaxinfer convert --no-progress smollm2-135m-instruct /models/smollm2" in run
    parse_cli(["convert", "--no-progress", "smollm2-135m-instruct", "/models/smollm2"])
    # the model path the image bakes in is the one the manifests and the default command serve
    assert args.model == "/models/smollm2"
    for name in ("multihost.yaml", "replicas.yaml"):
        workload = next(d for d in manifests()[name] if d["kind"] in ("Job", "Deployment"))
        assert parse_cli(container(workload)["args"]).model == args.model
