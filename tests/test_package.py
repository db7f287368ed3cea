"""Packaging promises: a light import, typed, generated files current, and what ships."""

from __future__ import annotations

import email
import importlib.util
import json
import re
import subprocess
import sys
import tarfile
import zipfile
from email.message import Message
from pathlib import Path

import pytest

import deepwork_retry

ROOT = Path(__file__).resolve().parent.parent
SQL_FILES = sorted(
    p.relative_to(ROOT).as_posix()
    for p in (ROOT / "deepwork_retry" / "storage" / "sql").rglob("*.sql")
)
DASHBOARD = ROOT / "deepwork_retry" / "web" / "dashboard"
DASHBOARD_FILES = sorted(
    p.relative_to(ROOT).as_posix()
    for folder in ("templates", "static")
    for p in (DASHBOARD / folder).rglob("*")
    if p.is_file()
)

HEAVY = [
    "starlette",
    "fastapi",
    "flask",
    "django",
    "aiohttp",
    "uvicorn",
    "psycopg",
    "psycopg_pool",
    "celery",
    "kombu",
    "dramatiq",
    "redis",
    "pika",
    "hypothesis",
    "pytest",
    "httpx",
    "pydantic",
    "jinja2",
]


def test_import_pulls_in_no_framework_driver_or_queue_client() -> None:
    """`import deepwork_retry` in a fresh interpreter loads none of the optional packages."""
    code = (
        "import json, sys; import deepwork_retry; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert [] == json.loads(out.stdout)


def test_package_is_marked_typed() -> None:
    """The package ships a py.typed marker so type checkers use its annotations."""
    assert (ROOT / "deepwork_retry" / "py.typed").exists()


@pytest.mark.parametrize("script", ["unasync.py", "gen_docs.py"])
def test_generated_files_are_current(script: str) -> None:
    """The sync twins and the state-machine page match their sources."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / script), "--check"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert (0, "") == (done.returncode, done.stderr)


def generated_twins() -> list[tuple[str, str]]:
    """The (source, twin) pairs that scripts/unasync.py writes."""
    spec = importlib.util.spec_from_file_location("unasync", ROOT / "scripts" / "unasync.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.FILES)


@pytest.mark.parametrize(("source", "twin"), generated_twins())
def test_generated_files_say_they_are_generated(source: str, twin: str) -> None:
    """A generated twin's docstring names its source and never claims to be hand-written."""
    text = (ROOT / twin).read_text()
    said = (
        "hand-written source" in text,
        f"This file is generated from ``{source}``" in text,
        (ROOT / source).read_text().count("hand-written source"),
    )
    assert (False, True, 1) == said


def test_public_names_resolve() -> None:
    """Every name in `deepwork_retry.__all__` is importable."""
    import deepwork_retry

    missing = [name for name in deepwork_retry.__all__ if not hasattr(deepwork_retry, name)]
    assert [] == missing


# -- what the wheel and the sdist ship ---------------------------------------------------


class Built:
    """A wheel and an sdist built from this checkout, and their metadata."""

    def __init__(self, out: Path) -> None:
        (self.wheel,) = out.glob("*.whl")
        (self.sdist,) = out.glob("*.tar.gz")
        with zipfile.ZipFile(self.wheel) as whl:
            self.wheel_names = set(whl.namelist())
            (meta,) = (n for n in self.wheel_names if n.endswith(".dist-info/METADATA"))
            self.metadata: Message = email.message_from_bytes(whl.read(meta))
        with tarfile.open(self.sdist) as sdist:
            names = sdist.getnames()
            top = names[0].split("/")[0]
            self.sdist_names = {n[len(top) + 1 :] for n in names if n.startswith(top + "/")}
            pkg_info = sdist.extractfile(f"{top}/PKG-INFO")
            assert pkg_info is not None
            self.sdist_metadata: Message = email.message_from_bytes(pkg_info.read())

    def requires(self, extra: str) -> list[str]:
        """The Requires-Dist lines of ``extra``, without their marker."""
        marker = re.compile(rf";\s*extra\s*==\s*['\"]{re.escape(extra)}['\"]\s*$")
        return sorted(
            marker.sub("", line).replace(" ", "")
            for line in self.metadata.get_all("Requires-Dist", [])
            if marker.search(line)
        )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-d", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return Built(out)


def test_license_file_is_mit_and_names_the_copyright_holder() -> None:
    """The repository holds the MIT licence that pyproject.toml declares."""
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert re.search(r"^Copyright \(c\) \d{4} deepwork_retry developers$", text, re.M)


def test_wheel_ships_license_typed_marker_and_sql(built: Built) -> None:
    """The wheel carries the licence, py.typed and every SQL file, and declares the licence."""
    licenses = {n.split("/", 1)[1] for n in built.wheel_names if ".dist-info/licenses/" in n}
    assert {"licenses/LICENSE"} == licenses
    assert "deepwork_retry/py.typed" in built.wheel_names
    assert set(SQL_FILES) <= built.wheel_names
    assert ("MIT", ["LICENSE"]) == (
        built.metadata["License-Expression"],
        built.metadata.get_all("License-File"),
    )


def test_wheel_and_sdist_ship_the_dashboards_templates_and_static_files(built: Built) -> None:
    """Every template and static file of the dashboard is in the wheel and the sdist."""
    names = {p.rsplit("/", 1)[1] for p in DASHBOARD_FILES}
    assert {"base.html", "task.html", "htmx.min.js", "dashboard.js", "dashboard.css"} <= names
    assert {"htmx.LICENSE", "VENDORED.md"} <= names
    assert set(DASHBOARD_FILES) <= built.wheel_names
    assert set(DASHBOARD_FILES) <= built.sdist_names


def test_the_vendored_htmx_is_the_one_recorded() -> None:
    """htmx.min.js is byte for byte the file VENDORED.md names, with its licence beside it."""
    import hashlib

    static = DASHBOARD / "static"
    record = (static / "VENDORED.md").read_text()
    digest = hashlib.sha256((static / "htmx.min.js").read_bytes()).hexdigest()
    assert f"SHA-256 of `htmx.min.js`: `{digest}`" in record
    assert (static / "htmx.LICENSE").read_text().startswith("Zero-Clause BSD")


def test_the_dashboard_extra_brings_jinja2_and_the_server_extra_too(built: Built) -> None:
    assert ["jinja2>=3.1"] == built.requires("dashboard")
    assert "jinja2>=3.1" in built.requires("server")


def test_dashboard_without_jinja2_names_the_extra() -> None:
    assert (
        "ImportError deepwork_retry.web.dashboard needs the optional dependency "
        "'jinja2'; install it with: pip install 'deepwork-retry[dashboard]'"
    ) == run_without(["jinja2"], "deepwork_retry.web.dashboard")


def test_sdist_ships_license_typed_marker_and_sql(built: Built, tmp_path: Path) -> None:
    """The sdist carries the licence, py.typed and every SQL file, and builds the same wheel."""
    assert {"LICENSE", "pyproject.toml", "deepwork_retry/py.typed", *SQL_FILES} <= built.sdist_names
    assert "MIT" == built.sdist_metadata["License-Expression"]
    with tarfile.open(built.sdist) as sdist:
        sdist.extractall(tmp_path / "src", filter="data")
    (source,) = (tmp_path / "src").iterdir()
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path / "out")],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "out").glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        assert built.wheel_names == set(whl.namelist())


