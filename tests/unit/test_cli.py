"""The CLI's pure parts: ``FILE::FUNCTION`` parsing, options from a signature, deterministic bundles,
and the errors a user sees for a bad file (one line, exit 1, no traceback)."""

from __future__ import annotations

import io
import textwrap
import zipfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from duanflow._cli.bundle import make_bundle
from duanflow._cli.loader import Target
from duanflow._cli.logs import parse_since
from duanflow._cli.main import app as cli
from duanflow._cli.output import CliError
from duanflow._cli.params import parse_args, signature_params
from typer.testing import CliRunner

pytestmark = pytest.mark.timeout(30)


# deliberately untyped parameters: the CLI must treat them as strings
def classify(  # type: ignore[no-untyped-def]
    text, n: int = 2, ratio: float = 0.5, verbose: bool = False, tags: list[str] | None = None, *, mode="a"
):
    return text


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--text", "我的模型接口超时了"], {"text": "我的模型接口超时了"}),
        (["--text=x", "--n", "3"], {"text": "x", "n": 3}),
        (["--text", "x", "--ratio", "1e-3", "--verbose"], {"text": "x", "ratio": 0.001, "verbose": True}),
        (["--text", "x", "--no-verbose"], {"text": "x", "verbose": False}),
        (["--text", "x", "--verbose", "false"], {"text": "x", "verbose": False}),
        (["--text", "x", "--tags", '["a", "b"]'], {"text": "x", "tags": ["a", "b"]}),
        (["--text", "x", "--tags", "none"], {"text": "x", "tags": None}),
        (["--text", "-5", "--n", "-1"], {"text": "-5", "n": -1}),
        (["--text", "x", "--mode", "b"], {"text": "x", "mode": "b"}),
    ],
)
def test_options_follow_the_signature(argv: list[str], expected: dict[str, object]) -> None:
    assert parse_args(signature_params(classify), argv, "classify") == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "classify needs --text"),
        (["--text", "x", "--n", "three"], "--n takes an integer, got 'three'"),
        (["--text", "x", "--colour", "red"], "classify has no parameter --colour"),
        (["hello"], "unexpected argument 'hello'"),
        (["--text"], "--text needs a value"),
        (["--text", "a", "--text", "b"], "--text is given twice"),
        (["--text", "x", "--tags", "{"], "--tags takes a JSON list"),
    ],
)
def test_bad_options_say_what_is_wrong(argv: list[str], message: str) -> None:
    with pytest.raises(CliError, match=message.replace("[", r"\[")) as info:
        parse_args(signature_params(classify), argv, "classify")
    if "needs --text" in message or "no parameter" in message:
        assert "--text TEXT (str, required)" in info.value.hint


def test_target_parsing() -> None:
    assert Target.parse("examples/hello.py::classify_ticket") == Target(Path("examples/hello.py"), "classify_ticket")
    assert Target.parse("app.py") == Target(Path("app.py"), "")
    with pytest.raises(CliError, match="names no function"):
        Target.parse("app.py::")


def test_bundle_is_deterministic_and_holds_only_top_level_python(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import helper\n")
    (tmp_path / "helper.py").write_text("X = 1\n")
    (tmp_path / "notes.txt").write_text("not code")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.py").write_text("")
    first = make_bundle(tmp_path / "app.py")
    (tmp_path / "helper.py").touch()  # a new mtime changes nothing
    again = make_bundle(tmp_path / "app.py")
    assert first.digest == again.digest and first.data == again.data
    assert first.files == ("app.py", "helper.py")
    assert zipfile.ZipFile(io.BytesIO(first.data)).namelist() == ["app.py", "helper.py"]
    (tmp_path / "helper.py").write_text("X = 2\n")
    assert make_bundle(tmp_path / "app.py").digest != first.digest


APP = """
import duanflow as df

app = df.App("cli-unit")


@app.function(timeout=10)
def greet(name: str, times: int = 1):
    return name * times
"""


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DUANFLOW_HOME", str(tmp_path / "home"))
    for var in ("DUANFLOW_NATS_URL", "DUANFLOW_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "cliapp_ok.py").write_text(textwrap.dedent(APP))
    (tmp_path / "cliapp_syntax.py").write_text("import duanflow as df\n\ndef broken(:\n    pass\n")
    (tmp_path / "cliapp_raises.py").write_text("import duanflow as df\n\nraise RuntimeError('no model here')\n")
    (tmp_path / "cliapp_noapp.py").write_text("def greet():\n    return 1\n")
    (tmp_path / "typer.py").write_text("import duanflow as df\n")
    return tmp_path


@pytest.mark.parametrize(
    ("target", "extra", "expected"),
    [
        ("cliapp_ok.py::missing", [], "has no function 'missing'"),
        ("cliapp_syntax.py::broken", [], "cliapp_syntax.py:3: syntax error"),
        (
            "cliapp_raises.py::f",
            [],
            "importing cliapp_raises.py failed (cliapp_raises.py:3): RuntimeError: no model here",
        ),
        ("cliapp_noapp.py::greet", [], "defines no duanflow.App"),
        ("does_not_exist.py::f", [], "no such file"),
        ("typer.py::f", [], "has the name of the module 'typer'"),
        ("cliapp_ok.py::greet", ["--times", "2"], "greet needs --name"),
        ("cliapp_ok.py::greet", ["--name", "x"], "no DuanFlow profile"),
    ],
)
def test_run_errors_are_one_clear_line_and_exit_1(files: Path, target: str, extra: list[str], expected: str) -> None:
    result = CliRunner().invoke(cli, ["run", str(files / target), *extra])
    assert result.exit_code == 1, result.output
    assert expected in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_deploy_errors_too(files: Path) -> None:
    for target, expected in (("cliapp_syntax.py", "syntax error"), ("cliapp_noapp.py", "defines no duanflow.App")):
        result = CliRunner().invoke(cli, ["deploy", str(files / target)])
        assert result.exit_code == 1
        assert expected in result.output
        assert "Traceback" not in result.output


def test_help_lists_the_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for command in ("dev", "deploy", "run"):
        assert command in result.output
    run_help = CliRunner().invoke(cli, ["run", "--help"])
    assert "FILE::FUNCTION" in run_help.output and "deployed first" in run_help.output


def test_since_takes_durations_and_times() -> None:
    now = datetime(2026, 5, 5, 18, 42, tzinfo=UTC)
    assert parse_since("30m", now=now) == now - timedelta(minutes=30)
    assert parse_since("2h", now=now) == now - timedelta(hours=2)
    assert parse_since("1d", now=now) == now - timedelta(days=1)
    assert parse_since("2026-05-05T18:00+00:00", now=now) == datetime(2026, 5, 5, 18, 0, tzinfo=UTC)
    with pytest.raises(CliError, match="30m, 2h, 1d"):
        parse_since("yesterday", now=now)


def test_logs_refuses_an_unknown_kind(files: Path) -> None:
    result = CliRunner().invoke(cli, ["logs", "hello-gpu", "--kind", "gossip"])
    assert result.exit_code == 1
    assert "not a log kind" in result.output and "scheduler" in result.output
