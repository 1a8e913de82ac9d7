"""`prefect deploy --all`, as a person or CI runs it, against the session's Prefect server.

The deployments are read back through the API and compared with prefect.yaml; the pull step is run
the way a process worker runs it; prefect.docker.yaml is deployed with prefect-docker's build and
push steps replaced by a recorder (no Docker engine here) to check its image and pool wiring; and
the CI workflow is checked to deploy only from main, after the tests, with pinned actions, the
commit it tested as every deployment's version and the image's tag. Both files are deployed by
.ci/deploy, the script CI's deploy job runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.responses import DeploymentResponse
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.exceptions import ObjectNotFound
from prefect.utilities.asyncutils import run_coro_as_sync
from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type
from typer.testing import CliRunner

from postload.alerts import DEFAULT_HEARTBEAT_SECONDS
from postload.cli import app
from postload.config import Settings
from tests.conftest import REPO, PostloadHome

PREFECT = str(Path(sys.executable).with_name("prefect"))
LOCAL_FILE = REPO / "prefect.yaml"
DOCKER_FILE = REPO / "prefect.docker.yaml"
WORKFLOW = REPO / ".github" / "workflows" / "ci.yml"
CI_DEPLOY = REPO / ".ci" / "deploy"
DEPLOY_TIMEOUT = 300
HEARTBEAT = "30"  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in both deployment files
VERSION_GUARD = "prefect.deployments.steps.run_shell_script"  # both files' first build step
PINNED = "{{ $POSTLOAD_VERSION }}"  # every deployment's version, and the image's tag


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def cli_env(api_url: str, **extra: str) -> dict[str, str]:
    """The environment of a person deploying to this server: none of the caller's PREFECT_*
    settings (an API URL or key would point elsewhere), and no POSTLOAD_PROJECT_DIR, which
    `prefect deploy` would store in the pull step instead of leaving it to the worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "POSTLOAD_"))}
    env.update(
        PREFECT_API_URL=api_url,
        PREFECT_CLI_PROMPT="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        **extra,
    )
    return env


