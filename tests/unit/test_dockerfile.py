"""What can be checked of the Dockerfile and .dockerignore without a Docker engine: which base and torch
build each variant gets, the user, health check and entrypoint, and that the build context holds every
file a COPY needs and nothing of the virtual environment, caches, tests or results."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import tomllib
from rerank_server.settings import ServerSettings

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = ("gpu", "cpu")


@dataclass
class Stage:
    base: str  # FROM's image or stage, before ${...} is expanded
    name: str | None
    steps: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, its arguments)

    def args(self, instruction: str) -> list[str]:
        return [rest for name, rest in self.steps if name == instruction]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """The global ARG defaults (before the first FROM) and the stages, in order."""
    logical, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        instruction, _, rest = line.strip().partition(" ")
        instruction, rest = instruction.upper(), rest.strip()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(words[0], name))
        elif not stages:
            assert instruction == "ARG", f"only ARG may come before the first FROM, not {instruction}"
            key, _, default = rest.partition("=")
            global_args[key] = default
        else:
            stages[-1].steps.append((instruction, rest))
    return global_args, stages


GLOBAL_ARGS, STAGES = parse_dockerfile((ROOT / "Dockerfile").read_text())
BY_NAME = {stage.name: stage for stage in STAGES if stage.name}
FINAL = STAGES[-1]


def expand(text: str, values: dict[str, str]) -> str:
    """${NAME} and $NAME replaced by their values; names without one (such as PATH) stay as they are."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def lineage(stage: Stage, variant: str) -> tuple[list[Stage], str]:
    """The stage and the stages it is built on, nearest first, and the image at the bottom."""
    chain = [stage]
    while (base := expand(chain[-1].base, {**GLOBAL_ARGS, "VARIANT": variant})) in BY_NAME:
        chain.append(BY_NAME[base])
    return chain, base


def variables(stage: Stage, variant: str) -> dict[str, str]:
    """What ENV (inherited from the stages below) and the stage's own ARG defaults hold at its end."""
    chain, _ = lineage(stage, variant)
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    for built in reversed(chain):
        args = {}  # an ARG is visible only in the stage that declares it
        for instruction, rest in built.steps:
            if instruction in ("ENV", "ARG"):
                for word in shlex.split(rest):
                    key, _, value = word.partition("=")
                    target = env if instruction == "ENV" else args
                    target[key] = expand(value, {**args, **env})
    return {**env, **args}


def test_the_default_build_is_the_gpu_image() -> None:
    assert GLOBAL_ARGS["VARIANT"] == "gpu"
    assert FINAL.name is None and "${VARIANT}" in FINAL.base  # the variant picks the final image


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_runs_on_its_own_base_and_torch_build(variant: str) -> None:
    _, image = lineage(FINAL, variant)
    _, builder_image = lineage(BY_NAME["builder"], variant)
    # The venv is made on the very base it runs on, so its interpreter path exists in the image.
    assert builder_image == image
    torch_index = variables(BY_NAME["builder"], variant)["TORCH_INDEX"]
    if variant == "gpu":
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-cudnn-runtime-ubuntu[\d.]+", image)
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", torch_index)
    else:
        assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", image)
        assert torch_index == "https://download.pytorch.org/whl/cpu"


def test_torch_is_pinned_as_bootstrap_pins_it_and_installed_before_the_project() -> None:
    builder = BY_NAME["builder"]
    runs = builder.args("RUN")
    torch_step = next(i for i, run in enumerate(runs) if '--index-url "$TORCH_INDEX"' in run)
    project_step = next(i for i, run in enumerate(runs) if '".[server]"' in run)
    assert torch_step < project_step
    assert '"$TORCH_SPEC"' in runs[torch_step] and '"$TORCH_SPEC"' in runs[project_step]
    pin = variables(builder, "gpu")["TORCH_SPEC"]
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert re.fullmatch(r"torch==[\d.]+", pin)
    assert f"${{TORCH_SPEC:-{pin}}}" in bootstrap