def test_version_is_written_once() -> None:
    """pyproject.toml takes the version from the package instead of repeating it."""
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("\n[project]\n", 1)[1].split("\n[", 1)[0]
    assert re.search(r"^version\s*=", project, re.M) is None
    assert re.search(r'^dynamic\s*=\s*\[[^]]*"version"', project, re.M)
    written = re.findall(
        r'^__version__\s*=\s*"([^"]+)"', (ROOT / "deepwork_retry" / "__init__.py").read_text(), re.M
    )
    assert [deepwork_retry.__version__] == written


def test_built_metadata_carries_the_package_version(built: Built) -> None:
    """The wheel and the sdist are versioned by ``deepwork_retry.__version__``."""
    assert [deepwork_retry.__version__] * 2 == [
        built.metadata["Version"],
        built.sdist_metadata["Version"],
    ]


def test_extras_bring_their_library_and_nothing_the_application_chooses(built: Built) -> None:
    """No extra forces psycopg's binary build or a broker client; none pulls the project's tools."""
    extras = set(built.metadata.get_all("Provides-Extra", []))
    assert {"postgres", "postgres-binary", "celery", "dramatiq", "testing"} <= extras
    assert not extras & {"test", "dev"}
    assert ["psycopg-pool>=3.2", "psycopg[pool]>=3.1"] == built.requires("postgres")
    assert ["psycopg-pool>=3.2", "psycopg[binary,pool]>=3.1"] == built.requires("postgres-binary")
    assert ["celery>=5.3"] == built.requires("celery")
    assert ["dramatiq>=1.15"] == built.requires("dramatiq")
    assert ["hypothesis>=6.100", "pytest>=8"] == built.requires("testing")
    everything = " ".join(built.metadata.get_all("Requires-Dist", [])).lower()
    assert [] == [tool for tool in ("hatchling", "mypy", "ruff") if tool in everything]