def head_commit() -> str:
    """The checkout's commit: what a deploy from it is pinned to (POSTLOAD_VERSION)."""
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def run(argv: list[str], api_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd=REPO,
        env=cli_env(api_url, **env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=DEPLOY_TIMEOUT,
    )


def ci_deploy(api_url: str, prefect_file: Path, **env: str) -> str:
    """.ci/deploy, as CI's deploy job runs it, pinned to the checkout's commit."""
    result = run(
        [str(CI_DEPLOY), str(prefect_file)], api_url, POSTLOAD_VERSION=head_commit(), **env
    )
    assert result.returncode == 0, f".ci/deploy failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def ensure_pool(client: SyncPrefectClient, pool: dict[str, Any]) -> bool:
    """Create the work pool a file declares, with the type it documents; True if created here."""
    try:
        existing = client.read_work_pool(pool["name"])
    except ObjectNotFound:
        pass
    else:
        assert existing.type == pool["type"], f"{pool['name']} exists with another type"
        return False
    template = run_coro_as_sync(get_default_base_job_template_for_infrastructure_type(pool["type"]))
    assert template, f"no default job template for work pool type {pool['type']!r}"
    client.create_work_pool(
        WorkPoolCreate(name=pool["name"], type=pool["type"], base_job_template=template)
    )
    return True


def read_deployment(client: SyncPrefectClient, name: str, suffix: str = "") -> DeploymentResponse:
    # Each flow is named like its deployment (tests/test_entrypoints.py checks this).
    return client.read_deployment_by_name(f"{name}/{name}{suffix}")


def remove(client: SyncPrefectClient, names: list[str], suffix: str = "") -> None:
    """Delete whatever a deploy created, even one that failed halfway. Deployment triggers are
    automations the server keeps after their deployment is gone; left behind, they would start
    runs from other tests' events."""
    for name in names:
        try:
            deployment = read_deployment(client, name, suffix)
        except ObjectNotFound:
            continue
        client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
        client.delete_deployment(deployment.id)


def schedule_key(schedule: Any, active: bool) -> tuple[str, Any, bool]:
    if isinstance(schedule, CronSchedule):
        return ("cron", schedule.cron, active)
    if isinstance(schedule, IntervalSchedule):
        return ("interval", schedule.interval, active)
    raise AssertionError(f"unexpected schedule type {schedule!r}")


def declared_schedule_key(spec: dict[str, Any]) -> tuple[str, Any, bool]:
    active = spec.get("active", True)
    if "cron" in spec:
        return ("cron", spec["cron"], active)
    return ("interval", timedelta(seconds=spec["interval"]), active)


def assert_deployed_as_declared(
    client: SyncPrefectClient,
    deployment: DeploymentResponse,
    spec: dict[str, Any],
    pull_steps: list[dict[str, Any]],
) -> None:
    name = spec["name"]
    assert deployment.entrypoint == spec["entrypoint"], name
    assert deployment.description == spec["description"], name
    assert deployment.tags == spec["tags"], name
    assert deployment.parameters == spec.get("parameters", {}), name
    assert deployment.work_pool_name == spec["work_pool"]["name"], name
    assert deployment.work_queue_name == spec["work_pool"]["work_queue_name"], name
    assert deployment.pull_steps == pull_steps, name
    assert not deployment.paused, name

    # `schedules: null` (the ones made from postload.yaml): `prefect deploy` creates none.
    assert sorted(schedule_key(s.schedule, s.active) for s in deployment.schedules) == sorted(
        declared_schedule_key(s) for s in spec.get("schedules") or []
    ), name

    limit = spec.get("concurrency_limit")
    if limit is None:
        assert deployment.global_concurrency_limit is None, name
    else:
        assert deployment.global_concurrency_limit is not None, name
        assert deployment.global_concurrency_limit.limit == limit["limit"], name
        options = deployment.concurrency_options
        assert options is not None, name
        assert options.collision_strategy.value == limit["collision_strategy"], name

    automations = {
        a.name: a
        for a in client.read_resource_related_automations(f"prefect.deployment.{deployment.id}")
    }
    declared = {t["name"]: t for t in spec.get("triggers", [])}
    assert sorted(automations) == sorted(declared), name
    for trigger_name, trigger in declared.items():
        automation = automations[trigger_name]
        assert automation.enabled is trigger["enabled"], (name, trigger_name)
        assert automation.trigger.expect == set(trigger["expect"]), (name, trigger_name)
        assert automation.trigger.match.model_dump() == trigger["match"], (name, trigger_name)
        assert automation.trigger.posture.value == trigger["posture"], (name, trigger_name)
        assert automation.trigger.threshold == trigger["threshold"], (name, trigger_name)
        assert automation.trigger.within == timedelta(seconds=trigger["within"])
        [action] = automation.actions
        assert action.type == "run-deployment", (name, trigger_name)
        assert action.deployment_id == deployment.id, (name, trigger_name)
        # Event templates must reach the server unrendered: they are filled per event.
        assert action.parameters == trigger["parameters"], (name, trigger_name)


@dataclass(frozen=True)
class Deployed:
    output: str
    deployments: dict[str, DeploymentResponse]


@pytest.fixture(scope="module")
def deployed(prefect_server: str) -> Iterator[Deployed]:
    """prefect.yaml's deployments on the session server, created by `prefect deploy --all` as
    .ci/deploy runs it, pinned to the checkout's commit."""
    document = load(LOCAL_FILE)
    pool = document["definitions"]["work_pools"]["local"]
    names = [spec["name"] for spec in document["deployments"]]
    with get_client(sync_client=True) as client:
        created_pool = ensure_pool(client, pool)
        try:
            output = ci_deploy(prefect_server, LOCAL_FILE)
            yield Deployed(output, {name: read_deployment(client, name) for name in names})
        finally:
            remove(client, names)
            if created_pool:
                client.delete_work_pool(pool["name"])


def test_deploy_all_creates_every_deployment_as_declared(deployed: Deployed) -> None:
    document = load(LOCAL_FILE)
    # The embedded default builds and pushes nothing (its one build step is the version guard):
    # no Docker engine or prefect-docker needed.
    assert [next(iter(step)) for step in document["build"]] == [VERSION_GUARD]
    assert "push steps" not in deployed.output
    assert sorted(deployed.deployments) == sorted(d["name"] for d in document["deployments"])
    # .ci/deploy read every deployment back at the commit.
    assert f"deployed at {head_commit()}: " in deployed.output
    with get_client(sync_client=True) as client:
        for spec in document["deployments"]:
            assert_deployed_as_declared(
                client, deployed.deployments[spec["name"]], spec, document["pull"]
            )
            assert deployed.deployments[spec["name"]].version == head_commit(), spec["name"]
            assert deployed.deployments[spec["name"]].job_variables == {
                "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": HEARTBEAT}
            }
            # The pool type prefect.yaml documents is the one the runs are sent to.
            pool = client.read_work_pool(deployed.deployments[spec["name"]].work_pool_name)
            assert pool.type == spec["work_pool"]["type"] == "process"