def test_the_final_stage_copies_the_venv_and_installs_nothing() -> None:
    assert FINAL.args("COPY")[0] == "--from=builder /opt/venv /opt/venv"
    for run in FINAL.args("RUN"):
        assert "pip" not in run and "apt-get" not in run, run
    for variant in VARIANTS:
        assert variables(FINAL, variant)["PATH"].startswith("/opt/venv/bin:")


def test_it_runs_as_uid_10001_with_the_model_cache_on_a_volume() -> None:
    assert FINAL.args("USER") == ["10001:10001"]  # numeric, so runAsNonRoot can verify it
    created = " ".join(FINAL.args("RUN"))
    assert "useradd --uid 10001 --gid 10001" in created and "chown 10001:10001 /models" in created
    assert FINAL.args("VOLUME") == ['["/models"]']
    assert {variables(FINAL, variant)["HF_HOME"] for variant in VARIANTS} == {"/models"}


def test_the_health_check_entrypoint_and_ports_are_the_servers() -> None:
    (check,) = FINAL.args("HEALTHCHECK")
    assert '"-m", "rerank_client.healthcheck", "127.0.0.1:50051"' in check
    assert (ROOT / "client" / "rerank_client" / "healthcheck.py").exists()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert FINAL.args("ENTRYPOINT") == ['["rerank-server"]'] and "rerank-server" in scripts
    assert "rerank" in scripts  # the command-line client comes with the install
    assert FINAL.args("STOPSIGNAL") == ["SIGTERM"]
    fields = ServerSettings.model_fields
    ports = {name: str(fields[name].default) for name in ("port", "http_port", "metrics_port")}
    (exposed,) = FINAL.args("EXPOSE")
    assert sorted(exposed.split()) == sorted(ports.values())  # gRPC, HTTP and metrics, each its default
    for variant in VARIANTS:
        env = variables(FINAL, variant)
        assert {name: env[f"RERANK_{name.upper()}"] for name in ports} == ports


def ignore_rules(text: str) -> list[tuple[bool, re.Pattern[str]]]:
    """(negated, pattern) per .dockerignore line, as Docker reads them: `*` and `?` stay within a path
    element, `**` crosses them."""
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        regex, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            else:
                regex += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
                i += 1
        rules.append((negated, re.compile(regex + r"\Z")))
    return rules


RULES = ignore_rules((ROOT / ".dockerignore").read_text())


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]] = RULES) -> bool:
    """Whether the build context leaves `path` out: the last rule matching it, or a folder above it,
    decides."""
    parts = path.split("/")
    folders = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negated, pattern in rules:
        if any(pattern.match(folder) for folder in folders):
            verdict = not negated
    return verdict


def test_the_ignore_matcher_reads_patterns_as_docker_does() -> None:
    rules = ignore_rules("*\n!src\n**/cache\n# a comment\n!src/cache/keep")
    assert ignored("other/file", rules) and ignored("top", rules)
    assert not ignored("src/a.py", rules) and not ignored("src/deep/a.py", rules)
    assert ignored("src/deep/cache/file", rules) and ignored("src/cache", rules)
    assert not ignored("src/cache/keep", rules)


def test_every_copied_file_is_in_the_build_context() -> None:
    copies = [rest for stage in STAGES for rest in stage.args("COPY") if not rest.startswith("--from")]
    assert copies
    for copy in copies:
        *sources, _target = copy.split()
        for source in sources:
            path = ROOT / source
            assert path.exists(), source
            assert not ignored(source), source
            files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
            needed = [
                f.relative_to(ROOT).as_posix()
                for f in files
                if "__pycache__" not in f.parts and f.suffix != ".pyc" and ".egg-info" not in str(f)
            ]
            assert needed, source
            assert not [f for f in needed if ignored(f)], source


@pytest.mark.parametrize(
    "path",
    [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/unit/test_dockerfile.py",
        "bench/results/latest.json",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/cache.db",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "client/rerank_client/__pycache__/client.cpython-311.pyc",
        "rerank_serving.egg-info/PKG-INFO",
        "docs/performance.md",
        "deploy/kubernetes/gpu/deployment.yaml",
    ],
)
def test_the_context_leaves_out_the_venv_caches_tests_and_results(path: str) -> None:
    assert ignored(path)
