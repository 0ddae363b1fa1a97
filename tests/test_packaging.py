"""The wheel carries everything an installed agent needs at run time: the shipped models and the
database migrations, which live at the top of the repository in a checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("rgan_agent-*.whl"))


def test_the_wheel_holds_the_models_and_the_migrations(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for migration in (ROOT / "migrations" / "versions").glob("*.py"):
        assert f"agent/migrations/versions/{migration.name}" in names
    assert {"agent/migrations/env.py", "agent/migrations/script.py.mako",
            "agent/weights/photo-rgan.safetensors", "agent/weights/cifar10-rgan.safetensors"} <= names


def test_an_installed_agent_creates_its_database_from_the_migrations_it_carries(wheel, tmp_path):
    installed = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(installed)
    script = ("import agent.store as db, sys; from pathlib import Path; "
              "assert db.MIGRATIONS_DIR == Path(sys.argv[1]) / 'agent' / 'migrations', db.MIGRATIONS_DIR; "
              "db.open_database(Path(sys.argv[2]))")
    # run from elsewhere, with the unpacked wheel ahead of this checkout on the path
    env = {**os.environ, "PYTHONPATH": str(installed)}
    subprocess.run([sys.executable, "-c", script, str(installed), str(tmp_path / "log.sqlite3")],
                   check=True, cwd=tmp_path, env=env)
    import sqlite3

    tables = {row[0] for row in sqlite3.connect(tmp_path / "log.sqlite3").execute(
        "select name from sqlite_master where type = 'table'")}
    assert {"alembic_version", "protections", "tokens", "jobs"} <= tables