LOAD_FLOWS = """
import asyncio, json, os, sys
from prefect.client.orchestration import get_client
from prefect.flows import load_flow_from_flow_run

async def main():
    loaded = []
    async with get_client() as client:
        for run_id in sys.argv[1:]:
            flow = await load_flow_from_flow_run(await client.read_flow_run(run_id))
            loaded.append({"flow": flow.name, "cwd": os.getcwd()})
    print(json.dumps(loaded))

asyncio.run(main())
"""


def test_flow_runs_load_their_flow_from_the_checkout_in_postload_project_dir(
    deployed: Deployed, prefect_server: str, tmp_path: Path
) -> None:
    """What a process worker's flow-run process does before the flow starts: run the stored pull
    step (here, with the worker's POSTLOAD_PROJECT_DIR) and import the entrypoint from there. It
    starts in an empty folder, as the worker's runs do."""
    with get_client(sync_client=True) as client:
        flow_runs = [
            # load-and-transform has no default source: each run (or schedule) names one
            client.create_flow_run_from_deployment(
                d.id, parameters={"source": "events"} if d.name == "load-and-transform" else None
            )
            for d in deployed.deployments.values()
        ]
        # Each run carries its deployment's version, the commit (postload.checkout compares the
        # worker's checkout with it).
        assert [r.deployment_version for r in flow_runs] == [head_commit()] * len(flow_runs)
        try:
            result = subprocess.run(
                [sys.executable, "-c", LOAD_FLOWS, *(str(r.id) for r in flow_runs)],
                cwd=tmp_path,
                env=cli_env(prefect_server, POSTLOAD_PROJECT_DIR=str(REPO)),
                capture_output=True,
                text=True,
                timeout=DEPLOY_TIMEOUT,
            )
        finally:
            for flow_run in flow_runs:
                client.delete_flow_run(flow_run.id)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [{"flow": name, "cwd": str(REPO)} for name in deployed.deployments]


def applied_schedules(client: SyncPrefectClient, name: str) -> list[tuple[Any, ...]]:
    return sorted(
        (
            (schedule_key(s.schedule, s.active), s.parameters)
            for s in client.read_deployment_schedules(read_deployment(client, name).id)
        ),
        key=repr,
    )


def test_schedules_apply_sets_one_load_per_copy_source_and_a_redeploy_keeps_them(
    deployed: Deployed, prefect_server: str, postload_home: PostloadHome
) -> None:
    """`prefect deploy` cannot read postload.yaml: `postload schedules apply` sets
    load-and-transform's schedules from it, idempotently, and the next `prefect deploy` (CI, on
    every push to main) leaves them as they are."""
    hourly = ("cron", "0 * * * *", True)
    config_path = postload_home.root / "postload.yaml"
    config = yaml.safe_load(config_path.read_text())

    def configure(**loaders: str) -> None:
        for source in config["sources"]:
            if loaders.get(source["name"]) == "fivetran":
                source["loader"] = {"type": "fivetran", "connector_id": f"conn_{source['name']}"}
            else:
                source["loader"] = {"type": "copy"}
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def apply() -> str:
        result = CliRunner().invoke(app, ["schedules", "apply", "--prefect-yaml", str(LOCAL_FILE)])
        assert result.exit_code == 0, result.output
        return result.output

    with get_client(sync_client=True) as client:
        assert applied_schedules(client, "load-and-transform") == []  # as deployed

        configure(customers="fivetran")
        output = apply()
        assert "load-and-transform           replaced: 2 schedule(s)" in output
        assert "    cron 0 * * * * source=orders" in output.splitlines()
        expected = [(hourly, {"source": "events"}), (hourly, {"source": "orders"})]
        assert applied_schedules(client, "load-and-transform") == expected
        ids = {s.id for s in read_deployment(client, "load-and-transform").schedules}

        assert "load-and-transform           unchanged: 2 schedule(s)" in apply()
        assert {s.id for s in read_deployment(client, "load-and-transform").schedules} == ids

        result = run(
            [PREFECT, "--no-prompt", "deploy", "--name", "load-and-transform"],
            prefect_server,
            POSTLOAD_VERSION=head_commit(),
        )
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert applied_schedules(client, "load-and-transform") == expected

        configure(customers="fivetran", orders="fivetran", events="fivetran")
        assert "load-and-transform           replaced: 0 schedule(s)" in apply()
        assert applied_schedules(client, "load-and-transform") == []
        # the other deployments' schedules are prefect.yaml's, untouched
        assert applied_schedules(client, "transform-on-sync") == [
            (("interval", timedelta(seconds=900), True), {})
        ]