def test_ci_tests_the_oldest_and_newest_supported_python(built: Built) -> None:
    """.ci/run runs the tests on the floor of Requires-Python and the newest classifier."""
    floor = re.fullmatch(r">=\s*(3\.\d+)", built.metadata["Requires-Python"])
    assert floor is not None
    versions = [
        m.group(1)
        for c in built.metadata.get_all("Classifier", [])
        if (m := re.fullmatch(r"Programming Language :: Python :: (3\.\d+)", c))
    ]
    newest = max(versions, key=lambda v: tuple(map(int, v.split("."))))
    ci = (ROOT / ".ci" / "run").read_text()
    assert floor.group(1) in versions
    chosen = dict(re.findall(r"^(OLDEST|NEWEST)=(\S+)$", ci, re.M))
    assert {"OLDEST": f"python{floor.group(1)}", "NEWEST": f"python{newest}"} == chosen
    loop = (
        r'^for py in "\$OLDEST" "\$NEWEST"; do\n'
        r"(?:  .*\n)*?  PYTHON=\$py \./dev test\n(?:  .*\n)*done$"
    )
    assert re.search(loop, ci, re.M), ci


# -- optional modules name the extra to install ------------------------------------------


def run_without(blocked: list[str], module: str) -> str:
    """Import ``module`` in a fresh interpreter where ``blocked`` cannot be imported."""
    code = (
        f"import sys\nfor name in {blocked!r}:\n    sys.modules[name] = None\n"
        f"try:\n    import {module}\n"
        "except ImportError as exc:\n    print(type(exc).__name__, exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=60,
    )
    return done.stdout.strip()


@pytest.mark.parametrize("blocked", ["hypothesis", "pytest"])
@pytest.mark.parametrize("module", ["deepwork_retry.testing", "deepwork_retry.testing.doubles"])
def test_testing_kit_without_its_packages_names_the_extra(blocked: str, module: str) -> None:
    """Importing the shipped test kit without Hypothesis or pytest names the `testing` extra."""
    assert (
        f"ImportError deepwork_retry.testing needs the optional dependency {blocked!r}; "
        "install it with: pip install 'deepwork-retry[testing]'"
    ) == run_without([blocked], module)


def test_postgres_without_libpq_names_the_binary_extra() -> None:
    """psycopg installed but no libpq it can load: the error says so and names `postgres-binary`."""
    out = run_without(
        ["psycopg_c", "psycopg_binary", "psycopg.pq._pq_ctypes"], "deepwork_retry.storage.postgres"
    )
    assert out.startswith("ImportError deepwork_retry.storage.postgres needs libpq"), out
    assert out.endswith("pip install 'deepwork-retry[postgres-binary]'"), out


def test_sqlalchemy_storage_without_sqlalchemy_names_the_extra() -> None:
    """Importing the SQLAlchemy storage without SQLAlchemy names the `sqlalchemy` extra."""
    assert (
        "ImportError deepwork_retry.storage.sqlalchemy needs the optional dependency "
        "'sqlalchemy'; install it with: pip install 'deepwork-retry[sqlalchemy]'"
    ) == run_without(["sqlalchemy"], "deepwork_retry.storage.sqlalchemy")


def test_the_sqlalchemy_extra_brings_sqlalchemy_only(built: Built) -> None:
    """The `sqlalchemy` extra brings SQLAlchemy and no driver: the driver is the host's."""
    assert ["sqlalchemy>=2.0"] == built.requires("sqlalchemy")