FAKE_PREFECT_DOCKER = '''
"""Records the calls prefect.docker.yaml makes to prefect-docker's steps and answers as they do."""
import json, os

def _record(step, **kwargs):
    with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
        log.write(json.dumps({"step": step, "cwd": os.getcwd(), **kwargs}) + "\\n")

def build_docker_image(image_name, dockerfile="Dockerfile", tag=None, additional_tags=None, **kw):
    _record("build", image_name=image_name, dockerfile=dockerfile, tag=tag, **kw)
    return {"image_name": image_name, "tag": tag, "image": f"{image_name}:{tag}",
            "image_id": "sha256:0", "additional_tags": additional_tags or []}

def push_docker_image(image_name, tag=None, credentials=None, additional_tags=None):
    _record("push", image_name=image_name, tag=tag)
    return {"image_name": image_name, "tag": tag, "image": f"{image_name}:{tag}",
            "additional_tags": additional_tags or []}
'''


def with_fake_docker_steps(document: dict[str, Any], suffix: str) -> dict[str, Any]:
    """prefect.docker.yaml with prefect-docker swapped for the recorder (`requires` dropped, or
    Prefect would try to pip-install it) and deployment names suffixed, so this check never
    replaces the deployments another test made from prefect.yaml."""
    for section in ("build", "push"):
        steps = []
        for step in document[section]:
            [(fqn, inputs)] = step.items()
            if fqn == VERSION_GUARD:
                steps.append(step)
                continue
            assert fqn.startswith("prefect_docker.deployments.steps."), fqn
            inputs = {k: v for k, v in inputs.items() if k != "requires"}
            steps.append({"fake_prefect_docker." + fqn.rsplit(".", 1)[1]: inputs})
        document[section] = steps
    for spec in document["deployments"]:
        spec["name"] += suffix
    return document


def test_docker_file_deploys_the_image_it_builds_on_the_docker_pool(
    prefect_server: str, tmp_path: Path
) -> None:
    document = load(DOCKER_FILE)
    pool = document["definitions"]["work_pools"]["docker"]
    suffix = f"-docker-{uuid.uuid4().hex[:6]}"
    deploy_file = tmp_path / "prefect.docker.yaml"
    deploy_file.write_text(yaml.safe_dump(with_fake_docker_steps(load(DOCKER_FILE), suffix)))
    (tmp_path / "fake_prefect_docker.py").write_text(FAKE_PREFECT_DOCKER)
    log = tmp_path / "docker-calls.jsonl"
    image_name, tag = "registry.example.test/data/postload", head_commit()

    names = [spec["name"] for spec in document["deployments"]]
    with get_client(sync_client=True) as client:
        created_pool = ensure_pool(client, pool)
        try:
            ci_deploy(
                prefect_server,
                deploy_file,
                PYTHONPATH=str(tmp_path),
                FAKE_DOCKER_LOG=str(log),
                POSTLOAD_IMAGE=image_name,
            )
            for spec in document["deployments"]:
                deployment = read_deployment(client, spec["name"], suffix)
                assert_deployed_as_declared(
                    client, deployment, {**spec, "name": spec["name"] + suffix}, document["pull"]
                )
                # the image tagged with the commit, and the commit as the version
                assert deployment.job_variables == {
                    "image": f"{image_name}:{tag}",
                    "env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": HEARTBEAT},
                }
                assert deployment.version == tag, spec["name"]
            assert client.read_work_pool(pool["name"]).type == "docker"
        finally:
            remove(client, names, suffix)
            if created_pool:
                client.delete_work_pool(pool["name"])

    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert {c["step"] for c in calls} == {"build", "push"}
    for call in calls:
        assert (call["image_name"], call["tag"]) == (image_name, tag)
        # prefect-docker builds with the deploying directory as the context.
        assert call["cwd"] == str(REPO)
    for build in (c for c in calls if c["step"] == "build"):
        assert (REPO / build["dockerfile"]).is_file()
    # The container changes into the folder the image keeps the project in (test_dockerfile.py
    # checks that this is the Dockerfile's WORKDIR).
    assert document["pull"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/postload"}}
    ]


def test_worker_run_flows_beat_as_often_as_the_lost_run_automation_expects() -> None:
    """postload-run-lost marks a run Crashed after 3 missed beats of Settings.run_heartbeat_seconds;
    runs on a work pool get that frequency from the deployment's job variables."""
    assert str(Settings.model_fields["run_heartbeat_seconds"].default) == HEARTBEAT
    assert str(DEFAULT_HEARTBEAT_SECONDS) == HEARTBEAT
    for path, pool in ((LOCAL_FILE, "local"), (DOCKER_FILE, "docker")):
        env = load(path)["definitions"]["work_pools"][pool]["job_variables"]["env"]
        assert env == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": HEARTBEAT}, path


def test_docker_file_declares_the_same_deployments_as_prefect_yaml() -> None:
    """Production runs what the embedded default runs: only where (`work_pool`) differs."""
    local, docker = load(LOCAL_FILE), load(DOCKER_FILE)
    assert [d["name"] for d in docker["deployments"]] == [d["name"] for d in local["deployments"]]
    for ours, theirs in zip(local["deployments"], docker["deployments"], strict=True):
        assert {k: v for k, v in ours.items() if k != "work_pool"} == {
            k: v for k, v in theirs.items() if k != "work_pool"
        }, ours["name"]
        assert theirs["work_pool"] == docker["definitions"]["work_pools"]["docker"]
    # and the same schedules made from postload.yaml (`postload schedules apply`)
    assert (
        docker["definitions"]["copy_source_schedules"]
        == local["definitions"]["copy_source_schedules"]
    )
    assert docker["definitions"]["work_pools"]["docker"]["job_variables"]["image"] == (
        "{{ build-image.image }}"
    )
    assert [next(iter(s)) for s in docker["build"]] == [
        VERSION_GUARD,
        "prefect_docker.deployments.steps.build_docker_image",
    ]
    build = docker["build"][1]["prefect_docker.deployments.steps.build_docker_image"]
    assert build["id"] == "build-image"
    # The image's tag is the version the deployments record: the commit.
    assert build["tag"] == PINNED
    assert {d["version"] for d in local["deployments"]} == {PINNED}
    # The embedded default deploys with nothing to build or push: its one step is the guard.
    assert [next(iter(s)) for s in local["build"]] == [VERSION_GUARD]
    assert local["push"] is None


def deploy_first(prefect_server: str, deploy_file: Path, document: dict[str, Any]) -> Any:
    """`prefect deploy --all` of a copy of a deployment file (written to deploy_file)."""
    deploy_file.write_text(yaml.safe_dump(document))
    return run(
        [PREFECT, "--no-prompt", "deploy", "--all", "--prefect-file", str(deploy_file)],
        prefect_server,
    )


def test_a_deploy_without_postload_version_fails_instead_of_deploying_unpinned(
    prefect_server: str, tmp_path: Path
) -> None:
    """Prefect itself does not fail on an unset `{{ $VAR }}`: it stores a version of its own (a
    short git SHA, or the flow file's hash). The files' guard step stops such a deploy, naming
    the variable.
    (prefect.yaml cut to one deployment, renamed: the module's deployments stay as they are.)"""
    document = load(LOCAL_FILE)
    [spec] = document["deployments"] = document["deployments"][:1]
    name, suffix = spec["name"], f"-unpinned-{uuid.uuid4().hex[:6]}"
    spec["name"] += suffix
    assert spec["version"] == PINNED
    with get_client(sync_client=True) as client:
        created_pool = ensure_pool(client, document["definitions"]["work_pools"]["local"])
        try:
            result = deploy_first(prefect_server, tmp_path / "guarded.yaml", document)
            assert result.returncode != 0, result.stdout
            assert "POSTLOAD_VERSION must be the commit" in result.stdout + result.stderr
            with pytest.raises(ObjectNotFound):
                read_deployment(client, name, suffix)

            # What the guard prevents: without it, the same deploy succeeds, unpinned.
            result = deploy_first(
                prefect_server, tmp_path / "bare.yaml", {**document, "build": None}
            )
            assert result.returncode == 0, result.stderr
            # Prefect's own default (a short git SHA of the checkout, or the flow file's hash),
            # never the full commit CI tested and checks every deployment against.
            assert read_deployment(client, name, suffix).version != head_commit()
        finally:
            remove(client, [name], suffix)
            if created_pool:
                client.delete_work_pool(spec["work_pool"]["name"])


# --- the CI workflow ---------------------------------------------------------------------------

SHA_PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def workflow() -> dict[str, Any]:
    return load(WORKFLOW)


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return job.get("steps", [])


def runs(job: dict[str, Any]) -> str:
    return "\n".join(s.get("run", "") for s in steps(job))


def test_ci_actions_are_pinned_to_commits() -> None:
    uses = [s["uses"] for job in workflow()["jobs"].values() for s in steps(job) if "uses" in s]
    assert uses, "the workflow uses no actions: checkout and setup-python are expected"
    assert [u for u in uses if not SHA_PINNED.match(u)] == []
    # A bare SHA says nothing to a reader: each pin carries the version it stands for.
    for line in WORKFLOW.read_text().splitlines():
        if re.match(r"\s*(- )?uses:", line):
            assert re.search(r"#\s*v\d", line), line


def test_ci_tests_every_push_and_pull_request_with_make_test() -> None:
    document = workflow()
    # YAML 1.1 reads the bare key `on` as true.
    on = document.get("on", document.get(True))
    assert on["push"]["branches"] == ["main"]
    assert "pull_request" in on
    test = document["jobs"]["test"]
    assert test["runs-on"].startswith("ubuntu")
    assert "if" not in test
    assert re.search(r"^make test$", runs(test), re.M)
    # and the short fault suite, as .ci/run does
    assert re.search(r"^make faults-quick$", runs(test), re.M)
    assert re.search(r"^make faults-quick$", (REPO / ".ci" / "run").read_text(), re.M)
    [python] = [s for s in steps(test) if s.get("uses", "").startswith("actions/setup-python@")]
    assert str(python["with"]["python-version"]) == "3.11"


def test_ci_deploys_from_main_after_the_tests_with_the_api_key_from_secrets() -> None:
    deploy = workflow()["jobs"]["deploy"]
    needs = deploy["needs"]
    assert "test" in ([needs] if isinstance(needs, str) else needs)
    condition = deploy["if"]
    assert "github.ref == 'refs/heads/main'" in condition
    assert "github.event_name == 'push'" in condition

    env = dict(deploy.get("env", {}))
    deploy_steps = [s for s in steps(deploy) if ".ci/deploy" in s.get("run", "")]
    assert len(deploy_steps) == 1
    env.update(deploy_steps[0].get("env", {}))
    for name in ("PREFECT_API_KEY", "PREFECT_API_URL"):
        secret = re.fullmatch(r"\$\{\{\s*secrets\.(\w+)\s*\}\}", env[name])
        assert secret and secret.group(1) == name, f"{name}: {env[name]!r}"
    # Never on a command line or in output, where logs would keep it.
    assert "PREFECT_API_KEY" not in runs(deploy)
    # The pull step must stay a template for the worker, not the CI runner's checkout path.
    assert "POSTLOAD_PROJECT_DIR" not in env

    commands = [s.get("run", "") for s in steps(deploy)]
    setup = next(i for i, c in enumerate(commands) if re.search(r"^make setup$", c, re.M))
    assert setup < commands.index(deploy_steps[0]["run"])


def test_ci_deploys_the_commit_it_tested_as_version_and_image_tag() -> None:
    """The chain from the workflow to the server: github.sha → POSTLOAD_VERSION → the image's tag
    and each deployment's version in prefect.docker.yaml (the file CI deploys) → what .ci/deploy
    deploys and reads back (run against the test server by the tests above)."""
    deploy = workflow()["jobs"]["deploy"]
    [step] = [s for s in steps(deploy) if ".ci/deploy" in s.get("run", "")]
    env = {**deploy.get("env", {}), **step.get("env", {})}
    assert re.fullmatch(r"\$\{\{\s*github\.sha\s*\}\}", env["POSTLOAD_VERSION"])
    assert env["POSTLOAD_IMAGE"]
    assert re.search(r"^\.ci/deploy prefect\.docker\.yaml$", step["run"], re.M)
    assert re.search(
        r"^\.venv/bin/postload schedules apply --prefect-yaml prefect\.docker\.yaml$",
        step["run"],
        re.M,
    )

    document = load(DOCKER_FILE)
    [build] = [s for s in document["build"] if "build-image" in str(s)]
    assert build["prefect_docker.deployments.steps.build_docker_image"]["tag"] == PINNED
    assert [d.get("version") for d in document["deployments"]] == [PINNED] * 3
    assert document["definitions"]["work_pools"]["docker"]["job_variables"]["image"] == (
        "{{ build-image.image }}"
    )

    # The checkout is the commit tested (actions/checkout's default), so the image is built
    # from it: no `ref:` that would check out something else.
    [checkout] = [s for s in steps(deploy) if s.get("uses", "").startswith("actions/checkout@")]
    assert "ref" not in checkout.get("with", {})

    # The registry password reaches docker through stdin, from the secrets.
    login = next(s for s in steps(deploy) if "docker login" in s.get("run", ""))
    assert "--password-stdin" in login["run"]
    for name in ("REGISTRY_USERNAME", "REGISTRY_PASSWORD"):
        assert re.fullmatch(rf"\$\{{\{{\s*secrets\.{name}\s*\}}\}}", login["env"][name]), name
    commands = [s.get("run", "") for s in steps(deploy)]
    assert commands.index(login["run"]) < commands.index(step["run"])


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (None, "POSTLOAD_VERSION must be the full SHA of the commit to deploy, got ''"),
        ("3f2a9c1", "POSTLOAD_VERSION must be the full SHA of the commit to deploy, got '3f2a9c1'"),
        ("0" * 40, "the checkout is at "),
    ],
)
def test_ci_deploy_refuses_a_version_that_is_not_the_checked_out_commit(
    version: str | None, message: str
) -> None:
    """Before any Prefect call (the API URL points nowhere): a missing or short SHA, or one that
    is not the commit the image would be built from, stops the deploy."""
    env = {"POSTLOAD_VERSION": version} if version else {}
    result = run([str(CI_DEPLOY), "prefect.docker.yaml"], "http://127.0.0.1:9/api", **env)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("path", [LOCAL_FILE, DOCKER_FILE], ids=["prefect.yaml", "docker"])
@pytest.mark.parametrize(
    ("version", "passes"),
    [(None, False), ("", False), ("main", False), ("latest", False), ("3f2a9c1", True)],
)
def test_the_version_guard_takes_only_a_commit(
    path: Path, version: str | None, passes: bool
) -> None:
    """Each file's guard step, run as Prefect runs it (`shell: true`: /bin/sh -c)."""
    [guard] = [s[VERSION_GUARD] for s in load(path)["build"] if VERSION_GUARD in s]
    assert guard["shell"] is True
    env = {"PATH": os.environ["PATH"], "POSTLOAD_IMAGE": "registry.example.test/data/postload"}
    if version is not None:
        env["POSTLOAD_VERSION"] = version
    result = subprocess.run(
        ["/bin/sh", "-c", guard["script"]], env=env, capture_output=True, text=True
    )
    assert (result.returncode == 0) is passes, result.stderr
    if not passes:
        assert "POSTLOAD_VERSION must be the commit to deploy" in result.stderr
    if path == DOCKER_FILE and passes:
        del env["POSTLOAD_IMAGE"]
        result = subprocess.run(
            ["/bin/sh", "-c", guard["script"]], env=env, capture_output=True, text=True
        )
        assert result.returncode != 0 and "POSTLOAD_IMAGE must name the image" in result.stderr
